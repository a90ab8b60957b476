"""Replay memory: budgets (and, with the rehearsal family, storage and selection)."""
from streamcl.memory.budget import Budget

__all__ = ["Budget"]
