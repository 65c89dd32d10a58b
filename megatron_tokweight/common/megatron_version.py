"""The megatron-core versions the plugin supports, checked when the package is imported.

Supported: 0.16.1 (what pip resolves on Python 3.11) through 0.19.x (September 2026). Where a
newer Megatron-Core does what the plugin had to do itself, the plugin takes Megatron's path and
keeps its own only for older versions (the cross-entropy over an explicit TP group:
`loss.cross_entropy.cross_entropy_path`). A version outside the range is refused at import with
both versions named, before anything can fail deep inside a training step.
"""
import re
from importlib import metadata
from typing import Optional, Tuple

OLDEST = (0, 16, 1)
NEWEST_MINOR = (0, 19)  # every 0.19.x patch release
SUPPORTED = "megatron-core >= 0.16.1, < 0.20"


def parse_version(text: str) -> Tuple[int, int, int]:
    """(major, minor, patch) of a release string such as "0.19.2" or "0.20.0rc1"."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise ValueError(f"cannot read the version {text!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def installed_version() -> Optional[str]:
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def check_megatron_core(version: Optional[str] = None) -> None:
    """ImportError naming the installed and the supported versions when they do not match."""
    version = installed_version() if version is None else version
    if version is None:
        raise ImportError(f"megatron-tokweight needs {SUPPORTED}; megatron-core is not installed")
    parsed = parse_version(version)
    if not (OLDEST <= parsed and parsed[:2] <= NEWEST_MINOR):
        raise ImportError(
            f"megatron-tokweight supports {SUPPORTED}, but megatron-core {version} is installed; "
            "install a supported version (pip install 'megatron-core>=0.16.1,<0.20')"
        )
