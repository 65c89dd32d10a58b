"""Per-chunk kernels of `fused_linear_cross_entropy` in Triton (same contract as `fused_ce_torch`).

`chunk_statistics` reads the chunk's logits (bf16, fp16 or fp32) once per row in vocabulary tiles,
with an online max / sum-exp in fp32, and picks the target logit; `chunk_gradient_` overwrites the
logits with (softmax - onehot) * scale, computed in fp32 and stored in the logits' dtype. So the
Triton path keeps no fp32 copy of a bf16 chunk: its working set is the chunk's logits alone.

Triton is imported on first use (`require_triton`); CPU tensors run only under TRITON_INTERPRET=1
(Triton's interpreter, which the tests use), GPU tensors compile.
"""
import functools
import os

import torch

from megatron_tokweight.errors import ConfigError

BLOCK = 1024
# the kernels walk each token's logits as one contiguous row: [c, V/TP] storage
VOCAB_MAJOR = False


def require_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            "implementation='triton' needs the triton package (pip install triton); use implementation='torch'"
        ) from error


def _check_device(logits: torch.Tensor) -> None:
    if logits.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "the Triton kernels run on GPU tensors, or on CPU under TRITON_INTERPRET=1 (the interpreter); "
            "use implementation='torch' on CPU"
        )


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def statistics(logits, row_stride, vocab, local, mine, max_out, sum_out, target_out, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits + row.to(tl.int64) * row_stride
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            running_max = new_max
        label = tl.load(local + row)
        held = tl.load(mine + row)
        target = tl.load(base + label).to(tl.float32)
        tl.store(max_out + row, running_max)
        tl.store(sum_out + row, running_sum)
        tl.store(target_out + row, tl.where(held != 0, target, 0.0))

    @triton.jit
    def gradient(logits, row_stride, vocab, lse, local, mine, scale, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = logits + row.to(tl.int64) * row_stride
        row_lse = tl.load(lse + row)
        row_scale = tl.load(scale + row)
        label = tl.load(local + row)
        held = tl.load(mine + row)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < vocab
            z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            grad = tl.exp(z - row_lse) - tl.where((cols == label) & (held != 0), 1.0, 0.0)
            tl.store(base + cols, (grad * row_scale).to(logits.dtype.element_ty), mask=inside)

    return statistics, gradient


def chunk_statistics(logits: torch.Tensor, local: torch.Tensor, mine: torch.Tensor):
    _check_device(logits)
    statistics, _ = _kernels()
    logits = logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
    if rows:
        statistics[(rows,)](logits, logits.stride(0), vocab, local.contiguous(), mine.to(torch.int8).contiguous(),
                            out[0], out[1], out[2], BLOCK=min(BLOCK, _next_power_of_two(vocab)))
    return logits, out[0], out[1], out[2]


def chunk_gradient_(state, maximum, lse, local, mine, scale, dtype):
    _, gradient = _kernels()
    rows, vocab = state.shape
    if rows:
        gradient[(rows,)](state, state.stride(0), vocab, lse.contiguous(), local.contiguous(),
                          mine.to(torch.int8).contiguous(), scale.float().contiguous(),
                          BLOCK=min(BLOCK, _next_power_of_two(vocab)))
    return state if state.dtype == dtype else state.to(dtype)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
