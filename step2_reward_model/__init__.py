"""Step 2: the pairwise reward model (see main.py)."""
