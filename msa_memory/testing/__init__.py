"""testing package (see docs/design.md)."""
