"""Strided short-context windows over packed sequences, run through the packed (THD) attention path.

A sequence occupies flat positions [b, e). Position p predicts the next token from the context
[b, p] (its "long" context, p - b + 1 tokens). The short context keeps at most n tokens, with
windows that advance by `stride` (s):

  window 0   tokens [b, b + n)            scores p in [b, b + n)            (context = the full one)
  window k   tokens [a, a + n), a = b + k s  scores p in [a + n - s, a + n)  (context n - s + 1 .. n)

until the sequence is covered (the last window is cut at e). Every position is scored exactly once.
Window 0 sees exactly the long context, so scorers skip it (`include_first=False`) and copy the
long-context value there: short and long then agree bit for bit and the score is exactly 0.

The windows of many sequences form one packed THD batch: their tokens are gathered end to end
and `cu_seqlens` delimits them, so attention never crosses a window. A window's tokens keep the
position ids they have in their sequence (p - b): only the context is cut, not the positions, so
learned absolute position embeddings stay meaningful (with RoPE, relative, it makes no
difference).
"""
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from megatron_tokweight.errors import ConfigError


@dataclass
class WindowPlan:
    """A packed batch of windows and where its predictions land.

    token_index [T] (int64): flat source position of each windowed token; position_ids [T]
    (its position within its sequence);
    cu_seqlens [W + 1] (int32); score_from [M]: positions in the windowed batch whose prediction
    is kept; score_to [M]: the flat source positions those predictions belong to.
    """

    token_index: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    score_from: torch.Tensor
    score_to: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.token_index.numel())

    @property
    def num_windows(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    def batch(self, flat_tokens: torch.Tensor) -> dict:
        """The windows as a flattened THD micro-batch (`model.packed_logits` input), on the
        device of `flat_tokens` (the plan itself is built on the host)."""
        total = self.num_tokens
        lengths = self.cu_seqlens.diff()
        device = flat_tokens.device
        cu = self.cu_seqlens.to(device)
        return {
            "tokens": flat_tokens.reshape(-1)[self.token_index.to(device)].reshape(1, total),
            "position_ids": self.position_ids.to(device).reshape(1, total),
            "cu_seqlens": cu,
            "cu_seqlens_padded": cu,
            "num_segments": torch.tensor(self.num_windows),
            "max_seqlen": lengths.max().long() if len(lengths) else torch.tensor(0),
        }


def check_window(n: int, stride: int) -> None:
    if n < 1 or not 1 <= stride <= n:
        raise ConfigError(f"short context n={n} and stride={stride}: need n >= 1 and 1 <= stride <= n")


def plan_windows(
    begins, ends, n: int, stride: int, include_first: bool = False
) -> WindowPlan:
    """All windows of the sequences [begins[i], ends[i]) as one packed batch."""
    check_window(n, stride)
    begins = np.asarray(begins, dtype=np.int64).reshape(-1)
    ends = np.asarray(ends, dtype=np.int64).reshape(-1)
    if np.any(ends < begins):
        raise ValueError("every sequence needs begin <= end")
    length = ends - begins
    extra = -(-np.maximum(0, length - n) // stride)  # windows beyond the first
    first = np.where(include_first & (length > 0), 0, 1)
    count = extra + 1 - first
    seq = np.repeat(np.arange(len(begins)), count)
    # k-th window of its sequence: first[seq] + rank within the sequence
    offsets = np.cumsum(count) - count
    k = first[seq] + np.arange(len(seq)) - offsets[seq]
    starts = begins[seq] + k * stride
    stops = np.minimum(starts + n, ends[seq])
    # window 0 keeps all its positions, later ones their last `stride`
    kept_from = np.where(k == 0, starts, starts + n - stride)
    return _plan(starts, stops, kept_from, begins[seq])


def _plan(starts: np.ndarray, stops: np.ndarray, kept_from: np.ndarray, origins: np.ndarray) -> WindowPlan:
    lengths = stops - starts
    total = int(lengths.sum())
    cu = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=cu[1:])
    window_of = np.repeat(np.arange(len(lengths)), lengths)
    token_index = starts[window_of] + np.arange(total, dtype=np.int64) - cu[:-1][window_of]
    position = token_index - origins[window_of]
    keep = token_index >= kept_from[window_of]
    return WindowPlan(
        token_index=torch.from_numpy(token_index),
        position_ids=torch.from_numpy(position),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        score_from=torch.from_numpy(np.flatnonzero(keep)),
        score_to=torch.from_numpy(token_index[keep]),
    )


def split_plan(plan: WindowPlan, max_tokens: int) -> Iterator[WindowPlan]:
    """The plan in pieces of whole windows holding at most `max_tokens` tokens each
    (one window alone may exceed it); bounds the memory of the logits of one forward."""
    cu = plan.cu_seqlens.long().numpy()
    window = 0
    windows = len(cu) - 1
    keep_windows = np.searchsorted(cu, plan.score_from.numpy(), side="right") - 1
    while window < windows:
        last = int(np.searchsorted(cu, cu[window] + max_tokens, side="right")) - 1
        last = max(last, window + 1)
        lo, hi = int(cu[window]), int(cu[last])
        mine = (keep_windows >= window) & (keep_windows < last)
        yield WindowPlan(
            token_index=plan.token_index[lo:hi],
            position_ids=plan.position_ids[lo:hi],
            cu_seqlens=torch.from_numpy((cu[window:last + 1] - lo).astype(np.int32)),
            score_from=plan.score_from[torch.from_numpy(mine)] - lo,
            score_to=plan.score_to[torch.from_numpy(mine)],
        )
        window = last
