"""Files that appear whole or not at all, and the one reader of YAML/JSON config files.

Every writer of the package goes through `atomic_path`: it writes to a temporary sibling of the
target (same directory, so the final rename never crosses a file system) and renames it over the
target only once the write succeeded; on an error the sibling is removed and the target is left as
it was. Directories (a sidecar, a score set) are replaced as a whole.
"""
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterator, Mapping

from megatron_tokweight.errors import ConfigError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def temporary_sibling(path, directory: bool = False) -> str:
    """A new, unique path next to `path`; created as an empty directory when `directory`.

    A file is not created: the writer (numpy, Megatron's IndexedDatasetBuilder, open) creates it
    with the process's usual permissions."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    if directory:
        os.mkdir(tmp)
    return tmp


def replace_path(tmp, final) -> None:
    """Move `tmp` (a file or a directory) to `final`, replacing whatever is there.

    A directory cannot be renamed over a non-empty one: the old one is first moved aside (into a
    fresh temporary directory, removed afterwards). A file never replaces a directory
    (IsADirectoryError): that directory is somebody's data."""
    if os.path.isdir(final) and not os.path.islink(final):
        if not os.path.isdir(tmp):
            raise IsADirectoryError(21, "a file cannot replace this directory", os.fspath(final))
        old = temporary_sibling(final, directory=True)
        os.rename(final, os.path.join(old, "replaced"))
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def discard(tmp) -> None:
    """Remove a temporary file or directory if it exists."""
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
        os.remove(tmp)


@contextmanager
def atomic_path(path, directory: bool = False) -> Iterator[str]:
    """Yields a temporary sibling of `path` to write; renamed over `path` when the block ends
    normally, removed when it raises."""
    tmp = temporary_sibling(path, directory)
    try:
        yield tmp
        replace_path(tmp, path)
    except BaseException:
        discard(tmp)
        raise


@contextmanager
def atomic_file(path, mode: str = "wb", **open_kwargs):
    """`open(path, mode)` that replaces `path` only once the block ended normally."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


_YAML_LOADER = None


def load_yaml(text: str):
    """`yaml.safe_load`, except that 1e-3 and 2E5 are numbers (YAML 1.2, Python, JSON) rather
    than the strings YAML 1.1 makes of an exponent without a dot and a sign."""
    global _YAML_LOADER
    import yaml

    if _YAML_LOADER is None:
        class Loader(yaml.SafeLoader):  # a subclass: SafeLoader itself stays untouched
            pass

        Loader.add_implicit_resolver(
            "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
            list("-+0123456789"))
        _YAML_LOADER = Loader
    return yaml.load(text, Loader=_YAML_LOADER)


def read_config_file(path, what: str) -> Mapping:
    """The mapping a YAML (.yaml/.yml) or JSON (.json) file holds; an empty file is {}.

    `what` names the fields for messages ("training", "weighting", "long_context"). Every problem
    is a ConfigError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: {what} config file not found")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use {', '.join(CONFIG_SUFFIXES)}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
    else:
        import yaml

        try:
            data = load_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of {what} fields, got {type(data).__name__}")
    return data
