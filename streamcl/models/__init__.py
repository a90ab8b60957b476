"""Models: an MLP, a small CNN, the ResNets of the literature, a linear head that grows with the classes seen, and
``build(name, n_classes, sample_shape, **args)`` for any model registered under ``streamcl.models``."""
from streamcl.models.heads import IncrementalLinear, grow_heads
from streamcl.models.nets import MLP, Classifier, SmallCNN
from streamcl.models.resnets import CifarResNet, ResNet18
from streamcl.models.zoo import build

__all__ = ["MLP", "CifarResNet", "Classifier", "IncrementalLinear", "ResNet18", "SmallCNN", "build", "grow_heads"]
