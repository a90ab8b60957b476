"""Models: an MLP, a small CNN, and a linear head that grows with the classes seen."""
from streamcl.models.heads import IncrementalLinear, grow_heads
from streamcl.models.nets import MLP, Classifier, SmallCNN

__all__ = ["MLP", "Classifier", "IncrementalLinear", "SmallCNN", "grow_heads"]
