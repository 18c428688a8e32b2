"""The observation window a policy with a history needs (drifting_vla/inference/history.py)."""
