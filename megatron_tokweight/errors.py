"""Errors a user can act on. Messages name the file, line or sample, the field and the problem."""
import difflib
from typing import Iterable, Mapping, Optional


class TokweightError(ValueError):
    """Bad input or configuration; the CLI prints the message without a traceback."""


class DataFormatError(TokweightError):
    """A malformed input file (JSONL line, .bin/.idx, sidecar)."""


class ConfigError(TokweightError):
    """An impossible or unknown configuration value."""


def unknown_keys(mapping: Mapping, known: Iterable[str]) -> Optional[str]:
    """"unknown key(s) 'x' (did you mean 'y'?); known keys: ..." for the keys of `mapping` not in
    `known`, or None when there are none."""
    known = list(known)
    unknown = [key for key in mapping if key not in known]
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown key(s) {', '.join(hints)}; known keys: {', '.join(known)}"


def reject_unknown_keys(mapping: Mapping, known: Iterable[str], where: str) -> None:
    """Raise ConfigError naming each key of `mapping` not in `known` (with a close match, if any)."""
    problem = unknown_keys(mapping, known)
    if problem:
        raise ConfigError(f"{where}: {problem}")
