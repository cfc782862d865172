"""Run reports: learning curves and the per-token credit heat map, as one self-contained HTML."""

from .html import write_report

__all__ = ["write_report"]
