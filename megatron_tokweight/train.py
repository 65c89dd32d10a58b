"""`tokweight train --config FILE.yaml`: token-weighted training of a small GPTModel on CPU.

The loop, per step (every rank of a TP x DP world of gloo processes it spawns itself):

1. TP rank 0 of each data-parallel replica reads its micro-batches of packed rows (a
   `PackedDataset` built through Megatron's `BlendedMegatronDatasetBuilder`); `megatron.batch`
   flattens them to THD and broadcasts them over the TP group;
   with `long_context` (`longcontext.LongContextConfig`), the frozen scorer's weights come with
   the rows (`longcontext.score_sidecar.attach_scores`), and the unfrozen scorer (or rho1) has
   the model score the step's micro-batches under no_grad (`longcontext.scorer_online`);
2. the global normalizer Z is computed before the forward (`loss.LossSettings.global_batch_stats`,
   one all-reduce over DP), from the final weights;
3. `schedule.forward_backward` runs Megatron's loss protocol (the weighted loss function of
   `megatron_tokweight.loss`) and reduces the gradients over DP;
4. gradient clipping by the global norm (TP-sharded and replicated parameters each counted
   once), AdamW with linear warm-up and cosine decay to `min_lr`;
5. logging of the loss and per-task reports (`loss.reduce_reports`), held-out evaluation
   (unweighted per-task mean loss), checkpoints (`megatron_tokweight.checkpoint`).

Rows are consumed in a fixed order: step s, micro-batch m, DP rank d read rows
s*G + m*(mbs*DP) + d*mbs ... + mbs of the training dataset (G = mbs * M * DP rows per step), so
a resumed run reads exactly the rows an uninterrupted one would.

Everything a user can get wrong is checked in the launching process before any rank starts:
unknown config keys, missing prefixes, a TP size that does not divide the heads or the padded
vocabulary, a sequence length that leaves nothing to train under `overlong: drop`, and a
checkpoint written with a different config.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from megatron_tokweight.errors import ConfigError, reject_unknown_keys

# training-loop fields that may change between a run and its resumption
NON_IDENTITY_FIELDS = ("log_interval", "eval_interval", "save_dir", "save_interval", "resume",
                       "exit_interval", "eval_max_rows")
EXCLUDED_MODEL_FIELDS = ("vocab_size", "seq_length", "tensor_model_parallel_size")


def _positive_int(value, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(value, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum:
        raise ConfigError(f"{where} must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


@dataclass
class DataConfig:
    """Prepared prefixes (`tokweight prepare` output) and how their samples are packed."""

    prefixes: List[str] = field(default_factory=list)
    weights: Optional[List[float]] = None  # blend weights, required with several prefixes
    eval_prefixes: List[str] = field(default_factory=list)  # held-out sets, evaluated whole
    seq_length: int = 512
    pack_algorithm: str = "bfd"
    overlong: str = "truncate"
    cache_dir: Optional[str] = None  # packing index cache (default: next to each prefix)

    def __post_init__(self):
        for name in ("prefixes", "eval_prefixes"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
                raise ConfigError(f"data.{name} must be a list of dataset prefixes, got {value!r}")
            setattr(self, name, [os.fspath(p) for p in value])
        if not self.prefixes:
            raise ConfigError("data.prefixes is empty: name at least one prepared prefix (PREFIX of PREFIX.bin/.idx)")
        if self.weights is not None:
            if not isinstance(self.weights, (list, tuple)) or len(self.weights) != len(self.prefixes):
                raise ConfigError(
                    f"data.weights must list one weight per prefix ({len(self.prefixes)}), got {self.weights!r}"
                )
            self.weights = [_float(w, f"data.weights[{i}]") for i, w in enumerate(self.weights)]
            if sum(self.weights) <= 0:
                raise ConfigError("data.weights must not all be 0")
        elif len(self.prefixes) > 1:
            raise ConfigError(
                f"data.weights is required with {len(self.prefixes)} prefixes (the blend's sampling weights)"
            )
        _positive_int(self.seq_length, "data.seq_length", 2)
        from megatron_tokweight.rows import check_pack_options

        check_pack_options(self.seq_length, self.pack_algorithm, self.overlong)


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up to `lr`, then cosine decay to `min_lr` at the last step."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables

    def __post_init__(self):
        for name in ("lr", "min_lr", "weight_decay", "eps", "clip_grad"):
            setattr(self, name, _float(getattr(self, name), f"optimizer.{name}"))
        for name in ("beta1", "beta2"):
            value = _float(getattr(self, name), f"optimizer.{name}")
            if value >= 1.0:
                raise ConfigError(f"optimizer.{name} must be < 1, got {value}")
            setattr(self, name, value)
        if self.min_lr > self.lr:
            raise ConfigError(f"optimizer.min_lr={self.min_lr} exceeds optimizer.lr={self.lr}")
        _positive_int(self.warmup_steps, "optimizer.warmup_steps", 0)

    def learning_rate(self, step: int, total_steps: int) -> float:
        """The learning rate of step `step` (0-based) of `total_steps`."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainConfig:
    """A training run. YAML sections `data`, `model` (ModelConfig fields but vocab_size,
    seq_length and the TP size, which come from the data and from `tensor_parallel_size`),
    `weighting` (a preset name or WeightingConfig fields; null = every target 1.0),
    `optimizer` and `long_context` (LongContextConfig fields; null = off); the other keys are
    top-level."""

    data: DataConfig = field(default_factory=DataConfig)
    model: Dict[str, Any] = field(default_factory=dict)
    weighting: Any = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    long_context: Any = None
    steps: int = 100
    micro_batch_size: int = 1  # packed rows per micro-batch
    num_micro_batches: int = 4  # per data-parallel rank and step
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    seed: int = 1234
    calculate_per_token_loss: bool = False  # the Megatron setting the loss is scaled for
    log_interval: int = 10
    eval_interval: int = 0  # 0: evaluate at the end only (when eval_prefixes are given)
    eval_max_rows: Optional[int] = None  # evaluate at most this many rows per eval prefix
    save_dir: Optional[str] = None
    save_interval: int = 0  # 0: save only at the end (when save_dir is set)
    resume: bool = False  # continue from save_dir's latest checkpoint when there is one
    exit_interval: Optional[int] = None  # stop (after saving) once this step is done

    def __post_init__(self):
        if isinstance(self.data, Mapping):
            self.data = _section(DataConfig, self.data, "data")
        if isinstance(self.optimizer, Mapping):
            self.optimizer = _section(OptimizerConfig, self.optimizer, "optimizer")
        if not isinstance(self.model, Mapping):
            raise ConfigError(f"model must be a mapping of model fields, got {self.model!r}")
        from megatron_tokweight.model import ModelConfig

        known = [f.name for f in fields(ModelConfig) if f.name not in EXCLUDED_MODEL_FIELDS]
        for key in self.model:
            if key in EXCLUDED_MODEL_FIELDS:
                raise ConfigError(
                    f"model.{key} is not set in the model section: vocab_size comes from the prepared data, "
                    "seq_length from data.seq_length, the TP size from tensor_parallel_size"
                )
        reject_unknown_keys(self.model, known, "model")
        self.model = dict(self.model)
        self.weighting = _weighting(self.weighting)
        self.long_context = _long_context(self.long_context, self.data.seq_length)
        for name in ("steps", "micro_batch_size", "num_micro_batches", "tensor_parallel_size",
                     "data_parallel_size", "log_interval"):
            _positive_int(getattr(self, name), name)
        for name in ("eval_interval", "save_interval", "seed"):
            _positive_int(getattr(self, name), name, 0)
        for name in ("eval_max_rows", "exit_interval"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
        for name in ("calculate_per_token_loss", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if (self.save_interval or self.resume or self.exit_interval) and not self.save_dir:
            raise ConfigError("save_interval, resume and exit_interval need save_dir")

    # ---- derived ---------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.num_micro_batches * self.data_parallel_size

    def model_config(self, vocab_size: int):
        from megatron_tokweight.model import ModelConfig

        return ModelConfig(vocab_size=vocab_size, seq_length=self.data.seq_length,
                           tensor_model_parallel_size=self.tensor_parallel_size, **self.model)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["weighting"] = None if self.weighting is None else self.weighting.to_dict()
        if self.long_context is None:
            del out["long_context"]  # so runs without it keep their identity (and checkpoints)
        else:
            out["long_context"] = self.long_context.to_dict()
        return out

    def identity(self) -> Dict[str, Any]:
        """The fields a resumed run must repeat exactly (JSON-safe)."""
        out = self.to_dict()
        for name in NON_IDENTITY_FIELDS:
            out.pop(name, None)
        return json.loads(json.dumps(out))

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, mapping: Mapping, where: str = "config") -> "TrainConfig":
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where}: expected a mapping of training fields, got {type(mapping).__name__}")
        reject_unknown_keys(mapping, [f.name for f in fields(cls)], where)
        try:
            return cls(**dict(mapping))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    @classmethod
    def from_file(cls, path, overrides: Sequence[str] = ()) -> "TrainConfig":
        """From a YAML file, then `overrides` ("dotted.key=value", value parsed as YAML)."""
        import yaml

        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of training fields, got {type(data).__name__}")
        # relative prefixes are relative to the config file
        base = os.path.dirname(os.path.abspath(path))
        data_section = data.get("data")
        if isinstance(data_section, dict):
            for key in ("prefixes", "eval_prefixes"):
                value = data_section.get(key)
                if isinstance(value, str):
                    value = [value]
                if isinstance(value, list):
                    data_section[key] = [os.path.normpath(os.path.join(base, p)) if isinstance(p, str) else p
                                         for p in value]
        apply_overrides(data, overrides)
        return cls.from_dict(data, where=str(path))


def _section(cls, mapping: Mapping, where: str):
    reject_unknown_keys(mapping, [f.name for f in fields(cls)], where)
    return cls(**dict(mapping))


def _weighting(value):
    from megatron_tokweight.weighting import WeightingConfig

    if value is None or isinstance(value, WeightingConfig):
        return value
    if isinstance(value, str):
        return WeightingConfig(preset=value)
    if isinstance(value, Mapping):
        return WeightingConfig.from_dict(value)
    raise ConfigError(f"weighting must be null, a preset name or a mapping of weighting fields, got {value!r}")


def _long_context(value, seq_length: int):
    from megatron_tokweight.longcontext import LongContextConfig

    if value is None:
        return None
    if isinstance(value, Mapping):
        value = LongContextConfig.from_dict(value)
    if not isinstance(value, LongContextConfig):
        raise ConfigError(f"long_context must be null or a mapping of long-context fields, got {value!r}")
    value.check_sequence_length(seq_length)
    return value


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> None:
    """Apply "dotted.key=value" overrides in place (values parsed as YAML scalars/lists)."""
    import yaml

    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. optimizer.lr=1e-3), got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value


# ----------------------------------------------------------------------------- before spawning


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


def _require_prefix(prefix: str, where: str) -> None:
    from megatron_tokweight.sidecar import sidecar_dir

    missing = [p for p in (prefix + ".bin", prefix + ".idx", sidecar_dir(prefix)) if not os.path.exists(p)]
    if missing:
        raise ConfigError(
            f"{where}: dataset prefix {prefix!r} is incomplete ({', '.join(missing)} not found); "
            "create it with `tokweight prepare INPUT.jsonl -o PREFIX`"
        )


def dataset_config(config: TrainConfig, prefixes, weights, weighting):
    from megatron_tokweight.packed_dataset import PackedDatasetConfig

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
    )


def build_datasets(config: TrainConfig, is_built_on_rank: Callable[[], bool] = lambda: True):
    """(training dataset, [eval dataset per eval prefix]); collective when torch.distributed is up."""
    from megatron_tokweight.packed_dataset import build_packed_datasets

    rows = config.steps * config.rows_per_step
    train_config = dataset_config(config, config.data.prefixes, config.data.weights, config.weighting)
    # only the train split is used (split "100,0,0"); 0 rows, not None, for the others when blended;
    # with the frozen long-context scorer the rows carry every prefix's scores
    train = build_packed_datasets(train_config, [rows, 0, 0], is_built_on_rank, config.long_context)[0]
    # held-out loss is the plain per-task mean: no weighting
    evals = [build_packed_datasets(dataset_config(config, [prefix], None, None), [None, None, None], is_built_on_rank)[0]
             for prefix in config.data.eval_prefixes]
    return train, evals


def plan_run(config: TrainConfig) -> RunPlan:
    """Check everything that can be checked before spawning; build the dataset caches."""
    import numpy as np

    from megatron_tokweight import checkpoint
    from megatron_tokweight.sidecar import read_sidecar

    for i, prefix in enumerate(config.data.prefixes):
        _require_prefix(prefix, f"data.prefixes[{i}]")
    for i, prefix in enumerate(config.data.eval_prefixes):
        _require_prefix(prefix, f"data.eval_prefixes[{i}]")
    sidecars = [read_sidecar(p) for p in config.data.prefixes]
    eval_sidecars = [read_sidecar(p) for p in config.data.eval_prefixes]
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

    train, evals = build_datasets(config)  # data errors surface here; caches are written
    for prefix, ds in zip(config.data.eval_prefixes, evals):
        rows = len(ds) if config.eval_max_rows is None else min(len(ds), config.eval_max_rows)
        if rows <= (config.data_parallel_size - 1) * config.micro_batch_size:
            raise ConfigError(
                f"{prefix}: {rows} eval rows leave some of the data_parallel_size={config.data_parallel_size} "
                f"ranks without a micro-batch of {config.micro_batch_size} rows; evaluate more rows"
            )

    resume_step = 0
    if config.resume:
        meta = checkpoint.find_latest(config.save_dir)
        if meta is not None:
            checkpoint.check_compatible(meta, config.identity(), config.world_size)
            resume_step = meta.step
    return RunPlan(config, vocab_size, task_names, tables, [list(s.task_names) for s in eval_sidecars], resume_step,
                   tokenizer)


def training_tokenizer(prefixes, sidecars) -> Dict[str, Any]:
    """The tokenizer spec the training prefixes share (their `path` aside: a copied tokenizer.json
    with the same contents is the same tokenizer); ConfigError naming the field otherwise."""
    from megatron_tokweight.checkpoint import tokenizer_differences

    first = sidecars[0].tokenizer
    for prefix, side in zip(prefixes[1:], sidecars[1:]):
        diffs = tokenizer_differences(first, side.tokenizer)
        if diffs:
            raise ConfigError(
                f"data.prefixes: {prefixes[0]} and {prefix} were prepared with different tokenizers "
                f"({'; '.join(diffs)}); prepare them with one tokenizer"
            )
    return dict(first)


# ----------------------------------------------------------------------------- on every rank


@dataclass
class Groups:
    tp: Any
    dp: Any
    tp_rank: int
    dp_rank: int


def make_groups(rank: int, tp_size: int, dp_size: int) -> Groups:
    """TP groups of consecutive ranks (Megatron's order), DP groups across them. Collective."""
    import torch.distributed as dist

    tp_groups = [dist.new_group(list(range(d * tp_size, (d + 1) * tp_size))) for d in range(dp_size)]
    dp_groups = [dist.new_group(list(range(t, tp_size * dp_size, tp_size))) for t in range(tp_size)]
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    return Groups(tp_groups[dp_rank], dp_groups[tp_rank], tp_rank, dp_rank)


def _collate(items):
    # default_collate also turns a blend's numpy `dataset_id` into a tensor
    from torch.utils.data import default_collate

    return default_collate(items)


def _global_task_ids(rows, tables) -> None:
    """Per-prefix task ids -> the run's task ids (a blend's prefixes number their tasks apart)."""
    import torch

    if len(tables) == 1:
        if tables[0] != list(range(len(tables[0]))):
            lookup = torch.tensor(tables[0] + [-1])
            rows["task_ids"] = lookup[rows["task_ids"]]
        return
    lookup = [torch.tensor(table + [-1]) for table in tables]
    task_ids = rows["task_ids"].clone()
    for row, dataset in enumerate(rows["dataset_id"].tolist()):
        task_ids[row] = lookup[dataset][rows["task_ids"][row]]
    rows["task_ids"] = task_ids


class RowReader:
    """Micro-batches of a dataset in the run's fixed order (TP rank 0 reads, the TP group gets them)."""

    def __init__(self, dataset, groups: Groups, micro_batch_size: int, dp_size: int, tables=None):
        self.dataset, self.groups, self.mbs, self.dp_size = dataset, groups, micro_batch_size, dp_size
        self.tables = tables

    def rows(self, start: int):
        items = [self.dataset[i] for i in range(start, min(start + self.mbs, len(self.dataset)))]
        rows = _collate(items)
        if self.tables is not None:
            _global_task_ids(rows, self.tables)
        # real (non-padding) tokens, for throughput; a per-row key travels through flattening
        rows["real_tokens"] = (rows["sample_ids"] >= 0).sum(dim=1)
        return rows

    def micro_batch(self, start: int):
        """(flattened batch, PackedSeqParams) of the rows at `start`; every TP rank calls it."""
        from megatron_tokweight.megatron.batch import get_batch

        source = iter([self.rows(start)]) if self.groups.tp_rank == 0 else None
        return get_batch(source, tp_group=self.groups.tp, device="cpu")

    def step_micro_batches(self, step: int, num_micro_batches: int):
        per_mb = self.mbs * self.dp_size
        base = step * per_mb * num_micro_batches + self.groups.dp_rank * self.mbs
        return [self.micro_batch(base + m * per_mb) for m in range(num_micro_batches)]


def make_forward_step(stats, settings):
    """The forward_step_func of Megatron's schedule protocol for packed THD micro-batches."""
    from megatron_tokweight.loss import make_loss_func
    from megatron_tokweight.model import packed_token_loss

    def forward_step(data_iterator, model):
        batch, _ = next(data_iterator)
        # per-token cross-entropy [1, T] over the model's TP group (model.TokweightGPTModel)
        return packed_token_loss(model, batch), make_loss_func(batch, stats, settings)

    return forward_step


def clip_grad_norm(params, max_norm: float, tp_group) -> float:
    """Global L2 gradient norm over the TP group (replicated parameters counted once); clips
    in place when max_norm > 0 and returns the norm before clipping."""
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    squares = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p, tp_group):
            squares += p.grad.double().pow(2).sum()
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(squares, group=tp_group)
    norm = float(squares.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def evaluate(model, dataset, task_names, groups: Groups, config: TrainConfig, max_rows=None) -> Dict[str, float]:
    """Held-out loss: {"lm loss": mean over all targets, task: the task's unweighted mean}."""
    import torch

    from megatron_tokweight.loss import LossSettings, reduce_reports
    from megatron_tokweight.schedule import forward_backward

    rows = len(dataset) if max_rows is None else min(len(dataset), max_rows)
    mbs, dp = config.micro_batch_size, config.data_parallel_size
    starts = list(range(groups.dp_rank * mbs, rows, mbs * dp))
    reader = RowReader(_Truncated(dataset, rows), groups, mbs, dp)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        micro_batches = [reader.micro_batch(s) for s in starts]
        settings = LossSettings("token_count", len(micro_batches), dp, config.calculate_per_token_loss,
                                task_names=tuple(task_names))
        stats = settings.global_batch_stats([b for b, _ in micro_batches], groups.dp)
        reports, _ = forward_backward(
            make_forward_step(stats, settings), iter(micro_batches), model, len(micro_batches),
            settings_schedule(config), groups.dp, forward_only=True,
        )
    model.train(was_training)
    reduced = reduce_reports(reports, groups.dp)
    out = {"lm loss": reduced["lm loss"]}
    for name in task_names:
        key = f"task/{name}/lm loss"
        if key in reduced:
            out[name] = reduced[key]
    return out


def dataset_names(prefixes) -> tuple:
    """Distinct report names for a blend's prefixes: their base names (indexed when repeated)."""
    names = [os.path.basename(p) or p for p in prefixes]
    return tuple(n if names.count(n) == 1 else f"{i}:{n}" for i, n in enumerate(names))


class _Truncated:
    def __init__(self, dataset, rows):
        self.dataset, self.rows = dataset, rows

    def __len__(self):
        return self.rows

    def __getitem__(self, i):
        return self.dataset[i]


def settings_schedule(config: TrainConfig):
    from megatron_tokweight.schedule import ScheduleConfig

    return ScheduleConfig(calculate_per_token_loss=config.calculate_per_token_loss)


@dataclass
class StepRecord:
    step: int  # 1-based: steps done
    lr: float
    grad_norm: float
    seconds: float  # wall time of the step (data, scoring, forward, backward, optimizer)
    real_tokens: int  # non-padding tokens of the global batch
    reports: Dict[str, float]  # reduce_reports of the step
    scoring_seconds: float = 0.0  # of `seconds`: the long-context scorer (unfrozen / rho1)


@dataclass
class RunResult:
    steps: List[StepRecord] = field(default_factory=list)
    evals: List[Dict[str, Any]] = field(default_factory=list)  # {"step", "prefix", "losses"}
    start_step: int = 0
    train_seconds: float = 0.0
    real_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def train_on_rank(plan: RunPlan, rank: int, groups: Groups,
                  on_step: Optional[Callable[[StepRecord], None]] = None,
                  on_eval: Optional[Callable[[int, str, Dict[str, float]], None]] = None) -> RunResult:
    """Run (or resume) the plan's training on this rank; returns what it measured."""
    import numpy as np
    import torch

    from megatron_tokweight import checkpoint
    from megatron_tokweight.longcontext.scorer_online import step_scorer
    from megatron_tokweight.loss import LossSettings, reduce_reports
    from megatron_tokweight.model import build_gpt_model
    from megatron_tokweight.schedule import forward_backward

    config = plan.config
    torch.manual_seed(config.seed)  # the same full weights on every rank; each TP rank keeps its shard
    model_config = config.model_config(plan.vocab_size)
    model = build_gpt_model(model_config, tp_group=groups.tp)
    model_info = checkpoint.model_info(plan.vocab_size, plan.tokenizer, model_config)
    # unfrozen / rho1: the model scores each step's micro-batches (every TP rank: collective)
    scorer = step_scorer(config.long_context, groups.tp, config.data.seq_length)
    # TP ranks of one replica share dropout masks on replicated activations, as in Megatron
    torch.manual_seed(config.seed + 1 + groups.dp_rank)
    np.random.seed(config.seed + 1 + groups.dp_rank)
    opt = config.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                  weight_decay=opt.weight_decay)

    # every rank holds the (cached, memory-mapped) indices; only TP rank 0 reads rows
    train_ds, eval_sets = build_datasets(config)
    result = RunResult()
    start = 0
    if config.resume:
        meta = checkpoint.find_latest(config.save_dir)
        if meta is not None:
            checkpoint.check_compatible(meta, config.identity(), config.world_size)
            checkpoint.load(meta, model, optimizer, rank)
            if meta.consumed_rows != meta.step * config.rows_per_step:
                raise ConfigError(f"{meta.path}: consumed_rows={meta.consumed_rows} does not match step {meta.step}")
            start = meta.step
    result.start_step = start
    reader = RowReader(train_ds, groups, config.micro_batch_size, config.data_parallel_size, plan.task_tables)
    settings = LossSettings(
        config.weighting.normalization if config.weighting is not None else "weight_sum",
        config.num_micro_batches, config.data_parallel_size, config.calculate_per_token_loss,
        task_names=tuple(plan.task_names),
        dataset_names=dataset_names(config.data.prefixes) if len(config.data.prefixes) > 1 else (),
    )
    schedule_config = settings_schedule(config)
    model.train()

    def run_evals(step):
        for prefix, ds, names in zip(config.data.eval_prefixes, eval_sets, plan.eval_task_names):
            losses = evaluate(model, ds, names, groups, config, config.eval_max_rows)
            result.evals.append({"step": step, "prefix": prefix, "losses": losses})
            if on_eval is not None:
                on_eval(step, prefix, losses)

    if config.eval_interval and start == 0 and eval_sets:
        run_evals(0)
    last = config.steps if config.exit_interval is None else min(config.steps, config.exit_interval)
    for step in range(start, last):
        t0 = time.perf_counter()
        lr = opt.learning_rate(step, config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = reader.step_micro_batches(step, config.num_micro_batches)
        scoring_seconds = 0.0
        if scorer is not None:  # before Z: the scored weights enter the normalizer and the loss
            t_score = time.perf_counter()
            scored = scorer.reweight(model, [b for b, _ in micro_batches])
            micro_batches = [(b, params) for b, (_, params) in zip(scored, micro_batches)]
            scoring_seconds = time.perf_counter() - t_score
        stats = settings.global_batch_stats([b for b, _ in micro_batches], groups.dp)
        optimizer.zero_grad(set_to_none=True)
        reports, _ = forward_backward(
            make_forward_step(stats, settings), iter(micro_batches), model,
            config.num_micro_batches, schedule_config, groups.dp,
        )
        # real tokens ride along the report reduction: [tokens, 1/(M*D)] sums to [total, 1]
        share = 1.0 / (config.num_micro_batches * config.data_parallel_size)
        for report, (batch, _) in zip(reports, micro_batches):
            report["real tokens"] = torch.tensor([float(batch["real_tokens"].sum()), share], dtype=torch.float64)
        grad_norm = clip_grad_norm(params, opt.clip_grad, groups.tp)
        optimizer.step()
        reduced = reduce_reports(reports, groups.dp)
        seconds = time.perf_counter() - t0
        tokens = int(round(reduced.pop("real tokens")))
        record = StepRecord(step + 1, lr, grad_norm, seconds, tokens, reduced, scoring_seconds)
        result.steps.append(record)
        result.train_seconds += seconds
        result.real_tokens += tokens
        if on_step is not None:
            on_step(record)
        done = step + 1
        if config.save_dir and (
            (config.save_interval and done % config.save_interval == 0) or done == last
        ):
            checkpoint.save(config.save_dir, done, done * config.rows_per_step, config.identity(), model,
                            optimizer, rank, config.world_size, model_info=model_info)
        if eval_sets and ((config.eval_interval and done % config.eval_interval == 0) or done == config.steps):
            run_evals(done)
    return result


# ----------------------------------------------------------------------------- CLI


def format_step(record: StepRecord, task_names: Sequence[str]) -> str:
    r = record.reports
    line = (f"step {record.step:5d} | lm loss {r['lm loss']:.4f} | weighted loss {r['weighted loss']:.4f} "
            f"| lr {record.lr:.2e} | grad norm {record.grad_norm:.3f} "
            f"| {record.real_tokens / record.seconds:,.0f} tok/s")
    if record.scoring_seconds:
        line += f" | scoring {100 * record.scoring_seconds / record.seconds:.0f}%"
    tasks = []
    for name in task_names:
        if f"task/{name}/lm loss" in r:
            share = r.get(f"task/{name}/weight share", 0.0)
            tasks.append(f"{name} {r[f'task/{name}/lm loss']:.3f} ({100 * share:.0f}% w)")
    return line + ("\n    " + " | ".join(tasks) if tasks else "")


def _train_rank(rank, world_size, plan: RunPlan):
    groups = make_groups(rank, plan.config.tensor_parallel_size, plan.config.data_parallel_size)
    interval = plan.config.log_interval

    def on_step(record):
        if rank == 0 and (record.step % interval == 0 or record.step == plan.config.steps):
            print(format_step(record, plan.task_names), flush=True)

    def on_eval(step, prefix, losses):
        if rank == 0:
            body = " | ".join(f"{k} {v:.4f}" for k, v in losses.items())
            print(f"eval step {step} {os.path.basename(prefix)}: {body}", flush=True)

    result = train_on_rank(plan, rank, groups, on_step, on_eval)
    return result if rank == 0 else None


def run_training(config: TrainConfig) -> RunResult:
    """Plan (all checks), spawn the TP x DP ranks, train; returns rank 0's result."""
    from megatron_tokweight.distributed import spawn

    plan = plan_run(config)
    if plan.resume_step:
        print(f"resuming from step {plan.resume_step} in {config.save_dir}", flush=True)
    return spawn(_train_rank, config.world_size, plan)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE.yaml", help="training config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, dotted for sections (e.g. optimizer.lr=1e-3); repeatable")
    parser.add_argument("--steps", type=int, default=None, help="override steps")
    parser.add_argument("--tp", type=int, default=None, help="override tensor_parallel_size")
    parser.add_argument("--dp", type=int, default=None, help="override data_parallel_size")
    parser.add_argument("--seed", type=int, default=None, help="override seed")
    parser.add_argument("--save-dir", default=None, help="override save_dir")
    parser.add_argument("--resume", action="store_true", help="continue from save_dir's latest checkpoint")
    parser.add_argument("--exit-interval", type=int, default=None, help="stop after this step (saving first)")
    parser.add_argument("--summary", default=None, metavar="FILE.json", help="write the run's losses here")


def config_from_args(args) -> TrainConfig:
    overrides = list(args.set)
    for flag, key in (("steps", "steps"), ("tp", "tensor_parallel_size"), ("dp", "data_parallel_size"),
                      ("seed", "seed"), ("save_dir", "save_dir"), ("exit_interval", "exit_interval")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.resume:
        overrides.append("resume=true")
    return TrainConfig.from_file(args.config, overrides)


def run(args) -> int:
    config = config_from_args(args)
    result = run_training(config)
    if args.summary:
        summary = {
            "start_step": result.start_step,
            "tokens_per_s": result.tokens_per_s,
            "steps": [asdict(s) for s in result.steps],
            "evals": result.evals,
        }
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"trained steps {result.start_step + 1}-{result.start_step + len(result.steps)} "
          f"at {result.tokens_per_s:,.0f} tokens/s", file=sys.stderr)
    return 0
