"""store package (see docs/design.md)."""
