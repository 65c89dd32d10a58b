"""`PackedDatasetConfig`: Megatron's `BlendedMegatronDatasetConfig` plus packing, weighting and
the blend's one tokenizer (prepared prefixes record theirs; plain Megatron prefixes take it from
the `plain_prefix_tokenizer` option or from the prepared prefixes they are blended with)."""
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import (
    BlendedMegatronDatasetConfig,
)

from megatron_tokweight.data.packing import check_pack_options
from megatron_tokweight.data.plain_prefix import is_plain_prefix
from megatron_tokweight.data.sidecar import read_sidecar
from megatron_tokweight.data.tokenizer import load_tokenizer, tokenizer_differences
from megatron_tokweight.errors import ConfigError
from megatron_tokweight.weighting.config import as_weighting_config


@dataclass
class PackedDatasetConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset config plus packing and weighting.

    pack_algorithm: "bfd" | "ffd" | "next-fit"; overlong: "truncate" | "split" | "drop" (what
    happens to a sample longer than sequence_length; always counted).
    context_parallel_size: > 1 pads every piece to a multiple of 2 x CP (`cu_seqlens_padded`).
    weighting: a `WeightingConfig`, a preset name or a dict; None gives weight 1.0 to every target.
    pad_id: token id of padding; None takes the pad id of the blend's tokenizer.
    plain_prefix_tokenizer: the tokenizer of plain Megatron prefixes (no sidecar): "byte", a
        tokenizer.json path or a spec dict; None: the prepared prefixes' (a blend has one).
    After construction `tokenizer_spec` is the blend's tokenizer spec ({} when no prefix or
    option names one). (Megatron's own `tokenizer` field is not used.)
    """

    pack_algorithm: str = "bfd"
    overlong: str = "truncate"
    context_parallel_size: int = 1
    weighting: Optional[Any] = None
    pad_id: Optional[int] = None
    plain_prefix_tokenizer: Optional[Any] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mock:
            raise ConfigError(
                "PackedDatasetConfig needs data: set blend (with split) or blend_per_split to prepared prefixes"
            )
        if self.fast_cache_load or self.defer_npy_index_mmap:
            raise ConfigError(
                "PackedDataset does not support fast_cache_load / defer_npy_index_mmap: it needs each split's "
                "sample indices to pack (its cached indices are memory-mapped anyway)"
            )
        if isinstance(self.context_parallel_size, bool) or not isinstance(self.context_parallel_size, int) \
                or self.context_parallel_size < 1:
            raise ConfigError(f"context_parallel_size must be an integer >= 1, got {self.context_parallel_size!r}")
        check_pack_options(self.sequence_length, self.pack_algorithm, self.overlong, self.cp_multiple)
        self.weighting = as_weighting_config(self.weighting)
        tokenizer = self.tokenizer_spec = self._common_tokenizer()
        if self.pad_id is None:
            self.pad_id = tokenizer.get("pad_id")
            if self.pad_id is None:
                raise ConfigError(
                    "no pad id: the prefixes' tokenizer has none" if tokenizer else
                    f"no pad id: {', '.join(self.prefixes())} have no sidecar naming a tokenizer; set "
                    "PackedDatasetConfig.plain_prefix_tokenizer (or pad_id)"
                )
        vocab_size = tokenizer.get("vocab_size")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, (int, np.integer)) or self.pad_id < 0 \
                or (vocab_size is not None and self.pad_id >= vocab_size):
            raise ConfigError(f"pad_id must be a token id in [0, {vocab_size}), got {self.pad_id!r}")
        self.pad_id = int(self.pad_id)

    @property
    def cp_multiple(self) -> int:
        """Every piece is padded to a multiple of this (2 x CP; 1 without context parallelism)."""
        return 2 * self.context_parallel_size if self.context_parallel_size > 1 else 1

    def prefixes(self) -> List[str]:
        blends = [self.blend] if self.blend is not None else list(self.blend_per_split or [])
        return [prefix for blend in blends if blend is not None for prefix in blend[0]]

    def _common_tokenizer(self) -> dict:
        """The tokenizer every prefix's sidecar (and the `tokenizer` option) names; ConfigError
        when two disagree."""
        given = self.plain_prefix_tokenizer
        if given is not None and not isinstance(given, dict):
            given = load_tokenizer(given).spec()
        named = [(prefix, read_sidecar(prefix).tokenizer) for prefix in self.prefixes() if not is_plain_prefix(prefix)]
        if given is not None:
            named.append(("the plain prefixes' tokenizer", given))
        first, first_prefix = None, None
        for prefix, spec in named:
            if first is None:
                first, first_prefix = spec, prefix
                continue
            diffs = tokenizer_differences(first, spec, (first_prefix, prefix))
            if diffs:
                raise ConfigError(
                    f"{prefix} was tokenized differently from {first_prefix} ({'; '.join(diffs)}); "
                    "a blend needs one tokenizer"
                )
        return first or {}
