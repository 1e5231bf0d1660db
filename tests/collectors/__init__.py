"""Tests of the PostgreSQL collectors against real clusters (a package, so its conftest does not shadow tests/conftest.py)."""
