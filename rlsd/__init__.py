"""rlsd: self-distilled RLVR (RLSD) and its baselines, readable in an afternoon."""

__version__ = "0.1.0"
