"""Errors a user can act on. Messages name the file, line or sample, the field and the problem."""


class TokweightError(ValueError):
    """Bad input or configuration; the CLI prints the message without a traceback."""


class DataFormatError(TokweightError):
    """A malformed input file (JSONL line, .bin/.idx, sidecar)."""


class ConfigError(TokweightError):
    """An impossible or unknown configuration value."""
