"""The fused loss inside Megatron's `GPTModel`: its output layer returns w_t * l_t, never logits.

`enable_fused_output(model, implementation)` (idempotent, explicit opt-in) finds the model's
output layer (`ColumnParallelLinear`, through DDP / Float16Module wrappers) and gives that one
instance a forward that, while `fused_targets(model, labels, weights)` is active, calls
`loss.fused_linear_weighted_cross_entropy` on its input (the final hidden states, sequence-
parallel shard included), its weight (the tied embedding's when `GPTModel` passes it) and its TP
group, and returns the weighted per-token loss as [s, b, 1]. `GPTModel` hands that back as
[b, s, 1] (its "logits" path, taken when it is called without labels), which works unchanged on
megatron-core 0.16.1 through 0.19.x. Outside the context the layer is Megatron's own (inference,
evaluation of logits, checkpoints: the parameters and their names are untouched).

The per-token log p(label) of the same pass (no gradient) is left on the `FusedTargets` object,
for reports (l_t = -log p) and the long-context scorer. Not supported (refused with a message):
Multi-Token Prediction (its extra heads would still build logits) and an output layer with a bias.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tokweight.errors import ConfigError

_ATTRIBUTE = "_tokweight_fused"


@dataclass
class FusedTargets:
    """Inputs of one fused forward ([s, b], the output layer's layout) and its log-probs output."""

    labels: torch.Tensor
    weights: torch.Tensor
    logprobs: Optional[torch.Tensor] = None


@dataclass
class _FusedState:
    implementation: str
    chunk_size: Optional[int]
    original_forward: object
    targets: Optional[FusedTargets] = None


def _unwrap(model):
    seen = 0
    while not hasattr(model, "output_layer") and hasattr(model, "module") and seen < 8:
        model, seen = model.module, seen + 1
    return model


def output_layer_of(model):
    """The model's output layer, or None on a pipeline stage without one (not the last)."""
    inner = _unwrap(model)
    if getattr(getattr(inner, "config", None), "mtp_num_layers", None):
        raise ConfigError("the fused linear cross-entropy does not support Multi-Token Prediction (mtp_num_layers)")
    return getattr(inner, "output_layer", None)


def fused_enabled(model) -> bool:
    """Whether `enable_fused_output` is on for this model's output layer."""
    layer = output_layer_of(model)
    return layer is not None and getattr(layer, _ATTRIBUTE, None) is not None


def enable_fused_output(model, implementation: str = "torch", chunk_size: Optional[int] = None):
    """Give `model`'s output layer the fused forward (module docstring); returns the layer (None
    on a stage without one). Calling it again only updates the implementation and chunk size."""
    from megatron_tokweight.loss.fused_linear_cross_entropy import (
        IMPLEMENTATIONS,
        chunk_tokens,
    )

    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"the fused cross-entropy implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if chunk_size is not None:
        chunk_tokens(1, chunk_size, 1)  # validates
    layer = output_layer_of(model)
    if layer is None:
        return None
    if getattr(layer, "bias", None) is not None and not getattr(layer, "skip_bias_add", False):
        raise ConfigError("the fused linear cross-entropy needs an output layer without bias (GPTModel's has none)")
    state = getattr(layer, _ATTRIBUTE, None)
    if state is None:
        state = _FusedState(implementation, chunk_size, layer.forward)
        setattr(layer, _ATTRIBUTE, state)
        layer.forward = _fused_forward(layer, state)
    state.implementation, state.chunk_size = implementation, chunk_size
    return layer


def _fused_forward(layer, state: _FusedState):
    def forward(input_, weight=None, runtime_gather_output=None, **kwargs):
        targets = state.targets
        if targets is None:
            return state.original_forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        from megatron_tokweight.loss.fused_linear_cross_entropy import (
            fused_linear_weighted_cross_entropy,
        )

        weighted, logprobs = fused_linear_weighted_cross_entropy(
            input_, layer.weight if weight is None else weight, targets.labels, targets.weights, layer.tp_group,
            sequence_parallel=bool(getattr(layer, "sequence_parallel", False)),
            chunk_size=state.chunk_size, implementation=state.implementation, return_logprobs=True,
            main_grad_fusion=bool(getattr(layer, "gradient_accumulation_fusion", False)),
        )
        targets.logprobs = logprobs
        return weighted.unsqueeze(-1), None

    return forward


@contextlib.contextmanager
def fused_targets(model, labels: torch.Tensor, weights: torch.Tensor):
    """While active, the fused output layer of `model` computes the loss for `labels` / `weights`
    ([b, s], the batch layout; transposed here to the layer's [s, b]). Yields the `FusedTargets`
    (its `logprobs` are set by the forward, on the stage that has the output layer)."""
    layer = output_layer_of(model)
    targets = FusedTargets(labels.transpose(0, 1), weights.transpose(0, 1).float())
    state = None if layer is None else getattr(layer, _ATTRIBUTE, None)
    if layer is not None and state is None:
        raise ConfigError("fused_targets needs enable_fused_output(model) first")
    if state is not None:
        state.targets = targets
    try:
        yield targets
    finally:
        if state is not None:
            state.targets = None


def fused_model_loss(targets: FusedTargets, output: torch.Tensor):
    """(w_t * l_t, l_t) in the batch layout [b, s] from the model's output [b, s, 1] under
    `fused_targets`; l_t = -log p(label) without gradient (for the reports)."""
    if output.dim() != 3 or output.shape[-1] != 1 or targets.logprobs is None:
        raise ConfigError(
            f"the model returned {tuple(output.shape)}, not the fused per-token loss [b, s, 1]: is "
            "enable_fused_output(model) on and the model called without labels?"
        )
    return output.squeeze(-1), -targets.logprobs.transpose(0, 1)


def packed_fused_loss(model, batch):
    """(w_t * l_t, l_t) [1, T] of a flattened THD micro-batch through the fused output layer: the
    fused counterpart of `gpt.packed_token_loss` (which returns l_t from the logits)."""
    from megatron_tokweight.model.gpt import packed_logits

    with fused_targets(model, batch["labels"], batch["loss_weights"]) as targets:
        output = packed_logits(model, batch)  # [T, 1, 1]: GPTModel's [b, s, 1] transposed
    return fused_model_loss(targets, output.transpose(0, 1))


def fused_logprobs(model, batch, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) [T] (fp32, no gradient) of a flattened THD micro-batch through the fused
    output layer: the scorer's forward without logits. `labels` [T] may differ from the batch's."""
    from megatron_tokweight.model.gpt import packed_logits

    labels = labels.reshape(1, -1)
    with fused_targets(model, labels, torch.ones(labels.shape, device=labels.device)) as targets:
        packed_logits(model, batch)
    return targets.logprobs.reshape(-1)
