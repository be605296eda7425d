"""Training: the train state and its sharding over a mesh, AdamW, orbax checkpoints with
exact resume, the training loop, and main.py's eval / predict modes.

`train_and_evaluate(config, workdir)` is what main.py runs.
"""
from semask_jax.train.loop import train_and_evaluate

__all__ = ['train_and_evaluate']
