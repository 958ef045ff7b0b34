"""User-facing errors: each message says what was wrong and what to change."""


class JaxMoeLoraError(Exception):
    """Base class for errors caused by user input (files, configs, arguments)."""


class CheckpointError(JaxMoeLoraError):
    """A checkpoint file is missing, unreadable, or does not match the model config."""


class UnsupportedArchitectureError(JaxMoeLoraError):
    """The checkpoint's architecture is not one jaxmoelora implements."""


class TokenizerError(JaxMoeLoraError):
    """A tokenizer could not be built from the checkpoint."""


class ConfigError(JaxMoeLoraError):
    """A configuration value is invalid."""


class DataError(JaxMoeLoraError):
    """A dataset file, record or built-in dataset is missing, malformed or unusable."""


class UnsupportedExportError(JaxMoeLoraError):
    """The model's adapter cannot be written in the requested export format."""
