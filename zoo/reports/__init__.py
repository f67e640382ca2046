"""Reports written by evaluate.py: Markdown + self-contained HTML + metrics.json."""

from zoo.reports.report import Report

__all__ = ["Report"]
