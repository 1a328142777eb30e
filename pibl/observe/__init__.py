"""Observability: the access and event log."""
