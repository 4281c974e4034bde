"""rlhfkit: the InstructGPT recipe (SFT -> RM -> PPO) and its modern alternatives, end to end."""
__version__ = "0.1.0"
