"""Unfrozen scorer: the model being trained scores its own micro-batches before each step.

For a micro-batch (collated packed rows or a flattened THD stream), under no_grad:
  1. long:  one forward of the rows as they are (THD, each piece sees its whole prefix);
  2. short: the pieces cut into strided windows of at most n tokens (see `windows.py`), laid end
            to end as one packed batch with their own `cu_seqlens`, run through the same packed
            attention path; window 0 of every piece equals its long context and is not rerun;
  3. weights from the two (LongContextConfig.method), normalised per piece, multiplied into
     `loss_weights`.
Only pieces holding loss tokens are scored. All micro-batches of a step are scored before the
step's first training forward, so the global normaliser Z can still be computed up front
(docs/CONTRACTS.md section 1). rho1 needs the full-context forward only (the reference log-probabilities
come with the batch).

Devices: the forwards run where the model's parameters are (the batch's model inputs are copied
there); the log-probabilities come back to the host, where the weights are computed (a few vector
ops per token, and their checks would synchronise the device anyway), and the new `loss_weights`
go where the batch's were.

Cost per micro-batch: one forward for the long context, plus (without backward) about
ceil((T - n) / stride) * n tokens of short windows per piece of T tokens.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_tokweight.errors import TokweightError
from megatron_tokweight.longcontext.config import LongContextConfig
from megatron_tokweight.longcontext.forward import stream_logprobs, window_logprobs
from megatron_tokweight.longcontext.scores import (
    apply_weights,
    long_context_weights,
    segment_ids_from_cu_seqlens,
)
from megatron_tokweight.longcontext.windows import plan_windows


@dataclass
class RowScores:
    """Per-position log p(label), shaped like the batch's `tokens`: full and short context."""

    long_logprobs: torch.Tensor
    short_logprobs: torch.Tensor
    short_tokens: int  # tokens run through the short-context windows


def as_stream(batch: dict) -> dict:
    """The micro-batch as one THD stream: collated rows ([b, L], cu_seqlens [b, L+1]) are
    flattened; an already flattened batch ([1, T], 1-D cu_seqlens) is returned as it is."""
    if batch["cu_seqlens"].dim() == 2:
        from megatron_tokweight.data.thd_batch import flatten_rows

        return flatten_rows(batch)
    return batch


def piece_bounds(stream: dict):
    """Physical [begin, end) of every piece of a THD stream that holds a loss token."""
    padded = stream["cu_seqlens_padded"].reshape(-1).long()
    actual = stream["cu_seqlens"].reshape(-1).long()
    begins = padded[:-1]
    ends = begins + actual.diff()
    loss = stream["loss_mask"].reshape(-1) > 0
    # prefix sums of the loss mask tell whether a piece holds any loss token
    csum = torch.cat([torch.zeros(1, dtype=torch.long), loss.long().cumsum(0)])
    keep = csum[ends] > csum[begins]
    return begins[keep].numpy(), ends[keep].numpy()


class OnlineScorer:
    """Scores micro-batches with the model being trained and reweights them.

    Batches are collated rows ([b, L], PackedDataset keys) or flattened THD streams as
    `megatron.batch.get_batch` delivers them (context parallel size 1: the windows need every
    token of a piece). tp_group: the model's tensor-parallel group (None for TP = 1).
    seq_length: the training sequence length, checked against n. max_tokens: tokens per
    short-window forward (default: the micro-batch's own size, so memory stays that of a step).
    """

    def __init__(self, config: LongContextConfig, tp_group=None, seq_length: Optional[int] = None,
                 max_tokens: Optional[int] = None, reference_key: str = "reference_logprobs"):
        if not isinstance(config, LongContextConfig):
            raise TypeError(f"config must be a LongContextConfig, got {type(config).__name__}")
        if seq_length is not None:
            config.check_sequence_length(seq_length)
        self.config = config
        self.tp_group = tp_group
        self.max_tokens = max_tokens
        self.reference_key = reference_key

    def score(self, model, batch: dict, short: bool = True) -> RowScores:
        """Full- and (with `short`) short-context log p(label), on the host, shaped like `tokens`;
        without `short` the short-context values repeat the full-context ones."""
        stream = as_stream(batch)
        total = stream["tokens"].numel()
        if int(stream["cu_seqlens_padded"].reshape(-1)[-1]) != total:
            raise TokweightError(
                f"the micro-batch holds {total} tokens but its cu_seqlens_padded ends at "
                f"{int(stream['cu_seqlens_padded'].reshape(-1)[-1])}: a context-parallel slice? The "
                "unfrozen scorer needs whole pieces (context parallel size 1)"
            )
        device = _device_of(model)
        inputs = {key: stream[key].to(device) for key in _MODEL_INPUTS}
        long = stream_logprobs(model, inputs, self.tp_group)
        windows = long.clone()
        short_tokens = 0
        if short:
            host = {key: stream[key].cpu() for key in ("cu_seqlens", "cu_seqlens_padded", "loss_mask")}
            begins, ends = piece_bounds(host)
            plan = plan_windows(begins, ends, self.config.short_context, self.config.stride)
            short_tokens = plan.num_tokens
            if plan.num_windows:
                window_logprobs(
                    model, plan, inputs["tokens"], inputs["labels"], windows, self.tp_group,
                    max_tokens=self.max_tokens or total,
                )
        shape = batch["tokens"].shape
        return RowScores(long.cpu().reshape(shape), windows.cpu().reshape(shape), short_tokens)

    def weights(self, model, batch: dict) -> torch.Tensor:
        """The micro-batch's new `loss_weights`: its sample/token weights times long-context ones.

        rho1 compares the trained model with a reference: the batch must carry the reference
        model's log-probabilities under `reference_key` (default `reference_logprobs`; training
        uses a frozen scorer's `long_logprobs`, see `score_sidecar`).
        """
        rho1 = self.config.method == "rho1"
        reference = batch.get(self.reference_key)
        if rho1 and reference is None:
            raise TokweightError(
                f"long_context.method 'rho1' needs the batch key {self.reference_key!r} (a reference "
                "model's log-probabilities, e.g. from `tokweight score`)"
            )
        scores = self.score(model, batch, short=not rho1)
        host = {key: batch[key].cpu() for key in ("loss_mask", "loss_weights", "cu_seqlens_padded", "num_segments")}
        lc = long_context_weights(
            self.config, host["loss_mask"], batch_segment_ids(dict(host, tokens=batch["tokens"])),
            short_logprobs=None if rho1 else scores.short_logprobs, long_logprobs=scores.long_logprobs,
            reference_logprobs=None if reference is None else reference.cpu(),
        )
        return apply_weights(host["loss_weights"], lc).to(batch["loss_weights"].device)

    def reweight(self, model, batches: List[dict]) -> List[dict]:
        """Every micro-batch of a step with its `loss_weights` replaced (inputs untouched)."""
        return [dict(batch, loss_weights=self.weights(model, batch)) for batch in batches]


def step_scorer(config: Optional[LongContextConfig], tp_group=None, seq_length: Optional[int] = None):
    """The `OnlineScorer` a training step runs before computing Z, or None when the weights
    come with the rows (no long-context weighting, or the frozen scorer's dense/sparse/longce).

    rho1 reads its reference from the rows' frozen `long_logprobs` (`score_sidecar.ScoredRows`)."""
    if config is None or not config.scores_each_step:
        return None
    reference = "long_logprobs" if config.method == "rho1" else "reference_logprobs"
    return OnlineScorer(config, tp_group, seq_length, reference_key=reference)


def _device_of(model) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


# the keys a scoring forward reads (`model.packed_logits`, the labels of `target_logprobs`)
_MODEL_INPUTS = ("tokens", "labels", "position_ids", "cu_seqlens", "cu_seqlens_padded", "num_segments", "max_seqlen")


def batch_segment_ids(batch: dict) -> torch.Tensor:
    """Piece ids shaped like `tokens`, from the physical boundaries (`cu_seqlens_padded`)."""
    shape = batch["tokens"].shape
    return segment_ids_from_cu_seqlens(batch["cu_seqlens_padded"], batch["num_segments"], shape[-1]).reshape(shape)
