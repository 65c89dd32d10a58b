"""Long-context token scores and weights: pure torch functions of per-token log-probabilities.

Every function takes tensors of one common shape (a batch of packed rows [b, L], or [s, b], or
flat): per-token log-probabilities of each position's label, `loss_mask` (1 on loss tokens) and
`segment_ids` (which training sequence each position belongs to, -1 outside any).

Normalisation unit. With packing, a "training sequence" is one *piece* of a packed row (a sample,
or one fragment of a split sample), as delimited by the row's `cu_seqlens`; N and sum s run over
that piece's loss tokens only, so a sample's weights do not depend on what it is packed with.
`segment_ids_from_cu_seqlens` / `segment_ids_from_sample_ids` build the ids from a batch.

Conventions (all deterministic, none produces NaN):
- weights are 0 on non-loss positions; values there (scores, log-probs) are ignored, so padding or
  a sample's first token may hold anything finite or not;
- dense and sparse: a sequence whose scores are at round-off level (mean s <= `ROUNDOFF_SCORE`
  nats: short and long context agree to fp32 round-off everywhere) gets the uniform weight 1 on
  every loss token. Read literally, N * s_t / sum(s) would turn pure round-off (two fp32 forwards
  of different lengths differ by ~1e-7 on some CPUs) into weights of order N;
- top-fraction selection (sparse, rho1) keeps k = ceil(fraction * N) tokens (at least one); among
  equal scores at the cut the earlier position wins (flat, row-major order).
"""
import math
from typing import Optional

import torch

from megatron_tokweight.errors import TokweightError
from megatron_tokweight.weighting.token_weights import compose_token_weights

# tolerance for ceil(fraction * N) so that e.g. 0.3 * 10 keeps 3 tokens, not 4
_CEIL_SLACK = 1e-9
# mean |log p_short - log p_long| (nats) at or below which a sequence carries no information:
# well above fp32 log-softmax round-off (~1e-7), far below any real context effect
ROUNDOFF_SCORE = 1e-6


def helm_scores(short_logprobs: torch.Tensor, long_logprobs: torch.Tensor) -> torch.Tensor:
    """s_t = |log p_short(t) - log p_long(t)| (Helm et al. 2025), in fp32."""
    _same_shape(short=short_logprobs, long=long_logprobs)
    return (short_logprobs.float() - long_logprobs.float()).abs()


def segment_ids_from_cu_seqlens(
    cu_seqlens: torch.Tensor, num_segments: Optional[torch.Tensor] = None, length: Optional[int] = None
) -> torch.Tensor:
    """Per-position piece index from packed-row boundaries, unique across the batch.

    cu_seqlens [L+1] or [b, L+1] (entries after `num_segments` are -1, as PackedDataset writes
    them); returns int64 [L] or [b, L]: row * (L + 1) + piece index. The tail padding forms a
    segment of its own; it carries no loss tokens, so it never enters a normalisation.
    """
    squeeze = cu_seqlens.dim() == 1
    cu = cu_seqlens.reshape(-1, cu_seqlens.shape[-1]).long()
    rows, width = cu.shape
    length = width - 1 if length is None else int(length)
    if num_segments is None:
        valid = cu >= 0
    else:
        counts = torch.as_tensor(num_segments).reshape(-1).long()
        if counts.numel() == 1 and rows > 1:
            counts = counts.expand(rows)
        valid = torch.arange(width)[None, :] <= counts[:, None]
    # invalid tail entries become +inf-like so each row stays sorted for searchsorted
    bounds = torch.where(valid, cu, torch.full_like(cu, length + 1))
    if (bounds[:, 0] != 0).any() or (bounds.diff(dim=1) < 0).any():
        raise TokweightError(f"cu_seqlens must start at 0 and not decrease; got {cu_seqlens.tolist()}")
    positions = torch.arange(length).expand(rows, length).contiguous()
    piece = torch.searchsorted(bounds, positions, right=True) - 1
    ids = piece + torch.arange(rows)[:, None] * (length + 1)
    return ids[0] if squeeze else ids


def segment_ids_from_sample_ids(sample_ids: torch.Tensor) -> torch.Tensor:
    """Per-position segment ids from per-token dataset sample ids ([b, L]; -1 on padding).

    A sample appears at most once per row (a split sample's fragments fill different rows), so
    (row, sample id) identifies a piece; returns int64 of the same shape, -1 on padding.
    """
    ids = sample_ids.long()
    rows = ids.reshape(-1, ids.shape[-1]) if ids.dim() > 0 else ids.reshape(1, 1)
    row_index = torch.arange(rows.shape[0])[:, None].expand_as(rows)
    keys = torch.stack([row_index.reshape(-1), rows.reshape(-1)], dim=1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    out = torch.where(rows.reshape(-1) >= 0, inverse, torch.full_like(inverse, -1))
    return out.reshape(ids.shape)


def dense_weights(
    scores: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor, lam: float
) -> torch.Tensor:
    """w_t = lam + (1 - lam) * N * s_t / sum_seq s on loss tokens, per training sequence."""
    _check_fraction(lam, "lam", allow_zero=True)
    sel, seg, values = _loss_tokens(scores, loss_mask, segment_ids, "scores")
    if (values < 0).any():
        raise TokweightError("dense long-context scores must be >= 0 (|log p_short - log p_long|)")
    values = values.double()
    count = torch.bincount(seg).double()
    total = torch.zeros_like(count).index_add_(0, seg, values)
    n_t, sum_t = count[seg], total[seg]
    informative = sum_t > n_t * ROUNDOFF_SCORE
    ratio = torch.where(informative, n_t * values / torch.where(informative, sum_t, 1.0), 1.0)
    return _scatter(scores, sel, lam + (1.0 - lam) * ratio)


def sparse_weights(
    scores: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor, kappa: float
) -> torch.Tensor:
    """1/kappa on the top ceil(kappa * N) scores of each training sequence, 0 elsewhere.

    A sequence whose scores are at round-off level gets weight 1 everywhere (no token stands out)."""
    _check_fraction(kappa, "kappa")
    sel, seg, values = _loss_tokens(scores, loss_mask, segment_ids, "scores")
    if (values < 0).any():
        raise TokweightError("sparse long-context scores must be >= 0 (|log p_short - log p_long|)")
    keep = _top_fraction(values, seg, kappa)
    total = torch.zeros(int(seg.max()) + 1 if seg.numel() else 0, dtype=torch.float64)
    total.index_add_(0, seg, values.double())
    flat = total[seg] <= torch.bincount(seg).double()[seg] * ROUNDOFF_SCORE
    weight = torch.where(keep, 1.0 / kappa, 0.0).double()
    return _scatter(scores, sel, torch.where(flat, 1.0, weight))


def longce_weights(
    short_logprobs: torch.Tensor, long_logprobs: torch.Tensor, loss_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """LongCE: w_t = min(exp(l_short - l_long), gamma) = min(p_long / p_short, gamma) on loss tokens."""
    if not gamma > 0:
        raise TokweightError(f"gamma must be > 0, got {gamma!r}")
    _same_shape(short=short_logprobs, long=long_logprobs, loss_mask=loss_mask)
    sel = loss_mask.reshape(-1) > 0
    gain = long_logprobs.reshape(-1)[sel].double() - short_logprobs.reshape(-1)[sel].double()
    _check_finite(gain, "log-probabilities")
    # clamp before exp: exact for the cap, and no overflow for large gains
    weight = torch.exp(torch.clamp(gain, max=math.log(gamma)))
    return _scatter(short_logprobs, sel, torch.minimum(weight, torch.tensor(float(gamma), dtype=torch.float64)))


def rho1_weights(
    model_logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    k: float,
) -> torch.Tensor:
    """Rho-1: 1 on the top ceil(k * N) tokens by excess loss l_model - l_reference, else 0."""
    _check_fraction(k, "k")
    _same_shape(model=model_logprobs, reference=reference_logprobs)
    excess = reference_logprobs.float() - model_logprobs.float()  # l_model - l_ref
    sel, seg, values = _loss_tokens(excess, loss_mask, segment_ids, "excess losses")
    keep = _top_fraction(values, seg, k)
    return _scatter(excess, sel, keep.double())


def long_context_weights(
    config,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    *,
    short_logprobs: Optional[torch.Tensor] = None,
    long_logprobs: Optional[torch.Tensor] = None,
    reference_logprobs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The weights `config` (a LongContextConfig) asks for, fp32, 0 off loss tokens.

    dense/sparse/longce need `short_logprobs` and `long_logprobs`; rho1 reads `long_logprobs` as
    the trained model's and needs `reference_logprobs` (e.g. a frozen scorer's full-context ones).
    """
    need = ("long_logprobs", "reference_logprobs") if config.method == "rho1" else (
        "short_logprobs", "long_logprobs")
    given = dict(short_logprobs=short_logprobs, long_logprobs=long_logprobs,
                 reference_logprobs=reference_logprobs)
    missing = [name for name in need if given[name] is None]
    if missing:
        raise TokweightError(f"long-context method {config.method!r} needs {', '.join(missing)}")
    if config.method == "dense":
        return dense_weights(helm_scores(short_logprobs, long_logprobs), loss_mask, segment_ids, config.lam)
    if config.method == "sparse":
        return sparse_weights(helm_scores(short_logprobs, long_logprobs), loss_mask, segment_ids, config.kappa)
    if config.method == "longce":
        return longce_weights(short_logprobs, long_logprobs, loss_mask, config.gamma)
    return rho1_weights(long_logprobs, reference_logprobs, loss_mask, segment_ids, config.k)


def apply_weights(loss_weights: torch.Tensor, long_context: torch.Tensor) -> torch.Tensor:
    """A row's sample/token weights times its long-context weights g_t
    (`weighting.token_weights.compose_token_weights`, where w_t is defined)."""
    _same_shape(loss_weights=loss_weights, long_context=long_context)
    return compose_token_weights(loss_weights, long_context, ("weight", "long-context weight"))


# ---------------------------------------------------------------------------------------------


def _top_fraction(values: torch.Tensor, seg: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the top ceil(fraction * N_seg) values per segment; ties: earlier first.

    Three stable sorts give the order (segment asc, value desc, position asc): a token's rank in
    its segment is then its sorted index minus the segment's first sorted index.
    """
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    order = torch.sort(-values.double(), stable=True).indices
    order = order[torch.sort(seg[order], stable=True).indices]
    count = torch.bincount(seg)
    first = torch.cumsum(count, 0) - count
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel()) - first[seg[order]]
    keep_count = torch.clamp(torch.ceil(fraction * count.double() - _CEIL_SLACK), min=1).long()
    return rank < keep_count[seg]


def _loss_tokens(values, loss_mask, segment_ids, what):
    """(flat selector of loss tokens, compact segment index per loss token, their values)."""
    _same_shape(**{what.replace(" ", "_"): values, "loss_mask": loss_mask, "segment_ids": segment_ids})
    sel = loss_mask.reshape(-1) > 0
    seg = segment_ids.reshape(-1)[sel].long()
    if (seg < 0).any():
        raise TokweightError("a loss token has segment id -1 (outside every training sequence)")
    vals = values.reshape(-1)[sel]
    _check_finite(vals, what)
    _, compact = torch.unique(seg, return_inverse=True)
    return sel, compact, vals


def _scatter(like: torch.Tensor, sel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(like.numel(), dtype=torch.float32, device=like.device)
    out[sel] = values.to(torch.float32)
    return out.reshape(like.shape)


def _check_finite(values: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        raise TokweightError(
            f"{int(bad.sum())} loss token(s) have non-finite {what} "
            f"(first value {values[bad][0].item()!r}); long-context weights need finite inputs"
        )


def _check_fraction(value: float, name: str, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise TokweightError(f"{name} must lie in {interval}, got {value!r}")


def _same_shape(**tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise TokweightError(f"long-context inputs must share one shape, got {shapes}")
