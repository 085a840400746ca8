"""encode package (see docs/design.md)."""
