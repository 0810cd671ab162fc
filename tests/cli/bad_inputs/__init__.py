"""The bad-input table, one file per command (see table.py)."""
