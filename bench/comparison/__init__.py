"""bench/compare.py, as modules: see that script's docstring."""
