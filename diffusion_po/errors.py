"""Errors that reach the user as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the file, row or key and says what to do."""


class ConfigError(UserError):
    """A configuration file or override is invalid."""


class DataError(UserError):
    """A data set is missing, malformed or empty."""


class ModelLoadError(UserError):
    """A model path or hub id could not be loaded."""
