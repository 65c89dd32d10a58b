"""megatron-tokweight: exact token-weighted training on packed sequences for Megatron-Core.

Heavy dependencies (torch, Megatron-Core, Transformer Engine, Triton) are imported lazily:
importing this package patches nothing and loads only what the attribute you touch needs.
"""
from megatron_tokweight.common.lazy_exports import lazy_exports
from megatron_tokweight.common.megatron_version import check_megatron_core

check_megatron_core()  # reads the installed version's metadata only: Megatron itself stays unimported

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "pack_lengths": "megatron_tokweight.data.packing",
    "PackResult": "megatron_tokweight.data.packing",
    "sample_weights": "megatron_tokweight.weighting",
    "WeightingConfig": "megatron_tokweight.weighting",
    "weighted_cross_entropy": "megatron_tokweight.loss",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
