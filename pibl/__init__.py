"""PIBL: Proxy Inverso + Balanceador de Carga, an HTTP/1.1 reverse proxy and load balancer."""

__version__ = "0.1.0"
__all__ = ["__version__"]
