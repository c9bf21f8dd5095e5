"""Step 3: RLHF with PPO, and the DPO path (see main.py)."""
