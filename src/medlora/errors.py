"""Errors a user can cause; the CLI prints them as one line and exits non-zero."""


class MedloraError(Exception):
    """Base class for every error caused by user input or environment."""


class DataError(MedloraError):
    """A data file or record is malformed."""


class TemplateError(MedloraError):
    """A prompt template is missing or malformed."""


class ModelError(MedloraError):
    """A base model, adapter or device setting cannot be used."""


class ConfigError(MedloraError):
    """An option or a recipe file is invalid."""


class TrainingError(MedloraError):
    """Training cannot go on (diverged loss, interrupted run)."""
