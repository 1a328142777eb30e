"""Choosing a backend: pure policies, and (later) health state."""
