"""Before spawning: `plan_run` checks everything a user can get wrong (missing prefixes, mixed
vocabularies or tokenizers, TP against heads and vocabulary, `overlong: drop` leaving nothing,
too few eval rows, an incompatible checkpoint) and builds the dataset caches; the `RunPlan` it
returns travels to every rank. `build_datasets` is what every rank then opens.
"""
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from megatron_tokweight.errors import ConfigError
from megatron_tokweight.trainer.config import TrainConfig


@dataclass
class RunPlan:
    """What the launching process resolved and checked; travels to every rank."""

    config: TrainConfig
    vocab_size: int
    task_names: List[str]  # the union over the training prefixes (index = global task id)
    task_tables: List[List[int]]  # per training prefix: its task id -> global task id
    eval_task_names: List[List[str]]
    resume_step: int = 0
    tokenizer: Optional[Dict[str, Any]] = None  # the training prefixes' tokenizer spec (checkpoint meta)
    # [{"role", "prefix", "identity"}]: the content of every prefix read (checkpoint meta, resume check)
    datasets: Optional[List[Dict[str, str]]] = None


def _require_prefix(prefix: str, where: str) -> None:
    # no sidecar is fine: a plain Megatron prefix, read as text samples
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.exists(p)]
    if missing:
        raise ConfigError(
            f"{where}: dataset prefix {prefix!r} is incomplete ({', '.join(missing)} not found); "
            "create it with `tokweight prepare INPUT.jsonl -o PREFIX` (or Megatron-LM's tools/preprocess_data.py)"
        )


def blend_tokenizer(config: TrainConfig) -> Dict[str, Any]:
    """The run's tokenizer spec: data.tokenizer when given, else the first prepared prefix's
    (plain Megatron prefixes take it); {} when neither names one."""
    from megatron_tokweight.data.plain_prefix import is_plain_prefix
    from megatron_tokweight.data.sidecar import read_sidecar
    from megatron_tokweight.data.tokenizer import load_tokenizer

    if config.data.tokenizer is not None:
        return load_tokenizer(config.data.tokenizer).spec()
    for prefix in config.data.prefixes + config.data.eval_prefixes:
        if not is_plain_prefix(prefix):
            return dict(read_sidecar(prefix).tokenizer)
    return {}


def dataset_config(config: TrainConfig, prefixes, weights, weighting):
    from megatron_tokweight.data.packed_dataset import PackedDatasetConfig

    return PackedDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.data.seq_length,
        blend=(list(prefixes), None if weights is None else list(weights)),
        split="100,0,0",
        # a blend's own indices are cached only with an explicit directory
        path_to_cache=config.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache"),
        pack_algorithm=config.data.pack_algorithm,
        overlong=config.data.overlong,
        weighting=weighting,
        plain_prefix_tokenizer=blend_tokenizer(config) or None,
    )


def build_datasets(config: TrainConfig, is_built_on_rank: Callable[[], bool] = lambda: True):
    """(training dataset, [eval dataset per eval prefix]); collective when torch.distributed is up."""
    from megatron_tokweight.data.packed_dataset import build_packed_datasets
    from megatron_tokweight.longcontext.score_sidecar import with_scores

    rows = config.steps * config.rows_per_step
    train_config = dataset_config(config, config.data.prefixes, config.data.weights, config.weighting)
    # only the train split is used (split "100,0,0"); 0 rows, not None, for the others when blended;
    # with the frozen long-context scorer the rows carry every prefix's scores
    train = with_scores(build_packed_datasets(train_config, [rows, 0, 0], is_built_on_rank), config.long_context)[0]
    # held-out loss is the plain per-task mean: no weighting
    evals = [build_packed_datasets(dataset_config(config, [prefix], None, None), [None, None, None], is_built_on_rank)[0]
             for prefix in config.data.eval_prefixes]
    return train, evals


def plan_run(config: TrainConfig) -> RunPlan:
    """Check everything that can be checked before spawning; build the dataset caches."""
    import numpy as np

    from megatron_tokweight.common.process_groups import one_process_group
    from megatron_tokweight.data.plain_prefix import sample_metadata
    from megatron_tokweight.model import checkpoint

    for i, prefix in enumerate(config.data.prefixes):
        _require_prefix(prefix, f"data.prefixes[{i}]")
    for i, prefix in enumerate(config.data.eval_prefixes):
        _require_prefix(prefix, f"data.eval_prefixes[{i}]")
    spec = blend_tokenizer(config)
    if not spec:
        raise ConfigError(
            "data.tokenizer is needed: no prefix of data.prefixes or data.eval_prefixes has a sidecar naming a "
            "tokenizer (plain Megatron prefixes); set it to 'byte' or the tokenizer.json they were tokenized with"
        )
    sidecars = [sample_metadata(p, spec) for p in config.data.prefixes]
    eval_sidecars = [sample_metadata(p, spec) for p in config.data.eval_prefixes]
    vocab_sizes = {s.tokenizer["vocab_size"] for s in sidecars + eval_sidecars}
    if len(vocab_sizes) != 1:
        raise ConfigError(f"the prefixes were prepared with different vocabularies ({sorted(vocab_sizes)})")
    vocab_size = vocab_sizes.pop()
    config.model_config(vocab_size)  # TP vs heads / padded vocab, shapes
    tokenizer = training_tokenizer(config.data.prefixes, sidecars)

    seq = config.data.seq_length
    for prefix, side in zip(config.data.prefixes + config.data.eval_prefixes, sidecars + eval_sidecars):
        lengths = np.asarray(side.lengths)
        fits = int((lengths <= seq).sum())
        if config.data.overlong == "drop" and fits == 0:
            raise ConfigError(
                f"{prefix}: every one of its {len(lengths)} samples is longer than data.seq_length={seq} "
                f"(shortest {int(lengths.min()) if len(lengths) else 0}, longest {int(lengths.max()) if len(lengths) else 0} "
                "tokens) and overlong=drop drops them all; raise data.seq_length or use overlong: truncate or split"
            )

    task_names: List[str] = []
    for side in sidecars:
        for name in side.task_names:
            if name not in task_names:
                task_names.append(name)
    tables = [[task_names.index(n) for n in side.task_names] for side in sidecars]

    with one_process_group():  # a blend's own index cache asks for the rank
        train, evals = build_datasets(config)  # data errors surface here; caches are written
    if trained_targets_of(train) == 0:
        raise ConfigError(
            f"data.prefixes: no sample of {', '.join(config.data.prefixes)} has a target once packed (no "
            "assistant content, or every answer cut off by data.seq_length / overlong): there is nothing to "
            "train on"
        )
    for prefix, ds in zip(config.data.eval_prefixes, evals):
        rows = len(ds) if config.eval_max_rows is None else min(len(ds), config.eval_max_rows)
        if rows <= (config.data_parallel_size - 1) * config.micro_batch_size:
            raise ConfigError(
                f"{prefix}: {rows} eval rows leave some of the data_parallel_size={config.data_parallel_size} "
                f"ranks without a micro-batch of {config.micro_batch_size} rows; evaluate more rows"
            )

    datasets = dataset_identities(config, sidecars + eval_sidecars)
    resume_step = 0
    if config.resume:
        meta = checkpoint.find_latest(config.save_dir)
        if meta is not None:
            checkpoint.check_compatible(meta, config.identity(), config.world_size, datasets)
            resume_step = meta.step
    return RunPlan(config, vocab_size, task_names, tables, [list(s.task_names) for s in eval_sidecars], resume_step,
                   tokenizer, datasets)


def dataset_identities(config: TrainConfig, sidecars) -> List[Dict[str, str]]:
    """[{"role", "prefix", "identity"}] of the training then the eval prefixes (content, not path)."""
    from megatron_tokweight.data.content_identity import dataset_identity

    roles = [f"data.prefixes[{i}]" for i in range(len(config.data.prefixes))] + \
        [f"data.eval_prefixes[{i}]" for i in range(len(config.data.eval_prefixes))]
    return [{"role": role, "prefix": prefix, "identity": dataset_identity(prefix, side)}
            for role, prefix, side in zip(roles, config.data.prefixes + config.data.eval_prefixes, sidecars)]


def trained_targets_of(dataset) -> int:
    """Targets the rows of a `PackedDataset` (or a blend of them, scored or not) train, per epoch."""
    members = getattr(dataset, "datasets", None)
    if members is not None:
        return sum(trained_targets_of(member) for member in members)
    inner = getattr(dataset, "dataset", None)
    if not hasattr(dataset, "n_trained") and inner is not None:  # ScoredRows
        return trained_targets_of(inner)
    return int(dataset.n_trained[dataset.indices].sum())


def training_tokenizer(prefixes, sidecars) -> Dict[str, Any]:
    """The tokenizer spec the training prefixes share (their `path` aside: a copied tokenizer.json
    with the same contents is the same tokenizer); ConfigError naming the field otherwise."""
    from megatron_tokweight.data.tokenizer import tokenizer_differences

    first = sidecars[0].tokenizer
    for prefix, side in zip(prefixes[1:], sidecars[1:]):
        diffs = tokenizer_differences(first, side.tokenizer)
        if diffs:
            raise ConfigError(
                f"data.prefixes: {prefixes[0]} and {prefix} were prepared with different tokenizers "
                f"({'; '.join(diffs)}); prepare them with one tokenizer"
            )
    return dict(first)
