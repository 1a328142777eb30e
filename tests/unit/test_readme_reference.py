"""The README's configuration reference lists exactly the keys the schema accepts.

``pibl check-config`` prints every effective setting; a key it prints that the reference
leaves out (or a documented key the schema no longer has) fails here, in both languages.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from pibl.config import Config

ROOT = Path(__file__).resolve().parents[2]
INTROS = {
    "README.md": "Every section, with its defaults",
    "README.es.md": "Todas las secciones, con sus valores por defecto",
}
SECTION = re.compile(r"^\[\[?([a-z_.]+)\]\]?")
KEY = re.compile(r"^(?:#\s*)?([a-z_]+)\s*=\s*(.*)$")  # "# key = ..." documents it too
INLINE_KEY = re.compile(r"([a-z_]+)\s*=")


def _model(annotation: object) -> tuple[type[BaseModel], bool] | None:
    """The model inside ``X | None`` or ``tuple[X, ...]``, and whether it is an array."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        found = _model(arg)
        if found is not None:
            return found[0], found[1] or origin is tuple
    return None


def schema_keys(model: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        found = _model(field.annotation)
        if found is None:
            keys.add(prefix + name)
        else:
            sub, array = found
            keys |= schema_keys(sub, f"{prefix}{name}{'[]' if array else ''}.")
    return keys


def documented_keys(readme: str) -> set[str]:
    text = (ROOT / readme).read_text()
    start = text.index(INTROS[readme])
    block = text[text.index("```toml\n", start) + 8 :]
    block = block[: block.index("```")]
    keys: set[str] = set()
    section = ""
    for line in block.splitlines():
        line = line.strip()
        if match := SECTION.match(line):
            name = match.group(1)
            section = f"{name}[]." if line.startswith("[[") else f"{name}."
            continue
        if match := KEY.match(line):
            key, value = match.groups()
            if value.startswith("[ {") or value.startswith("{"):  # an array of inline tables
                inner = value[value.index("{") + 1 : value.rindex("}")]
                keys |= {f"{section}{key}[].{k}" for k in INLINE_KEY.findall(inner)}
            else:
                keys.add(section + key)
    return keys


def test_schema_walk_finds_nested_and_array_keys() -> None:
    keys = schema_keys()
    assert {"server.port", "backends[].url", "tls.certificates[].names", "admin.token"} <= keys


@pytest.mark.parametrize("readme", sorted(INTROS))
def test_the_reference_documents_every_key_of_the_schema(readme: str) -> None:
    documented = documented_keys(readme)
    schema = schema_keys()
    assert sorted(schema - documented) == [], f"{readme} leaves out these keys"
    assert sorted(documented - schema) == [], f"{readme} documents keys the schema lacks"
