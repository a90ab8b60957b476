"""streamcl: continual learning on a stream of experiences, as a minimal loop with composable plugins."""
from streamcl.batch import Batch, Output
from streamcl.errors import ConfigError, DataError, DatasetNotFound, PluginError, StreamclError, TrainingError
from streamcl.plugin import Plugin, hookimpl
from streamcl.scenarios import Benchmark, Experience, Stream, TensorData
from streamcl.strategy import Strategy

__version__ = "0.1.0"

__all__ = ["Batch", "Benchmark", "ConfigError", "DataError", "DatasetNotFound", "Experience", "Output", "Plugin",
           "PluginError", "Strategy", "Stream", "StreamclError", "TensorData", "TrainingError", "hookimpl"]
