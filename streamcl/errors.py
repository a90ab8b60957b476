"""streamcl's own exceptions: every refusal of bad input is one of these, with a message that says what to do."""


class StreamclError(Exception):
    """Base class of every error streamcl raises on purpose."""


class ConfigError(StreamclError, ValueError):
    """A configuration names an unknown key, plugin or recipe, or a value of the wrong kind."""


class DataError(StreamclError, ValueError):
    """A dataset, experience or batch does not fit the stream or the model."""


class DatasetNotFound(StreamclError, FileNotFoundError):
    """A dataset is not on disk and could not be downloaded."""


class PluginError(StreamclError, TypeError):
    """A plugin list cannot run: a role owned twice, a hook that does not exist, a clash of names."""


class TrainingError(StreamclError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


class Stopped(StreamclError):
    """Training stopped at a step boundary because a stop was asked for (Ctrl-C under ``streamcl run``);
    ``checkpoint`` is the checkpoint written there, or ``None`` without a checkpoint folder."""

    def __init__(self, message: str, checkpoint=None):
        super().__init__(message)
        self.checkpoint = checkpoint
