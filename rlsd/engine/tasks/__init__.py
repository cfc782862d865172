"""Built-in task helpers: worked solutions for reasoning-gym families (`worked.py`)."""
