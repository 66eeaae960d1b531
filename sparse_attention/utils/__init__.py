"""Helpers shared by the scripts (``scripts/``, ``attention.py``); the library never imports them."""
