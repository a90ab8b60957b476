"""First-party plugins, one technique per module, built only on streamcl's public API."""
from streamcl.plugins.cumulative import Cumulative

__all__ = ["Cumulative"]
