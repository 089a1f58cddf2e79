"""Shipped corpus files (package data; see ../LICENSES.md)."""
