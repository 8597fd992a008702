"""Errors of model loading and prompt encoding, shared by the loader and the families."""


class ModelLoadError(RuntimeError):
    """Weights could not be found or loaded; the message says which config key to set."""


class PromptTooLongError(ValueError):
    pass
