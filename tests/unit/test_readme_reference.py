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
SECTION = re.compile(r"^\[\[?([A-Za-z0-9_.]+)\]\]?")
KEY = re.compile(r"^(?:#\s*)?([a-z][a-z0-9_]*)\s*=\s*(.*)$")  # "# key = ..." documents it too
INLINE_KEY = re.compile(r"([a-z_]+)\s*=")


def _model(annotation: object) -> tuple[type[BaseModel], bool | str] | None:
    """The model inside ``X | None``, ``tuple[X, ...]`` (an array: True) or
    ``dict[str, X]`` (tables named by the user: "NAME")."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    if origin is dict:
        found = _model(typing.get_args(annotation)[1])
        return None if found is None else (found[0], "NAME")
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
            if array == "NAME":
                keys |= schema_keys(sub, f"{prefix}{name}.NAME.")
            else:
                keys |= schema_keys(sub, f"{prefix}{name}{'[]' if array else ''}.")
    return keys


def documented_keys(readme: str) -> set[str]:
    text = (ROOT / readme).read_text()
    start = text.index(INTROS[readme])
    block = text[text.index("```toml\n", start) + 8 :]
    block = block[: block.index("```")]
    keys: set[str] = set()
    section = ""
    arrays: set[str] = set()  # [[name]]: a later [name.sub] is a table of its last element
    for line in block.splitlines():
        line = line.strip()
        if match := SECTION.match(line):
            name = match.group(1)
            if line.startswith("[["):
                arrays.add(name)
                section = f"{name}[]."
            else:
                head, _, rest = name.partition(".")
                section = f"{head}[].{rest}." if head in arrays and rest else f"{name}."
            continue
        if match := KEY.match(line):
            key, value = match.groups()
            if value.startswith("[ {"):  # an array of inline tables
                inner = value[value.index("{") + 1 : value.rindex("}")]
                keys |= {f"{section}{key}[].{k}" for k in INLINE_KEY.findall(inner)}
            elif value.startswith('{ "'):  # a map of the user's names (header fields)
                keys.add(section + key)
            elif value.startswith("{"):  # one inline table
                inner = value[value.index("{") + 1 : value.rindex("}")]
                keys |= {f"{section}{key}.{k}" for k in INLINE_KEY.findall(inner)}
            else:
                keys.add(section + key)
    # A nested section whose comment says "the keys of [health]" (``[pools.NAME.health]``,
    # ``[[pools.NAME.backends]]``) has the keys of the top-level section of that name.
    for line in block.splitlines():
        line = line.strip()
        match = SECTION.match(line)
        if match is None or not ("# the keys of" in line or "# las claves de" in line):
            continue
        name = match.group(1)
        last = name.rsplit(".", 1)[-1]
        array = line.startswith("[[")
        top, own = (f"{last}[].", f"{name}[].") if array else (f"{last}.", f"{name}.")
        keys |= {own + k[len(top) :] for k in list(keys) if k.startswith(top)}
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


@pytest.mark.parametrize(
    ("readme", "intro"),
    [("README.md", "Two applications behind one PIBL"), ("README.es.md", "Dos aplicaciones")],
)
def test_the_two_applications_example_is_a_valid_file_with_no_warnings(
    readme: str, intro: str
) -> None:
    import tomllib

    from pibl.config import validate
    from pibl.routes import route_warnings

    text = (ROOT / readme).read_text()
    block = text[text.index("```toml\n", text.index(intro)) + 8 :]
    config = validate(tomllib.loads(block[: block.index("```")]), readme)
    assert set(config.pools) == {"shop", "api", "staging"}
    assert [r.name for r in config.routes] == ["api", "admin", "static", "shop"]
    assert route_warnings(config) == []


@pytest.mark.parametrize(
    ("name", "sections"),
    [
        ("README.md", ["Introduction", "How to run", "Development", "Conclusions", "References"]),
        (
            "README.es.md",
            ["Introducción", "Funcionamiento", "Desarrollo", "Conclusiones", "Referencias"],
        ),
    ],
)
def test_the_readmes_keep_their_sections(name: str, sections: list[str]) -> None:
    text = (ROOT / name).read_text(encoding="utf-8")
    assert re.findall(r"^## (.+)$", text, flags=re.MULTILINE) == sections
