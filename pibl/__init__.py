"""PIBL: Proxy Inverso + Balanceador de Carga, an HTTP/1.1 reverse proxy and load balancer."""

from pibl import _build

__version__ = "0.1.0"
# "compiled" when the mypyc-compiled modules run, "pure" when the Python source does
# (and BUILD_REASON says why); see pibl/_build.py
BUILD, BUILD_REASON = _build.select()
__all__ = ["BUILD", "BUILD_REASON", "__version__"]
