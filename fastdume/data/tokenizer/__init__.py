"""Shipped tokenizer files (package data)."""
