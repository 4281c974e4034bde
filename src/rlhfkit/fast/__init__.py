"""Opt-in speed paths below the forward and generation seams, each proven equal to the plain path by a test.

Imported only by ``rlhfkit.logprobs``, ``rlhfkit.generation`` and its engines, and the training loop.
"""
