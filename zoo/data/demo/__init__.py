"""Builders for the offline demo datasets (written in the real datasets' on-disk formats)."""
