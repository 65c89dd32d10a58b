"""Errors a user can act on. Messages name the file, line or sample, the field and the problem."""
import difflib
from typing import Iterable, Mapping


class TokweightError(ValueError):
    """Bad input or configuration; the CLI prints the message without a traceback."""


class DataFormatError(TokweightError):
    """A malformed input file (JSONL line, .bin/.idx, sidecar)."""


class ConfigError(TokweightError):
    """An impossible or unknown configuration value."""


def reject_unknown_keys(mapping: Mapping, known: Iterable[str], where: str) -> None:
    """Raise ConfigError naming each key of `mapping` not in `known` (with a close match, if any)."""
    known = list(known)
    unknown = [key for key in mapping if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(hints)}; known keys: {', '.join(known)}")
