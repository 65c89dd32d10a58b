"""megatron-tokweight: exact token-weighted training on packed sequences for Megatron-Core.

Heavy dependencies (torch, Megatron-Core, Transformer Engine, Triton) are imported lazily:
importing this package patches nothing and loads only what the attribute you touch needs.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "pack_lengths": "megatron_tokweight.packing",
    "PackResult": "megatron_tokweight.packing",
    "sample_weights": "megatron_tokweight.weighting",
    "WeightingConfig": "megatron_tokweight.weighting",
    "weighted_cross_entropy": "megatron_tokweight.loss",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


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


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
