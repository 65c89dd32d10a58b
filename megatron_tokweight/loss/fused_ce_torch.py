"""Per-chunk kernels of `fused_linear_cross_entropy` in plain torch: the reference and the fallback.

`chunk_statistics(logits, local, mine)` -> (state, local max, sum of exp(z - local max), target
logit z_y (0 where this shard does not hold the label)); `chunk_gradient_(state, max, lse, local,
mine, scale, dtype)` -> (softmax - onehot) * scale per row, in `dtype`. Here `state` is the chunk's
exp(z - local max) in fp32, computed in place over fp32 logits (a copy for bf16/fp16), so the
gradient reuses it instead of a second exp.
"""
import torch

# the chunk pass stores the logits as [V/TP, c] and hands these kernels its [c, V/TP] transpose:
# the faster matmul on CPU, and torch's reductions follow the strides either way
VOCAB_MAJOR = True


def chunk_statistics(logits: torch.Tensor, local: torch.Tensor, mine: torch.Tensor):
    z = logits if logits.dtype == torch.float32 else logits.float()
    target = torch.where(mine, z.gather(1, local.unsqueeze(1)).squeeze(1), torch.zeros((), dtype=z.dtype, device=z.device))
    maximum = z.amax(dim=-1)  # no argmax: max(dim) also computes indices (4x slower on CPU, 20x strided)
    state = z.sub_(maximum.unsqueeze(1)).exp_()
    return state, maximum, state.sum(dim=-1), target


def chunk_gradient_(state, maximum, lse, local, mine, scale, dtype):
    scale = scale.to(state.dtype)
    grad = state.mul_((torch.exp(maximum - lse) * scale).unsqueeze(1))  # softmax * scale, one pass
    rows = torch.arange(grad.shape[0], device=grad.device)[mine]
    grad[rows, local[mine]] -= scale[mine]
    return grad if grad.dtype == dtype else grad.to(dtype)
