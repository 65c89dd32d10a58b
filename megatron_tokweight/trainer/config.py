"""`TrainConfig`: a `tokweight train` run as a YAML file describes it (sections `data`, `model`,
`weighting`, `optimizer`, `long_context` and top-level loop fields), validated on construction.

`DataConfig` (prepared prefixes and packing), `OptimizerConfig` (AdamW, warm-up and cosine
decay), `apply_overrides` (the CLI's `--set dotted.key=value`).
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence

from megatron_tokweight.common.files import load_yaml, read_config_file
from megatron_tokweight.errors import ConfigError, reject_unknown_keys
from megatron_tokweight.loss.fused_linear_cross_entropy import FUSED_CROSS_ENTROPY
from megatron_tokweight.weighting.config import as_weighting_config

# training-loop fields that may change between a run and its resumption
NON_IDENTITY_FIELDS = ("log_interval", "eval_interval", "save_dir", "save_interval", "resume",
                       "exit_interval", "eval_max_rows", "fused_cross_entropy")
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
    """Prepared prefixes (`tokweight prepare` output) or plain Megatron prefixes (`.bin`/`.idx`
    without a sidecar, read as text samples) and how their samples are packed."""

    prefixes: List[str] = field(default_factory=list)
    weights: Optional[List[float]] = None  # blend weights, required with several prefixes
    eval_prefixes: List[str] = field(default_factory=list)  # held-out sets, evaluated whole
    seq_length: int = 512
    pack_algorithm: str = "bfd"
    overlong: str = "truncate"
    cache_dir: Optional[str] = None  # packing index cache (default: next to each prefix)
    # the tokenizer of plain Megatron prefixes: "byte" or a tokenizer.json path (prepared
    # prefixes record theirs; needed when no prepared prefix names one)
    tokenizer: Optional[str] = None

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
        if self.tokenizer is not None and not (isinstance(self.tokenizer, str) and self.tokenizer):
            raise ConfigError(f"data.tokenizer must be 'byte' or a tokenizer.json path, got {self.tokenizer!r}")
        from megatron_tokweight.data.packing import check_pack_options

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
    # "off": Megatron's output layer + vocab-parallel cross-entropy (logits held); "torch" or
    # "triton": loss.fused_linear_cross_entropy (same loss and gradients, no logits held)
    fused_cross_entropy: str = "off"
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
        from megatron_tokweight.model.gpt import ModelConfig

        known = [f.name for f in fields(ModelConfig) if f.name not in EXCLUDED_MODEL_FIELDS]
        for key in self.model:
            if key in EXCLUDED_MODEL_FIELDS:
                raise ConfigError(
                    f"model.{key} is not set in the model section: vocab_size comes from the prepared data, "
                    "seq_length from data.seq_length, the TP size from tensor_parallel_size"
                )
        reject_unknown_keys(self.model, known, "model")
        self.model = dict(self.model)
        self.weighting = as_weighting_config(self.weighting)
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
        if self.fused_cross_entropy not in FUSED_CROSS_ENTROPY:
            raise ConfigError(
                f"fused_cross_entropy must be one of {FUSED_CROSS_ENTROPY}, got {self.fused_cross_entropy!r}"
            )
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
        from megatron_tokweight.model.gpt import ModelConfig

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
        """From a YAML (or JSON) file, then `overrides` ("dotted.key=value", value parsed as YAML)."""
        data = dict(read_config_file(path, "training"))
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
            tokenizer = data_section.get("tokenizer")
            if isinstance(tokenizer, str) and tokenizer != "byte":
                data_section["tokenizer"] = os.path.normpath(os.path.join(base, tokenizer))
        apply_overrides(data, overrides)
        return cls.from_dict(data, where=str(path))


def _section(cls, mapping: Mapping, where: str):
    reject_unknown_keys(mapping, [f.name for f in fields(cls)], where)
    return cls(**dict(mapping))


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
            value = load_yaml(raw)
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
