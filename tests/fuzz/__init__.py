"""The property-based fuzz tier (hypothesis); a package so its conftest does not shadow tests/conftest.py."""
