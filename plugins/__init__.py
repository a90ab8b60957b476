"""First-party plugins, one technique per module, built only on streamcl's public API."""
from streamcl.plugins.cumulative import Cumulative
from streamcl.plugins.dark_replay import DarkReplay
from streamcl.plugins.distill import Distill, LwFDistill
from streamcl.plugins.er_ace import ERACE
from streamcl.plugins.gdumb import GDumb
from streamcl.plugins.latent_replay import LatentReplay
from streamcl.plugins.mir import MIR
from streamcl.plugins.nme import NMEClassifier
from streamcl.plugins.replay import Replay
from streamcl.plugins.task_mask import TaskMask

__all__ = ["Cumulative", "DarkReplay", "Distill", "ERACE", "GDumb", "LatentReplay", "LwFDistill", "MIR", "NMEClassifier",
           "Replay", "TaskMask"]
