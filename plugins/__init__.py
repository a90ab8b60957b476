"""First-party plugins, one technique per module, built only on streamcl's public API."""
from streamcl.plugins.agem import AGEM
from streamcl.plugins.bias_correction import BiasCorrection
from streamcl.plugins.brain_inspired_replay import BrainInspiredReplay
from streamcl.plugins.coil import COIL
from streamcl.plugins.cosine_head import CosineHead
from streamcl.plugins.cumulative import Cumulative
from streamcl.plugins.cwr import CWR, CWRStar
from streamcl.plugins.der import DER
from streamcl.plugins.dark_replay import DarkReplay
from streamcl.plugins.ensemble import Ensemble
from streamcl.plugins.distill import Distill, LwFDistill
from streamcl.plugins.er_ace import ERACE
from streamcl.plugins.ewc import EWC
from streamcl.plugins.gdumb import GDumb
from streamcl.plugins.gem import GEM
from streamcl.plugins.generative_negative_replay import GenerativeNegativeReplay
from streamcl.plugins.generative_replay import GenerativeReplay
from streamcl.plugins.hat import HAT
from streamcl.plugins.hypernetwork import HyperNetwork
from streamcl.plugins.latent_replay import LatentReplay
from streamcl.plugins.less_forget import LessForget
from streamcl.plugins.margin_ranking import MarginRanking
from streamcl.plugins.mas import MAS
from streamcl.plugins.mir import MIR
from streamcl.plugins.multi_head import MultiHead
from streamcl.plugins.nme import NMEClassifier
from streamcl.plugins.packnet import PackNet
from streamcl.plugins.piggyback import Piggyback
from streamcl.plugins.progress_compress import ProgressCompress
from streamcl.plugins.progressive_networks import ProgressiveNetworks
from streamcl.plugins.replay import Replay
from streamcl.plugins.si import SI
from streamcl.plugins.supsup import SupSup
from streamcl.plugins.task_mask import TaskMask
from streamcl.plugins.wa import WA

__all__ = ["AGEM", "BiasCorrection", "BrainInspiredReplay", "COIL", "CosineHead", "Cumulative", "CWR", "CWRStar", "DER", "DarkReplay", "Distill", "ERACE", "EWC", "Ensemble",
           "GDumb", "GEM", "GenerativeNegativeReplay", "GenerativeReplay", "HAT", "HyperNetwork", "LatentReplay", "LessForget", "LwFDistill", "MAS", "MIR", "MarginRanking",
           "MultiHead", "NMEClassifier", "PackNet", "Piggyback", "ProgressCompress", "ProgressiveNetworks", "Replay", "SI",
           "SupSup", "TaskMask", "WA"]
