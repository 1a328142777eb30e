"""PIBL: Proxy Inverso + Balanceador de Carga, an HTTP/1.1 reverse proxy and load balancer."""

__version__ = "0.1.0"
DEFAULT_CONFIG_FILE = "pibl.toml"  # read from the directory PIBL runs in
__all__ = ["DEFAULT_CONFIG_FILE", "__version__"]
