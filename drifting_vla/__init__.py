"""drifting-vla: one-step Drifting-VLA robot policies (Deng et al., "Generative Modeling via Drifting")."""

__version__ = "0.1.0"
