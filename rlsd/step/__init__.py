"""Floor 3, the step: one training step as returned records (`records.py`), the loop that reads
top to bottom (`trainer.py`), the teacher pass, the update, the diagnostics, the run it needs
(`run.py`) and the held-out evaluation."""
