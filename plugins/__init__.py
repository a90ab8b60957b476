"""First-party plugins, one technique per module, built only on streamcl's public API."""
from streamcl.plugins.cumulative import Cumulative
from streamcl.plugins.replay import Replay

__all__ = ["Cumulative", "Replay"]
