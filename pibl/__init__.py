"""PIBL: Proxy Inverso + Balanceador de Carga, an HTTP/1.1 reverse proxy and load balancer."""

from pibl import _build

__version__ = "0.1.0"
DEFAULT_CONFIG_FILE = "pibl.toml"  # read from the directory PIBL runs in
# "compiled" when the mypyc-compiled modules run, "pure" when the Python source does
# (and BUILD_REASON says why); see pibl/_build.py
BUILD, BUILD_REASON = _build.select()
__all__ = ["BUILD", "BUILD_REASON", "DEFAULT_CONFIG_FILE", "__version__"]
