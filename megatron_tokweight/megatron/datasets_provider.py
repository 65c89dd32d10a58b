"""Megatron-LM's `train_valid_test_datasets_provider` for packed, weighted rows.

`packed_dataset_config_from_args(args)` maps Megatron-LM's data arguments (`--data-path` or the
per-split paths, `--split`, `--seq-length`, `--seed`, `--data-cache-path`,
`--context-parallel-size`, ...) plus the weighting and packing flags onto a
`PackedDatasetConfig`; `packed_dataset.build_packed_datasets` runs Megatron-Core's
`BlendedMegatronDatasetBuilder(PackedDataset, ...)`, so blends and splits behave as with
`GPTDataset`. With the frozen long-context scorer (`--long-context-scorer frozen`, the default
when any `--long-context-*` flag is given) every split's rows carry the scores `tokweight score`
wrote next to each prefix, and their `loss_weights` the long-context weights
(`longcontext.score_sidecar.attach_scores`).

The datasets are built on rank 0 of every TP group, on every pipeline stage (Megatron-LM's
`pretrain_gpt` builds them on the first and last stages only): middle stages need each
micro-batch's `cu_seqlens` for THD attention, and every stage of one data-parallel replica reads
the same rows, so each stage also computes the same normalizer.

A `--data-path` prefix without a sidecar (a plain Megatron `.bin`/`.idx` from Megatron-LM's
`tools/preprocess_data.py`) is read as text samples, one per document, blendable with prepared
prefixes; it takes their tokenizer, or `--pack-pad-id` when none has a sidecar.
"""
import argparse
import os
from typing import List, Tuple

from megatron_tokweight.errors import ConfigError


def _read_blend_file(path: str) -> List[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError as err:
        raise ConfigError(f"cannot read the data-args file {path}: {err}") from None


def blend_from_args(args: argparse.Namespace):
    """(blend, blend_per_split) from Megatron-LM's data arguments (`--data-path` "[W1] P1 [W2] P2 ...",
    `--data-args-path` FILE, `--train/valid/test-data-path`, `--per-split-data-args-path` JSON)."""
    import json

    from megatron.core.datasets.utils import get_blend_from_list

    data_path = getattr(args, "data_path", None)
    data_args_path = getattr(args, "data_args_path", None)
    if data_path is not None or data_args_path is not None:
        if data_path is not None and data_args_path is not None:
            raise ConfigError("give --data-path or --data-args-path, not both")
        return get_blend_from_list(data_path if data_path is not None else _read_blend_file(data_args_path)), None
    per_split_file = getattr(args, "per_split_data_args_path", None)
    if per_split_file is not None:
        try:
            with open(per_split_file) as f:
                per_split = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read --per-split-data-args-path {per_split_file}: {err}") from None
        paths = [per_split.get(name) for name in ("train", "valid", "test")]
        paths = [p.split() if isinstance(p, str) else p for p in paths]
    else:
        paths = [getattr(args, f"{name}_data_path", None) for name in ("train", "valid", "test")]
    if all(p is None for p in paths):
        raise ConfigError(
            "no data: give --data-path PREFIX (prefixes prepared with `tokweight prepare`) or "
            "--train-data-path/--valid-data-path/--test-data-path"
        )
    return None, [get_blend_from_list(p) for p in paths]


def packed_dataset_config_from_args(args: argparse.Namespace):
    """A `PackedDatasetConfig` from Megatron-LM arguments plus `extra_args_provider`'s flags."""
    from megatron_tokweight.data.packed_dataset import PackedDatasetConfig
    from megatron_tokweight.megatron.arguments import weighting_config_from_args

    blend, blend_per_split = blend_from_args(args)
    optional = {}
    if getattr(args, "pack_algorithm", None) is not None:
        optional["pack_algorithm"] = args.pack_algorithm
    if getattr(args, "pack_overlong", None) is not None:
        optional["overlong"] = args.pack_overlong
    if getattr(args, "pack_pad_id", None) is not None:
        optional["pad_id"] = args.pack_pad_id
    if "pad_id" not in optional:
        _require_a_tokenizer(blend, blend_per_split)
    split = getattr(args, "split", None)
    if blend is not None and split is None:
        split = "969, 30, 1"  # Megatron-LM's default when --data-path is given
    return PackedDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split if blend is not None else None,
        num_dataset_builder_threads=getattr(args, "num_dataset_builder_threads", 1),
        path_to_cache=getattr(args, "data_cache_path", None),
        mmap_bin_files=getattr(args, "mmap_bin_files", True),
        context_parallel_size=getattr(args, "context_parallel_size", 1),
        weighting=weighting_config_from_args(args),
        **optional,
    )


def _require_a_tokenizer(blend, blend_per_split) -> None:
    """ConfigError naming --pack-pad-id when every prefix is a plain Megatron one (no sidecar
    names a tokenizer, so nothing gives the pad id)."""
    from megatron_tokweight.data.plain_prefix import is_plain_prefix

    blends = [blend] if blend is not None else [b for b in blend_per_split or [] if b is not None]
    prefixes = [prefix for b in blends for prefix in b[0]]
    if prefixes and all(is_plain_prefix(prefix) for prefix in prefixes):
        raise ConfigError(
            f"no --data-path prefix has a sidecar naming a tokenizer ({', '.join(prefixes)} are plain Megatron "
            "prefixes): pass --pack-pad-id ID, the token id that pads packed rows (e.g. your tokenizer's "
            "end-of-document id)"
        )


def report_names(config) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(task names, dataset names) for the per-task and per-dataset loss reports.

    Task names when every prefix's sidecar lists the same tasks (task ids index that list);
    dataset names when `blend` holds several prefixes (a blend's `dataset_id` indexes them, the
    same in every split). Otherwise empty: that report is off.
    """
    from megatron_tokweight.data.plain_prefix import sample_metadata

    prefixes = config.prefixes()
    task_lists = {tuple(sample_metadata(prefix).task_names) for prefix in prefixes}
    tasks = task_lists.pop() if len(task_lists) == 1 else ()
    datasets: Tuple[str, ...] = ()
    if config.blend is not None and len(config.blend[0]) > 1:
        names = [os.path.basename(os.fspath(prefix)) or os.fspath(prefix) for prefix in config.blend[0]]
        datasets = tuple(name if names.count(name) == 1 else f"{i}:{name}" for i, name in enumerate(names))
    return tasks, datasets


def report_names_from_args(args: argparse.Namespace) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    return report_names(packed_dataset_config_from_args(args))


def tokenizer_vocab_size(config) -> int:
    """The vocabulary size the prefixes' tokenizer records (0 when only plain Megatron prefixes,
    which record none, are given)."""
    return int(config.tokenizer_spec.get("vocab_size") or 0)


def check_vocab_size(args: argparse.Namespace) -> None:
    """ConfigError unless Megatron-LM's (padded) model vocabulary covers the prepared token ids
    (and the pad id: plain prefixes are taken to be tokenized with the model's tokenizer)."""
    config = packed_dataset_config_from_args(args)
    vocab = max(tokenizer_vocab_size(config), config.pad_id + 1)
    padded = getattr(args, "padded_vocab_size", None)
    if padded is None or padded < vocab:
        raise ConfigError(
            f"the data was prepared with a vocabulary of {vocab} token ids but the model's (padded) vocabulary is "
            f"{padded}; pass --tokenizer-type NullTokenizer --vocab-size {vocab} (or the tokenizer the data was "
            "prepared with)"
        )


def is_dataset_built_on_rank() -> bool:
    """Rank 0 of each TP group, every pipeline stage (module docstring)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank() == 0


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron-LM hook: `pretrain(train_valid_test_datasets_provider, ...)`."""
    from megatron.training import get_args, print_rank_0

    from megatron_tokweight.data.packed_dataset import build_packed_datasets
    from megatron_tokweight.longcontext.score_sidecar import with_scores
    from megatron_tokweight.megatron.arguments import long_context_config_from_args

    args = get_args()
    config = packed_dataset_config_from_args(args)
    print_rank_0("> building packed, token-weighted train, validation and test datasets ...")
    datasets = with_scores(build_packed_datasets(config, train_val_test_num_samples, is_dataset_built_on_rank),
                           long_context_config_from_args(args))
    print_rank_0("> finished creating packed datasets ...")
    return datasets


# Megatron-LM calls a provider marked distributed on every rank (it decides per rank itself)
train_valid_test_datasets_provider.is_distributed = True
