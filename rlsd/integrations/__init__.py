"""Bridges from rlsd's credit rule to other training stacks.

- `rlsd.integrations.trl`: `RLSDGRPOTrainer` / `RLSDConfig`, RLSD inside TRL's `GRPOTrainer`
  (`pip install 'rlsd[trl]'`; docs/trl.md). Imported on its own: this package imports nothing.
"""
