"""jobs package (see docs/design.md)."""
