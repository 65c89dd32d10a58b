"""Input checks for the loss: token weights and labels.

Each check costs one device-to-host copy of a few flags; the slow path that builds the message
(positions, values) only runs when something is wrong.
"""
from typing import Optional, Sequence

import torch

from megatron_tokweight.errors import DataFormatError


def _first_positions(bad: torch.Tensor, limit: int = 3) -> list:
    return [tuple(int(i) for i in index) for index in bad.nonzero()[:limit].tolist()]


def check_same_shape(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(ref.shape):
        raise DataFormatError(f"{name} has shape {tuple(tensor.shape)} but {ref_name} has shape {tuple(ref.shape)}; they must match")


def weight_flags(weights: torch.Tensor) -> torch.Tensor:
    """[non-finite count, negative count] as a float64 tensor on the weights' device (no sync)."""
    finite = torch.isfinite(weights)
    return torch.stack([(~finite).sum(), (finite & (weights < 0)).sum()]).to(torch.float64)


def weight_error(weights: torch.Tensor, name: str = "loss_weights", where: str = "") -> Optional[DataFormatError]:
    """The error describing NaN/inf/negative weights, or None when the weights are fine."""
    non_finite, negative = (int(v) for v in weight_flags(weights).tolist())
    if not non_finite and not negative:
        return None
    bad = ~torch.isfinite(weights) | (weights < 0)
    positions = _first_positions(bad)
    values = [float(weights[p]) for p in positions]
    return DataFormatError(
        f"{name}{where}: {non_finite} NaN/inf and {negative} negative token weights (weights must be finite and >= 0); "
        f"first at positions {positions} with values {values}"
    )


def check_weights(weights: torch.Tensor, name: str = "loss_weights", where: str = "") -> None:
    """Raise DataFormatError when a weight is NaN, inf or negative, or not floating point."""
    if not weights.is_floating_point():
        raise DataFormatError(f"{name}{where} must be a floating-point tensor, got {weights.dtype}")
    error = weight_error(weights, name, where)
    if error is not None:
        raise error


def check_labels(labels: torch.Tensor, vocab_size: int, name: str = "labels") -> None:
    """Raise DataFormatError when a label lies outside [0, vocab_size) or is not an integer.

    Megatron's vocab-parallel cross-entropy does not check this: an out-of-range label silently
    gets a predicted logit of 0 on every TP rank (a wrong, finite loss).
    """
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataFormatError(f"{name} must be an integer tensor, got {labels.dtype}")
    check_ids(labels, vocab_size, name, what="labels", hint="vocabulary = local shard x TP size")


def check_ids(
    ids: torch.Tensor,
    upper: int,
    name: str,
    allowed_extra: Sequence[int] = (),
    what: str = "ids",
    hint: str = "",
) -> None:
    """Raise DataFormatError when an id lies outside [0, upper) (plus `allowed_extra`)."""
    bad = (ids < 0) | (ids >= upper)
    for value in allowed_extra:
        bad &= ids != value
    count = int(bad.sum())
    if count:
        positions = _first_positions(bad)
        hint = hint or f"configure {upper} names or fix the data"
        raise DataFormatError(
            f"{name}: {count} {what} outside [0, {upper}) ({hint}); first at positions {positions} "
            f"with values {[int(ids[p]) for p in positions]}"
        )
