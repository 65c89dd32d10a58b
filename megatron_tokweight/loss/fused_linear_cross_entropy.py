"""The output layer and the weighted vocab-parallel cross-entropy in one pass over token chunks.

`fused_linear_weighted_cross_entropy(hidden, weight, labels, weights, tp_group)` returns w_t * l_t
[s, b] fp32, equal (loss and gradients for `hidden` and `weight`) to Megatron's output layer
(`ColumnParallelLinear`, vocabulary-sharded, optionally sequence parallel) followed by
`weighted_cross_entropy`, without ever holding the [s, b, V / TP] logits.

How: the tokens are walked in chunks. Per chunk: the logits shard (one matmul, in the input
dtype as Megatron's output layer computes them, then fp32), the TP max and (sum-exp, target logit)
all-reduces, and, because the loss is the end of the graph and w_t is known in the forward
(docs/CONTRACTS.md section 1), the gradient right away: (softmax - onehot) * w_t times the weight
shard (hidden gradient) and times the chunk's hidden states (weight gradient, accumulated). The
backward then only scales the stored gradients by grad_output.

That shortcut holds while `grad_output` is one value for every token, which is the schedules'
case (a sum times a constant: autograd hands an expanded scalar, no host sync to see it). For any
other `grad_output` the backward recomputes every chunk with the per-token factors: exact, at the
cost of the second pass the shortcut avoids (`FusedStats.recomputed_backwards` counts them).

Collectives, all on `tp_group` (none for a group of one): under sequence parallel one all-gather
of the hidden states (sequence dimension) in the forward; per chunk one all-gather of each
shard's (max, sum-exp, target logit) [3, chunk]; one all-reduce SUM (reduce-scatter under
sequence parallel) of the hidden-state gradient [s, b, h], done in the forward when gradients
are needed. The backward communicates only when it recomputes. Nothing over DP, CP or PP.

Implementations (chosen explicitly, `implementation=`): "torch" (CPU and GPU; the reference and the
fallback) and "triton" (`fused_ce_triton`: the per-chunk softmax statistics and the in-place
gradient as Triton kernels, bf16/fp32 logits in, fp32 arithmetic; the matmuls stay cuBLAS).
"""
import dataclasses
from typing import Optional

import torch

from megatron_tokweight.common.process_groups import group_rank, group_size
from megatron_tokweight.errors import ConfigError, DataFormatError
from megatron_tokweight.loss import checks

IMPLEMENTATIONS = ("torch", "triton")
# the one setting users choose (TrainConfig.fused_cross_entropy, --tokweight-fused-ce): off = Megatron's path
FUSED_CROSS_ENTROPY = ("off",) + IMPLEMENTATIONS
# default chunk: DEFAULT_CHUNK_TOKENS tokens, fewer where their fp32 logits would pass
# DEFAULT_CHUNK_BYTES. Matmul speed follows the token count: each chunk re-reads the weight shard
# twice and updates the whole fp32 weight gradient (a rank-c update). On CPU (MKL, 2 cores,
# V 152,064, h 1,024) an AMD EPYC took 1.10x Megatron's time with 256-token chunks and 1.00-1.13x
# per round with 384; an AVX-512 Xeon 0.72-0.94x with 384. The bytes cap bounds the buffer for
# large vocabulary shards (benchmarks/bench_fused_ce.py)
DEFAULT_CHUNK_TOKENS = 384
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclasses.dataclass
class FusedStats:
    """Process-wide counters, for tests and benchmarks: how often each path ran."""

    forwards: int = 0
    shortcut_backwards: int = 0
    recomputed_backwards: int = 0


STATS = FusedStats()


def chunk_tokens(local_vocab: int, chunk_size: Optional[int], num_tokens: int) -> int:
    """Tokens per chunk: `chunk_size`, or DEFAULT_CHUNK_TOKENS capped at DEFAULT_CHUNK_BYTES of
    fp32 logits (in multiples of 64 tokens from 64 up: whole GEMM tiles)."""
    if chunk_size is None:
        chunk_size = min(DEFAULT_CHUNK_TOKENS, max(16, DEFAULT_CHUNK_BYTES // (4 * max(local_vocab, 1))))
        chunk_size -= chunk_size % 64 if chunk_size >= 64 else 0
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return max(1, min(chunk_size, num_tokens))


def _kernels(implementation: str):
    if implementation == "torch":
        from megatron_tokweight.loss import fused_ce_torch as kernels
    elif implementation == "triton":
        from megatron_tokweight.loss import fused_ce_triton as kernels

        kernels.require_triton()
    else:
        raise ConfigError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return kernels


def _vocab_start(local_vocab: int, tp_group) -> int:
    return group_rank(tp_group) * local_vocab  # Megatron's VocabUtility: contiguous equal shards


def _gather_sequence(hidden: torch.Tensor, tp_group) -> torch.Tensor:
    parts = [torch.empty_like(hidden) for _ in range(group_size(tp_group))]
    torch.distributed.all_gather(parts, hidden.contiguous(), group=tp_group)
    return torch.cat(parts, dim=0)


def _full_sequence(hidden: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """The whole sequence of hidden states: all-gathered under sequence parallel, else as given."""
    return _gather_sequence(hidden, tp_group) if sequence_parallel and group_size(tp_group) > 1 else hidden


def _reduce_hidden_grad(grad: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """Sum the per-shard hidden gradients over TP (what the output layer's input path does in
    Megatron's backward: all-reduce, or reduce-scatter along the sequence under SP)."""
    size = group_size(tp_group)
    if size == 1:
        return grad
    if not sequence_parallel:
        torch.distributed.all_reduce(grad, group=tp_group)
        return grad
    chunks = [c.contiguous() for c in grad.chunk(size, dim=0)]
    out = torch.empty_like(chunks[0])
    torch.distributed.reduce_scatter(out, chunks, group=tp_group)
    return out


def _chunk_logits(xc: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor, vocab_major: bool) -> torch.Tensor:
    """The chunk's logits [c, V/TP] in the input dtype (as Megatron's output layer computes them),
    written into `buffer`. `vocab_major`: stored as [V/TP, c] and returned as its transpose: on CPU
    (MKL) the product with the weight's rows as the long side runs ~20% faster at c = 256."""
    c, v = xc.shape[0], weight.shape[0]
    if vocab_major:
        return torch.mm(weight, xc.t(), out=buffer[: v * c].view(v, c)).t()
    return torch.mm(xc, weight.t(), out=buffer[: c * v].view(c, v))


def merge_shard_statistics(maximum, sum_exp, target, tp_group):
    """(logsumexp, target logit) over the vocabulary shards of the TP group, from each shard's
    (max, sum exp(z - max), target logit or 0), all of one shape: one all-gather of [3, ...]
    rather than an all-reduce MAX then SUM, so the ranks meet once; every rank combines the same
    gathered values in the same order (the fused loss per chunk, the scorer's log-probs)."""
    mine = torch.stack([maximum, sum_exp, target])
    parts = [torch.empty_like(mine) for _ in range(group_size(tp_group))]
    torch.distributed.all_gather(parts, mine, group=tp_group)
    shards = torch.stack(parts)  # [TP, 3, c]
    global_max = shards[:, 0].amax(dim=0)
    total = (shards[:, 1] * torch.exp(shards[:, 0] - global_max)).sum(dim=0)
    return global_max + torch.log(total), shards[:, 2].sum(dim=0)


def _chunk_pass(kernels, x, weight, labels, token_weights, factors, vocab_start, tp_group, chunk, need_grad, lse_in=None):
    """One walk over the token chunks: per-token loss (-log p(label)) and logsumexp (fp32) and, when
    `need_grad`, the fp32 gradients for x [N, h] (this shard's part of the sum over TP) and for the
    weight shard, each token's logit gradient scaled by `token_weights` (times `factors` if given).
    `lse_in`: the forward's logsumexp, reused by the recompute instead of the collectives."""
    n, local_vocab = x.shape[0], weight.shape[0]
    tp = group_size(tp_group)
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    lse_all = torch.empty_like(loss)
    grad_x = torch.empty(n, x.shape[1], dtype=torch.float32, device=x.device) if need_grad else None
    # written by the first chunk, accumulated by the rest (no zero fill of |W| fp32)
    grad_w = (torch.empty if n else torch.zeros)(weight.shape, dtype=torch.float32, device=x.device) if need_grad else None
    # one logits buffer for every chunk: no allocation (and, on CPU, no fresh pages) per chunk
    buffer = torch.empty(min(chunk, n) * local_vocab, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        xc = x[start:end]
        logits = _chunk_logits(xc, weight, buffer, kernels.VOCAB_MAJOR)
        local = labels[start:end] - vocab_start
        mine = (local >= 0) & (local < local_vocab)
        local = torch.where(mine, local, torch.zeros_like(local))
        state, maximum, sum_exp, target = kernels.chunk_statistics(logits, local, mine)
        if lse_in is None:
            if tp > 1:
                lse, target = merge_shard_statistics(maximum, sum_exp, target, tp_group)
            else:
                lse = maximum + torch.log(sum_exp)
            lse_all[start:end] = lse
            loss[start:end] = lse - target
        else:
            lse = lse_in[start:end]
        if need_grad:
            scale = token_weights[start:end] if factors is None else token_weights[start:end] * factors[start:end]
            grad_logits = kernels.chunk_gradient_(state, maximum, lse, local, mine, scale, x.dtype)
            beta = 0 if start == 0 else 1
            if grad_logits.dtype == torch.float32:
                torch.mm(grad_logits, weight, out=grad_x[start:end])
                grad_w.addmm_(grad_logits.t(), xc, beta=beta)  # beta 0 ignores the empty memory
            else:  # bf16/fp16: the products in the input dtype (as Megatron's dgrad/wgrad), summed in fp32
                grad_x[start:end] = torch.matmul(grad_logits, weight)
                product = torch.matmul(grad_logits.t(), xc)
                if beta == 0:
                    grad_w.copy_(product)
                else:
                    grad_w.add_(product)
            del grad_logits
        del logits, state
    return loss, lse_all, grad_x, grad_w


class _FusedLinearWeightedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, tp_group, sequence_parallel, chunk, implementation,
                need_grad, main_grad_fusion):
        kernels = _kernels(implementation)
        full = _full_sequence(hidden, tp_group, sequence_parallel)
        s, b, h = full.shape
        x = full.reshape(s * b, h)
        flat_labels, flat_weights = labels.reshape(-1), token_weights.reshape(-1).float()
        start = _vocab_start(weight.shape[0], tp_group)
        loss, lse, grad_x, grad_w = _chunk_pass(
            kernels, x, weight, flat_labels, flat_weights, None, start, tp_group, chunk, need_grad
        )
        STATS.forwards += 1
        weighted = (loss * flat_weights).reshape(s, b)
        logprob = loss.neg_().reshape(s, b)
        ctx.mark_non_differentiable(logprob)
        if need_grad:
            grad_x = _reduce_hidden_grad(grad_x.reshape(s, b, h), tp_group, sequence_parallel)
            ctx.save_for_backward(hidden, weight, flat_labels, flat_weights, lse)
            ctx.grads = (grad_x, grad_w)
        ctx.settings = (tp_group, sequence_parallel, chunk, implementation, main_grad_fusion, start)
        return weighted, logprob

    @staticmethod
    def backward(ctx, grad_weighted, _grad_logprob):
        hidden, weight, labels, token_weights, lse = ctx.saved_tensors
        tp_group, sequence_parallel, chunk, implementation, main_grad_fusion, start = ctx.settings
        factor = uniform_value(grad_weighted)
        if factor is not None:
            grad_x, grad_w = ctx.grads
            grad_x, grad_w = grad_x.mul_(factor), grad_w.mul_(factor)
            STATS.shortcut_backwards += 1
        else:  # per-token factors that differ: recompute every chunk with them (exact)
            full = _full_sequence(hidden, tp_group, sequence_parallel)
            s, b, h = full.shape
            _, _, grad_x, grad_w = _chunk_pass(
                _kernels(implementation), full.reshape(s * b, h), weight, labels, token_weights,
                grad_weighted.reshape(-1).float(), start, tp_group, chunk, True, lse_in=lse,
            )
            grad_x = _reduce_hidden_grad(grad_x.reshape(s, b, h), tp_group, sequence_parallel)
            STATS.recomputed_backwards += 1
        ctx.grads = None
        grad_weight = _weight_gradient(weight, grad_w, main_grad_fusion)
        return grad_x.to(hidden.dtype), grad_weight, None, None, None, None, None, None, None, None


def uniform_value(grad: torch.Tensor) -> Optional[torch.Tensor]:
    """The one value of `grad` as a 0-dim tensor when every element holds it, else None.

    An expanded scalar (what autograd gives for `loss.sum() * c`) is recognised from its strides,
    with no host sync; any other tensor is compared on the device (one sync)."""
    if grad.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=grad.device)
    first = grad.reshape(-1)[0]
    if all(st == 0 for st in grad.stride()):
        return first.float()
    return first.float() if bool((grad == first).all()) else None


def _weight_gradient(weight: torch.Tensor, grad_w: torch.Tensor, main_grad_fusion: bool):
    """The weight gradient as Megatron's linear layers hand it: with gradient-accumulation fusion
    it is added to `weight.main_grad` (fp32) and a dummy is returned (`grad_added_to_main_grad`)."""
    if main_grad_fusion and hasattr(weight, "main_grad"):
        weight.main_grad.add_(grad_w)
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = True
            return torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        return None
    return grad_w.to(weight.dtype)


def _validate(hidden, weight, labels, token_weights, tp_group, sequence_parallel) -> None:
    for name, tensor in (("hidden", hidden), ("weight", weight), ("labels", labels), ("weights", token_weights)):
        if not isinstance(tensor, torch.Tensor):
            raise DataFormatError(f"fused_linear_weighted_cross_entropy: {name} must be a tensor, got {type(tensor).__name__}")
    if hidden.dim() != 3 or weight.dim() != 2:
        raise DataFormatError(
            f"hidden must be [s, b, h] and the weight shard [vocab / TP, h]; got hidden {tuple(hidden.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[-1]:
        raise DataFormatError(f"hidden size {hidden.shape[-1]} (hidden {tuple(hidden.shape)}) != weight's {weight.shape[-1]} (weight {tuple(weight.shape)})")
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise DataFormatError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating-point dtype")
    tp = group_size(tp_group)
    seq = hidden.shape[0] * (tp if sequence_parallel else 1)
    if tuple(labels.shape) != (seq, hidden.shape[1]):
        where = f" (sequence parallel: the local {hidden.shape[0]} positions x TP {tp})" if sequence_parallel else ""
        raise DataFormatError(
            f"labels have shape {tuple(labels.shape)} but hidden {tuple(hidden.shape)} needs [{seq}, {hidden.shape[1]}]{where}"
        )
    checks.check_same_shape("weights", token_weights, "labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataFormatError(f"labels must be an integer tensor, got {labels.dtype}")
    checks.check_weights(token_weights, name="weights")
    local_vocab = weight.shape[0]
    if tp > 1:  # every shard must hold the same number of rows, or the vocabulary ids disagree
        sizes = torch.tensor([local_vocab, -local_vocab], dtype=torch.int64, device=weight.device)
        torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX, group=tp_group)
        if int(sizes[0]) != -int(sizes[1]):
            raise DataFormatError(
                f"the weight shards of the TP group disagree: this rank's has {local_vocab} rows, the group's "
                f"range from {-int(sizes[1])} to {int(sizes[0])}; each rank must hold vocab / TP rows"
            )
    checks.check_labels(labels, local_vocab * tp)


def fused_linear_weighted_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    tp_group=None,
    *,
    sequence_parallel: bool = False,
    chunk_size: Optional[int] = None,
    implementation: str = "torch",
    return_logprobs: bool = False,
    main_grad_fusion: bool = False,
    validate: bool = True,
):
    """w_t * l_t [s, b] fp32 from the last hidden states, without the logits (module docstring).

    Args:
        hidden: [s, b, h], or under `sequence_parallel` this rank's [s / TP, b, h] sequence shard
            (Megatron's layout: rank r holds positions [r s / TP, (r + 1) s / TP)).
        weight: this rank's output-weight shard [vocab / TP, h] (rank r: ids [r v, (r + 1) v)),
            the same tensor as the output layer's (or the tied embedding's) weight.
        labels: [s, b] integer ids in [0, vocab), the same on every TP rank.
        weights: [s, b] per-token weights, finite and >= 0, the same on every TP rank.
        tp_group: the tensor-parallel group (None: no TP).
        chunk_size: tokens per chunk (None: 384, fewer where their fp32 logits would pass 256 MiB,
            i.e. shards of more than 174,762 rows; `chunk_tokens`).
        implementation: "torch" or "triton" (GPU tensors, or CPU under TRITON_INTERPRET=1).
        return_logprobs: also return log p(label) [s, b] fp32 (no gradient; the long-context
            scorer's input).
        main_grad_fusion: add the weight gradient to `weight.main_grad` (Megatron's
            gradient-accumulation fusion) instead of returning it.
        validate: check shapes, dtypes, labels, weights and the shards' sizes before any chunk
            runs (one host sync, one small all-reduce under TP).

    Gradients are computed in the forward when grad mode is on and `hidden` or `weight` requires
    them; under `torch.no_grad()` only the loss (and log-probs) are.
    """
    if validate:
        _validate(hidden, weight, labels, weights, tp_group, sequence_parallel)
    if not isinstance(sequence_parallel, bool):
        raise ConfigError(f"sequence_parallel must be True or False, got {sequence_parallel!r}")
    tokens = labels.numel()
    chunk = chunk_tokens(weight.shape[0], chunk_size, tokens)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    weighted, logprob = _FusedLinearWeightedCE.apply(
        hidden, weight, labels, weights, tp_group, sequence_parallel, chunk, implementation, need_grad,
        main_grad_fusion,
    )
    return (weighted, logprob) if return_logprobs else weighted


def fused_target_logprobs(hidden, weight, labels, tp_group=None, *, sequence_parallel=False, chunk_size=None,
                          implementation="torch") -> torch.Tensor:
    """log p(label) [s, b] fp32 from hidden states and the output-weight shard, no logits held."""
    with torch.no_grad():
        ones = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
        return fused_linear_weighted_cross_entropy(
            hidden, weight, labels, ones, tp_group, sequence_parallel=sequence_parallel, chunk_size=chunk_size,
            implementation=implementation, return_logprobs=True,
        )[1]
