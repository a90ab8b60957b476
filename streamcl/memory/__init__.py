"""Replay memory: preallocated storage, budgets, and selection (herding, reservoir, balancing)."""
from streamcl.memory.budget import Budget, check_room
from streamcl.memory.selection import balanced, herding, random_pick, reservoir
from streamcl.memory.storage import Codec, Memory

__all__ = ["Budget", "check_room", "Codec", "Memory", "balanced", "herding", "random_pick", "reservoir"]
