"""Lazy public names: a package exposes them without importing their modules (or torch,
Megatron-Core) until first use."""
from importlib import import_module


def lazy_exports(package: str, exports: dict, namespace: dict):
    """A module `__getattr__` that imports `exports[name]` (a module path) on first access and
    caches the attribute in `namespace` (the package's globals)."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
