"""The `veil` command: one module per noun; `main` builds the parser."""
