"""`PackedDataset`: a Megatron-Core `MegatronDataset` of packed rows with per-token loss weights.

Built like `GPTDataset`, through
`BlendedMegatronDatasetBuilder(PackedDataset, sizes, is_built_on_rank, config).build()`, so
blends and train/valid/test splits work unchanged. The low-level dataset is the prefix's
`IndexedDataset`; its sidecar (`PREFIX.tokweight/`) gives spans, tasks and the pad id. A plain
Megatron prefix (no sidecar) is read as text samples, one per `.idx` document
(`plain_prefix.sample_metadata`).

Per split, the split's samples are shuffled with the seed and packed once (`rows.build_pack_index`);
an epoch is every row once, in a seeded order; `num_samples` rows requested -> as many epochs as
needed. The pack index and the shuffle index are cached as `.npy` under `path_to_cache`, keyed by
Megatron's unique-description hash (every setting that changes them, plus a fingerprint of the
sample lengths), written atomically under a file lock and memory-mapped on a cache hit.

An item is a packed row, exactly as docs/ARCHITECTURE.md "A packed row" lists it. Sample
weights use n = the targets a sample keeps once packed (all its fragments together), computed
once per dataset; loss_weights = sample weight x token factors x loss_mask.
"""
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split
from megatron.core.utils import log_single_rank

from megatron_tokweight.common.files import atomic_file
from megatron_tokweight.data.indexed_validation import (
    read_index_arrays,
    validate_against_indexed_dataset,
)
from megatron_tokweight.data.pack_index import (
    PackIndex,
    build_pack_index,
    trained_targets,
)
from megatron_tokweight.data.packed_dataset_config import PackedDatasetConfig
from megatron_tokweight.data.plain_prefix import (
    document_table,
    is_plain_prefix,
    sample_metadata,
)
from megatron_tokweight.data.row_gather import INT_FIELDS, RowGather
from megatron_tokweight.data.sidecar import lengths_fingerprint
from megatron_tokweight.errors import DataFormatError

logger = logging.getLogger(__name__)


class PackedDataset(MegatronDataset):
    """Packed rows of one prefix's split (see the module docstring)."""

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: Optional[str],
        indexed_indices: np.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: PackedDatasetConfig,
    ) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self._sidecar = None
        self._gather = None
        self._sample_weights = None
        self._weighter = None
        self._token_rules = False
        # a prefix re-prepared in place must not hit the old cache: key the lengths too
        self.unique_identifiers["lengths_md5"] = lengths_fingerprint(self.sidecar.lengths)  # per sample
        self.unique_description = json.dumps(
            self.unique_identifiers, indent=4, default=lambda obj: obj.unique_identifiers
        )
        self.unique_description_hash = hashlib.md5(
            self.unique_description.encode("utf-8"), usedforsecurity=False
        ).hexdigest()

        self.cache_hit = False
        self.pack_index, self.shuffle_index, stats = self._load_or_build_indices()
        # n as trained (after truncation / split), for every sample of the prefix (0 outside this split)
        self.n_trained = trained_targets(
            self.pack_index.pieces, self.sidecar.span_offsets, self.sidecar.spans, self.sidecar.num_samples
        )
        # samples kept (not dropped) that train no target: weight 0 (zero-length ones included)
        stats["empty"] = int(np.count_nonzero(self.n_trained[self.indices] == 0)) - stats["dropped"]
        self.pack_stats = stats
        self.sample_weights  # once, here: DataLoader workers inherit them
        log_single_rank(logger, logging.INFO, f"{type(self).__name__} {index_split.name} {dataset_path}: {stats}")

    # ---- Megatron's dataset protocol -------------------------------------------------------

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: IndexedDataset) -> int:
        return low_level_dataset.document_indices.shape[0] - 1  # a sample is a document

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: PackedDatasetConfig) -> IndexedDataset:
        # once per prefix: the sidecar must describe exactly this .bin/.idx pair; a plain prefix's
        # .idx must describe its .bin
        if is_plain_prefix(dataset_path):
            read_index_arrays(dataset_path)
        else:
            validate_against_indexed_dataset(dataset_path)
        return IndexedDataset(dataset_path, multimodal=False, mmap=config.mmap_bin_files)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return MegatronDataset._key_config_attributes() + ["pack_algorithm", "overlong", "context_parallel_size"]

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, idx) -> Dict[str, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"row {idx} out of range: this {self.index_split.name} split has {len(self)} rows")
        ints, floats, kinds, bounds, scalars = self.row_gather.blocks(int(self.shuffle_index[idx]))
        # loss_weights come back as sample weight x loss_mask; token rules multiply in here
        if self._token_rules:
            floats[1] = self.weighter.token_weights(floats[1], ints[1], kinds)
        # each field is a view of one of four blocks: 5 tensors instead of 12 per row
        item = dict(zip(INT_FIELDS, torch.from_numpy(ints).unbind()))
        item["loss_mask"], item["loss_weights"] = torch.from_numpy(floats).unbind()
        item["cu_seqlens"], item["cu_seqlens_padded"] = torch.from_numpy(bounds).unbind()
        item["num_segments"], item["max_seqlen"], item["num_samples"] = torch.from_numpy(scalars).unbind()
        return item

    # ---- rows and weights ------------------------------------------------------------------

    def gather_row(self, row: int) -> Dict[str, Any]:
        """Row `row` of the pack index (not shuffled) as numpy arrays (see `RowGather.gather`),
        loss_weights before token rules."""
        return self.row_gather.gather(row)

    @property
    def sidecar(self):
        if self._sidecar is None:
            self._sidecar = sample_metadata(self.dataset.path_prefix, self.config.tokenizer_spec)
        return self._sidecar

    @property
    def row_gather(self) -> RowGather:
        if self._gather is None:
            index = self.dataset.index
            dtype = np.dtype(index.dtype)
            bin_path = get_bin_path(self.dataset.path_prefix)
            # our own map of the whole .bin: the C++ gather indexes it by element offset
            tokens = np.memmap(bin_path, dtype=dtype, mode="r") if os.path.getsize(bin_path) else np.empty(0, dtype)
            side, config = self.sidecar, self.config
            pointers, lengths = document_table(index.sequence_lengths, index.document_indices)
            self._gather = RowGather(
                tokens, pointers, lengths,
                side.task_id, side.span_offsets, side.spans, side.span_kind, self.pack_index,
                config.sequence_length, config.pad_id, config.cp_multiple, sample_weights=self.sample_weights,
            )
            self._token_rules = self.weighter is not None and self.weighter.has_token_rules
        return self._gather

    @property
    def weighter(self):
        """The `Weighter` of this prefix (None without weighting), built once."""
        if self.config.weighting is None:
            return None
        if self._weighter is None:
            from megatron_tokweight.weighting import Weighter

            side = self.sidecar
            self._weighter = Weighter.from_config(
                self.config.weighting, task_names=side.task_names, span_kinds=side.span_kinds,
                vocab_size=side.tokenizer.get("vocab_size"), prefix=self.dataset.path_prefix,
            )
        return self._weighter

    @property
    def sample_weights(self) -> Optional[np.ndarray]:
        """float32 [samples of the prefix]: w_i from n as trained, 0 outside this split; computed
        once (None without weighting). K (annotations per input) counts this split's samples."""
        if self._sample_weights is None and self.weighter is not None:
            side, split = self.sidecar, np.asarray(self.indices)
            weights = np.zeros(len(self.n_trained), dtype=np.float32)
            weights[split] = self.weighter.sample_weights(
                side.task_id[split], self.n_trained[split], side.group_id[split]
            )
            self._sample_weights = weights
        return self._sample_weights

    def __getstate__(self):
        # DataLoader workers re-open the memory maps instead of receiving copies of them
        state = self.__dict__.copy()
        state["_gather"] = None
        state["_sidecar"] = None
        return state

    # ---- cached indices --------------------------------------------------------------------

    def _cache_dir(self) -> str:
        if self.config.path_to_cache:
            return self.config.path_to_cache
        prefix = os.path.abspath(self.dataset.path_prefix)
        return os.path.join(os.path.dirname(prefix), "cache", f"{type(self).__name__}_indices")

    def _load_or_build_indices(self):
        from filelock import FileLock

        directory = self._cache_dir()
        base = os.path.join(directory, f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}")
        paths = {name: f"{base}-{name}" for name in
                 ("pieces.npy", "row_ptr.npy", "shuffle_index.npy", "pack_stats.json", "description.txt")}
        if not all(map(os.path.isfile, paths.values())):
            os.makedirs(directory, exist_ok=True)
            with FileLock(f"{base}.lock"):
                if not all(map(os.path.isfile, paths.values())):
                    return self._build_and_save(paths)
        self.cache_hit = True
        log_single_rank(logger, logging.INFO, f"Load the {type(self).__name__} {self.index_split.name} indices")
        loading = paths["pieces.npy"]
        try:
            index = PackIndex(pieces=np.load(loading, mmap_mode="r"),
                              row_ptr=np.load(loading := paths["row_ptr.npy"], mmap_mode="r"))
            with open(loading := paths["pack_stats.json"]) as f:
                stats = json.load(f)
            shuffle_index = np.load(loading := paths["shuffle_index.npy"], mmap_mode="r")
            _check_cached(index, shuffle_index, stats, paths)
        except (OSError, ValueError, EOFError) as err:  # JSONDecodeError is a ValueError
            raise DataFormatError(
                f"{loading}: damaged index cache ({err}); delete the files {base}-* (or the whole cache "
                f"directory {directory}) and they are rebuilt"
            ) from err
        return index, shuffle_index, stats

    def _build_and_save(self, paths):
        t0 = time.perf_counter()
        index, shuffle_index, stats = self._build_indices()
        stats["seconds"] = time.perf_counter() - t0
        arrays = {"pieces.npy": index.pieces, "row_ptr.npy": index.row_ptr, "shuffle_index.npy": shuffle_index}
        for name, array in arrays.items():
            with atomic_file(paths[name]) as f:
                np.save(f, array, allow_pickle=False)
        with atomic_file(paths["pack_stats.json"], "w") as f:
            json.dump(stats, f, indent=1)
        # the description goes last: its presence means the other files are complete
        with atomic_file(paths["description.txt"], "w") as f:
            f.write(self.unique_description)
        return index, shuffle_index, stats

    def _build_indices(self):
        config = self.config
        log_single_rank(
            logger, logging.INFO, f"Build and save the {type(self).__name__} {self.index_split.name} indices"
        )
        random_state = np.random.RandomState(config.random_seed)
        # the packing order: next-fit keeps it; bfd/ffd break length ties by it
        order = random_state.permutation(np.asarray(self.indices, dtype=np.int64))
        lengths = self.sidecar.lengths[order]
        index, stats = build_pack_index(
            lengths, order, config.sequence_length, config.pack_algorithm, config.overlong, config.cp_multiple
        )
        rows = index.num_rows
        if self.num_samples is None:
            epochs = 1
        elif rows == 0:
            if self.num_samples > 0:
                raise DataFormatError(
                    f"{self.dataset_path}: the {self.index_split.name} split packs into 0 rows "
                    f"({len(order)} samples, {stats.dropped} dropped) but {self.num_samples} rows were requested"
                )
            epochs = 1
        else:
            epochs = max(1, -(-self.num_samples // rows))
        # every epoch visits every row once, each epoch in its own order
        shuffle_index = np.concatenate(
            [random_state.permutation(rows) for _ in range(epochs)] if rows else [np.zeros(0, np.int64)]
        ).astype(np.int64)
        stats = stats.as_dict()
        stats["epochs"] = epochs
        return index, shuffle_index, stats


def build_packed_datasets(config: PackedDatasetConfig, train_val_test_num_samples: Sequence[Optional[int]],
                          is_built_on_rank: Callable[[], bool] = lambda: True):
    """(train, valid, test) `PackedDataset`s (or blends of them) through Megatron-Core's builder.
    Frozen long-context scores are attached on top (`longcontext.score_sidecar.with_scores`)."""
    return BlendedMegatronDatasetBuilder(
        PackedDataset, list(train_val_test_num_samples), is_built_on_rank, config).build()


def _check_cached(index: PackIndex, shuffle_index, stats, paths) -> None:
    """ValueError when cached arrays do not fit together (a file from another build or cut short)."""
    pieces, row_ptr = index.pieces, index.row_ptr
    if pieces.ndim != 2 or pieces.shape[1] != 5 or row_ptr.ndim != 1 or len(row_ptr) < 1:
        raise ValueError(f"pieces {pieces.shape} / row_ptr {row_ptr.shape} are not a pack index")
    if int(row_ptr[-1]) != len(pieces) or not isinstance(stats, dict) or stats.get("rows") != len(row_ptr) - 1:
        raise ValueError(f"{paths['row_ptr.npy']} does not describe {paths['pieces.npy']}")
    rows = len(row_ptr) - 1
    if shuffle_index.ndim != 1 or (len(shuffle_index) and (shuffle_index.min() < 0 or shuffle_index.max() >= rows)):
        raise ValueError(f"{paths['shuffle_index.npy']} names rows outside [0, {rows})")
