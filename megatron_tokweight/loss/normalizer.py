"""The global normalizer Z of L = sum_G w_t l_t / Z (docs/CONTRACTS.md section 1).

Z is known from the data before the forward pass: `global_batch_stats` sums this rank's
micro-batches of the step and makes ONE all-reduce over the DP x CP group (never TP: every TP
rank holds the same tokens and weights; summing over TP would count them TP times).

Context parallelism: every CP rank holds a slice of each sequence's tokens, so weight and token
sums add up over CP, but the per-row `num_samples` is whole on every CP rank. Rule: samples are
counted on CP rank 0 only (`cp_rank` is passed explicitly).

The same all-reduce carries per-task and per-dataset token counts and weight sums (for the
reports, so that every rank agrees on which report keys exist) and the counts of invalid
values, so that bad data on one rank raises on every rank instead of leaving the others
waiting in a collective.
"""
import enum
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Tuple, Union

import torch

from megatron_tokweight.common.process_groups import group_size
from megatron_tokweight.errors import ConfigError, DataFormatError
from megatron_tokweight.loss import checks


class Normalization(str, enum.Enum):
    """How Z is chosen (docs/CONTRACTS.md section 1)."""

    WEIGHT_SUM = "weight_sum"  # sum of w_t over the global batch
    SAMPLE_COUNT = "sample_count"  # samples in the global batch
    TOKEN_COUNT = "token_count"  # loss tokens in the global batch

    @classmethod
    def parse(cls, value: Union["Normalization", str]) -> "Normalization":
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"normalization {value!r} is unknown; use one of {', '.join(m.value for m in cls)}"
            ) from None


@dataclass(frozen=True)
class GlobalBatchStats:
    """Totals over the whole global batch (all micro-batches, DP and CP ranks) of one step."""

    weight_sum: float
    loss_tokens: int
    num_samples: int
    task_loss_tokens: Tuple[int, ...] = ()
    task_weight_sum: Tuple[float, ...] = ()
    dataset_loss_tokens: Tuple[int, ...] = ()
    dataset_weight_sum: Tuple[float, ...] = ()

    def normalizer(self, normalization: Union[Normalization, str]) -> float:
        """Z for `normalization`; 0.0 when the batch has nothing to normalise by (the loss is then
        defined as 0, see `loss_func`)."""
        mode = Normalization.parse(normalization)
        if mode is Normalization.WEIGHT_SUM:
            return float(self.weight_sum)
        if mode is Normalization.SAMPLE_COUNT:
            return float(self.num_samples)
        return float(self.loss_tokens)


def count_loss_tokens(loss_mask: torch.Tensor) -> torch.Tensor:
    """Loss tokens of a micro-batch: positions with a non-zero loss mask, as an int32 tensor
    (the dtype of Megatron's schedules' `num_tokens`). Used for Z and for `num_tokens` alike."""
    return torch.count_nonzero(loss_mask).to(torch.int)


def token_group_ids(micro_batch: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """Per-token ids from `micro_batch[key]`: per-token (shape of `like`) or per-row ([rows],
    rows = like.shape[0], e.g. a blend's `dataset_id`), as int64 shaped like `like`."""
    if key not in micro_batch:
        raise DataFormatError(f"the micro-batch has no {key!r} key (keys: {sorted(micro_batch)}); it is needed for the per-{key} report")
    ids = micro_batch[key]
    if tuple(ids.shape) == tuple(like.shape):
        return ids.long()
    if ids.dim() == 1 and like.dim() >= 1 and ids.shape[0] == like.shape[0]:
        return ids.long().view(-1, *([1] * (like.dim() - 1))).expand_as(like)
    raise DataFormatError(
        f"{key} has shape {tuple(ids.shape)}; expected per-token {tuple(like.shape)} or per-row ({like.shape[0]},). "
        f"If the rows were flattened into one THD stream, expand {key} to every token before flattening"
    )


# layout of the all-reduced float64 vector
_WEIGHT, _TOKENS, _SAMPLES, _BAD_WEIGHTS, _OFF_MASK, _BAD_TASK, _BAD_DATASET, _STRUCTURE = range(8)
_HEAD = 8


def _group_totals(ids: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor, groups: int):
    """(tokens per group, weight per group, loss tokens with an id outside [0, groups)).

    No boolean indexing (it would sync with the device): positions that are not counted add
    zeros to group 0."""
    counted = selected & (ids >= 0) & (ids < groups)
    index = torch.where(counted, ids, torch.zeros_like(ids)).reshape(-1)
    ones = counted.double().reshape(-1)
    tokens = torch.zeros(groups, dtype=torch.float64, device=ids.device).index_add_(0, index, ones)
    weight = torch.zeros(groups, dtype=torch.float64, device=ids.device).index_add_(0, index, weights.double().reshape(-1) * ones)
    return tokens, weight, (selected & ~counted).sum().double()


def _micro_batch_totals(micro_batch, cp_rank: int, num_tasks: int, num_datasets: int, vector: torch.Tensor) -> None:
    for key in ("loss_weights", "loss_mask", "num_samples"):
        if key not in micro_batch:
            raise DataFormatError(f"the micro-batch has no {key!r} key (keys: {sorted(micro_batch)})")
    weights, mask = micro_batch["loss_weights"], micro_batch["loss_mask"]
    checks.check_same_shape("loss_weights", weights, "loss_mask", mask)
    if not weights.is_floating_point():
        raise DataFormatError(f"loss_weights must be a floating-point tensor, got {weights.dtype}")
    selected = mask != 0
    head = torch.stack(
        [
            weights.double().sum(),
            selected.sum().double(),
            micro_batch["num_samples"].double().sum() if cp_rank == 0 else torch.zeros((), dtype=torch.float64, device=weights.device),
        ]
    )
    vector[_WEIGHT:_SAMPLES + 1] += head.to(vector.device)
    vector[_BAD_WEIGHTS] += checks.weight_flags(weights).sum().to(vector.device)
    vector[_OFF_MASK] += ((~selected) & (weights != 0)).sum().double().to(vector.device)
    offset = _HEAD
    for key, groups, bad_slot in (("task_ids", num_tasks, _BAD_TASK), ("dataset_id", num_datasets, _BAD_DATASET)):
        if groups == 0:
            continue
        tokens, weight, bad = _group_totals(token_group_ids(micro_batch, key, mask), selected, weights, groups)
        vector[offset : offset + groups] += tokens.to(vector.device)
        vector[offset + groups : offset + 2 * groups] += weight.to(vector.device)
        vector[bad_slot] += bad.to(vector.device)
        offset += 2 * groups


def _local_error(micro_batches, num_tasks: int, num_datasets: int) -> Optional[DataFormatError]:
    """The detailed message for this rank's bad values (slow path, after the all-reduce)."""
    for index, micro_batch in enumerate(micro_batches):
        where = f" (micro-batch {index} of this rank)"
        weights, mask = micro_batch["loss_weights"], micro_batch["loss_mask"]
        error = checks.weight_error(weights, "loss_weights", where)
        if error is not None:
            return error
        off_mask = (mask == 0) & (weights != 0)
        if bool(off_mask.any()):
            positions = [tuple(p) for p in off_mask.nonzero()[:3].tolist()]
            return DataFormatError(
                f"loss_weights{where}: {int(off_mask.sum())} non-zero weights where loss_mask is 0 (first at {positions}); "
                "weights must be 0 on prompt, padding and boundary positions"
            )
        selected = mask != 0
        for key, groups in (("task_ids", num_tasks), ("dataset_id", num_datasets)):
            if groups:
                ids = token_group_ids(micro_batch, key, mask)
                try:
                    checks.check_ids(ids[selected], groups, f"{key} of loss tokens{where}")
                except DataFormatError as err:
                    return err
    return None


def local_batch_vector(micro_batches, *, cp_rank: int = 0, num_tasks: int = 0, num_datasets: int = 0):
    """This rank's totals as the float64 vector `global_batch_stats` all-reduces, and the
    structural error (missing key, shape) if one was found."""
    device = torch.device("cpu")
    for micro_batch in micro_batches:
        if isinstance(micro_batch, Mapping) and isinstance(micro_batch.get("loss_weights"), torch.Tensor):
            device = micro_batch["loss_weights"].device
            break
    vector = torch.zeros(_HEAD + 2 * (num_tasks + num_datasets), dtype=torch.float64, device=device)
    try:
        for micro_batch in micro_batches:
            if not isinstance(micro_batch, Mapping):
                raise DataFormatError(f"a micro-batch must be a dict of tensors, got {type(micro_batch).__name__}")
            _micro_batch_totals(micro_batch, cp_rank, num_tasks, num_datasets, vector)
    except DataFormatError as err:
        vector.zero_()
        vector[_STRUCTURE] = 1.0
        return vector, err
    return vector, None


def global_batch_stats(
    micro_batches: Iterable[Mapping[str, torch.Tensor]],
    dp_cp_group=None,
    *,
    cp_rank: int = 0,
    num_tasks: int = 0,
    num_datasets: int = 0,
) -> GlobalBatchStats:
    """Sum of weights, loss tokens and samples of the global batch, from THIS rank's micro-batches.

    Args:
        micro_batches: every micro-batch this rank trains on in the step (dicts with
            `loss_weights`, `loss_mask`, `num_samples`; `task_ids` when `num_tasks` > 0,
            `dataset_id` when `num_datasets` > 0), as the loss function will see them (after
            any CP slicing).
        dp_cp_group: the data-parallel x context-parallel group (None: a single rank).
        cp_rank: this rank's index in its CP group; samples are counted where it is 0.
        num_tasks, num_datasets: sizes of the per-task / per-dataset totals (0: none).

    Collectives: exactly one all-reduce (SUM) of a float64 vector of 8 + 2 * (num_tasks +
    num_datasets) values over `dp_cp_group`, then one host copy. Weights, counts and samples are
    exact integers or fp64 sums. Invalid data (NaN/inf/negative weights, non-zero weights off the
    loss mask, ids out of range, missing keys) raises DataFormatError on every rank.
    """
    if num_tasks < 0 or num_datasets < 0 or cp_rank < 0:
        raise ConfigError(f"num_tasks, num_datasets and cp_rank must be >= 0, got {num_tasks}, {num_datasets}, {cp_rank}")
    micro_batches = list(micro_batches)
    vector, structure_error = local_batch_vector(micro_batches, cp_rank=cp_rank, num_tasks=num_tasks, num_datasets=num_datasets)
    if group_size(dp_cp_group) > 1:
        torch.distributed.all_reduce(vector, group=dp_cp_group)
    values = vector.tolist()
    if values[_STRUCTURE] or any(values[_BAD_WEIGHTS:_STRUCTURE]):
        if structure_error is not None:
            raise structure_error
        local = _local_error(micro_batches, num_tasks, num_datasets)
        if local is not None:
            raise local
        raise DataFormatError("another rank of the DP x CP group found invalid loss data (its own error names it)")
    tasks = values[_HEAD : _HEAD + 2 * num_tasks]
    datasets = values[_HEAD + 2 * num_tasks :]
    return GlobalBatchStats(
        weight_sum=values[_WEIGHT],
        loss_tokens=int(round(values[_TOKENS])),
        num_samples=int(round(values[_SAMPLES])),
        task_loss_tokens=tuple(int(round(v)) for v in tasks[:num_tasks]),
        task_weight_sum=tuple(tasks[num_tasks:]),
        dataset_loss_tokens=tuple(int(round(v)) for v in datasets[:num_datasets]),
        dataset_weight_sum=tuple(datasets[num_datasets:]),
    )
