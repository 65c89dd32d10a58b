"""Packed (THD) causal core attention for CPU, and the layer spec that uses it.

Megatron-Core's local `DotProductAttention` refuses `PackedSeqParams` (and calls CUDA), and the
Transformer Engine attention that handles THD needs a GPU. `PackedCoreAttention` is a drop-in
`core_attention` for the local GPT layer spec: block-diagonal causal attention, one block per
segment of `cu_seqlens`, so no token attends to another sample of the same packed row.

`gpt_layer_spec(use_te)` picks the spec: Transformer Engine on GPU (THD is then selected by the
`qkv_format="thd"` of the `PackedSeqParams` passed to the forward), the local spec with
`PackedCoreAttention` otherwise.
"""
import importlib.util
import math
from typing import List, Optional, Tuple

import torch

# Whether Transformer Engine is installed (found, not imported: nothing heavy loads on import).
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

# Segments whose lengths are within this ratio of a bucket's longest share one padded batched call.
# The padding costs at most BUCKET_RATIO**2 of that bucket's exact work, while many tiny
# per-segment SDPA calls would each cost far more in fixed overhead on CPU.
BUCKET_RATIO = 1.5


def segment_bounds(packed_seq_params, total: int) -> List[Tuple[int, int]]:
    """[(start, length)] of every segment of a THD row of `total` tokens.

    `start` is the physical offset (`cu_seqlens_*_padded` when given, as TE reads it) and `length`
    the actual tokens (`cu_seqlens_*`); positions between a segment's actual end and the next
    physical start are padding that attends to nothing and gets a zero output.
    """
    actual = packed_seq_params.cu_seqlens_q
    padded = packed_seq_params.cu_seqlens_q_padded
    if actual is None:
        raise ValueError("PackedSeqParams.cu_seqlens_q is required for qkv_format='thd'")
    if packed_seq_params.cu_seqlens_kv is not None and not torch.equal(
        packed_seq_params.cu_seqlens_kv, actual
    ):
        raise ValueError("self-attention on packed rows needs cu_seqlens_kv == cu_seqlens_q")
    actual = actual.tolist()
    padded = actual if padded is None else padded.tolist()
    if len(padded) != len(actual):
        raise ValueError(
            f"cu_seqlens_q_padded has {len(padded)} entries but cu_seqlens_q has {len(actual)}"
        )
    if actual[0] != 0 or padded[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the packed length {total}; "
            f"got {actual[0]}..{padded[-1]}"
        )
    bounds = []
    for i in range(len(actual) - 1):
        start, length, room = padded[i], actual[i + 1] - actual[i], padded[i + 1] - padded[i]
        if length < 0 or length > room:
            raise ValueError(
                f"segment {i}: {length} tokens do not fit its physical span of {room} "
                f"(cu_seqlens={actual}, cu_seqlens_padded={padded})"
            )
        if length > 0:
            bounds.append((start, length))
    return bounds


def _buckets(bounds: List[Tuple[int, int]]) -> List[List[Tuple[int, int]]]:
    """Group segments by similar length (longest first) for one batched call per group."""
    order = sorted(bounds, key=lambda b: -b[1])
    groups: List[List[Tuple[int, int]]] = []
    for seg in order:
        if groups and groups[-1][0][1] <= BUCKET_RATIO * seg[1]:
            groups[-1].append(seg)
        else:
            groups.append([seg])
    return groups


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: List[Tuple[int, int]],
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention within each segment of a THD row.

    query [t, heads, d], key/value [t, heads, d] (GQA already expanded); returns [t, heads, d],
    zero at positions outside every segment. Segments of similar length run as one batched SDPA
    call with right padding: with `is_causal` a real query never sees a padded key (all padded keys
    come after it), so no extra mask is needed and the result equals the per-segment computation.
    """
    total, heads, dim = query.shape
    out = query.new_zeros(total, heads, dim)
    for group in _buckets(bounds):
        longest = group[0][1]
        # index [n, longest] into the row; padded slots point at any valid row and are discarded
        starts = torch.tensor([s for s, _ in group], dtype=torch.long)
        lengths = torch.tensor([n for _, n in group], dtype=torch.long)
        steps = torch.arange(longest, dtype=torch.long)
        index = starts[:, None] + steps[None, :]
        valid = steps[None, :] < lengths[:, None]
        index = torch.where(valid, index, starts[:, None])

        def gather(x):  # [t, h, d] -> [n, h, longest, d]
            return x[index].permute(0, 2, 1, 3)

        ctx = torch.nn.functional.scaled_dot_product_attention(
            gather(query), gather(key), gather(value),
            dropout_p=dropout_p, is_causal=True, scale=scale,
        )
        ctx = ctx.permute(0, 2, 1, 3)  # [n, longest, h, d]
        out = out.index_put((index[valid],), ctx[valid])
    return out


def causal_attention_sbhd(query, key, value, attention_mask, scale, dropout_p=0.0):
    """Plain causal attention for [s, b, heads, d]; returns [s, b, heads, d].

    `attention_mask` follows Megatron's convention (True = masked out), broadcastable to
    [b, heads, s, s]; it is combined with the causal mask.
    """
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
    if attention_mask is None:
        ctx = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale
        )
    else:
        s = q.shape[2]
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        allowed = ~(attention_mask.to(torch.bool) | causal)
        ctx = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale
        )
    return ctx.permute(2, 0, 1, 3)


def _core_attention_class():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.utils import divide

    class PackedCoreAttention(MegatronModule):
        """`core_attention` for Megatron's local spec that honours `PackedSeqParams` (THD).

        THD: query/key/value arrive as [t, heads/tp, d] (batch 1 squeezed by `Attention`); returns
        [t, 1, heads/tp * d]. SBHD without packed params: [s, b, heads/tp, d] -> [s, b, heads/tp*d].
        """

        def __init__(
            self,
            config,
            layer_number: int,
            attn_mask_type,
            attention_type: str,
            attention_dropout: Optional[float] = None,
            softmax_scale: Optional[float] = None,
            cp_comm_type: Optional[str] = None,
            pg_collection=None,
        ):
            super().__init__(config=config)
            if config.context_parallel_size != 1:
                raise ValueError(
                    "PackedCoreAttention runs without context parallelism "
                    f"(context_parallel_size={config.context_parallel_size}); "
                    "use the Transformer Engine spec for CP"
                )
            if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
                raise ValueError(f"PackedCoreAttention is causal only, got {attn_mask_type}")
            if config.window_size is not None:
                raise ValueError("PackedCoreAttention does not implement sliding-window attention")
            if getattr(config, "softmax_type", "vanilla") != "vanilla":
                raise ValueError("PackedCoreAttention supports softmax_type='vanilla' only")
            if pg_collection is None:
                from megatron.core.process_groups_config import ProcessGroupCollection

                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
            tp_size = pg_collection.tp.size()
            self.heads_per_partition = divide(config.num_attention_heads, tp_size)
            self.groups_per_partition = divide(config.num_query_groups, tp_size)
            head_dim = config.kv_channels
            # Megatron's query-key layer scaling divides the scale by the layer number and
            # multiplies it back inside an fp32 softmax: a no-op on the result, so it is omitted.
            self.softmax_scale = (
                softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
            )
            self.dropout_p = (
                config.attention_dropout if attention_dropout is None else attention_dropout
            )

        def _expand_groups(self, key, value, head_dim_axis):
            repeat = self.heads_per_partition // self.groups_per_partition
            if repeat > 1:
                key = key.repeat_interleave(repeat, dim=head_dim_axis)
                value = value.repeat_interleave(repeat, dim=head_dim_axis)
            return key, value

        def forward(
            self,
            query,
            key,
            value,
            attention_mask,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
        ):
            if attention_bias is not None:
                raise ValueError("PackedCoreAttention does not support attention_bias")
            dropout_p = self.dropout_p if self.training else 0.0
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                if query.dim() != 3:
                    raise ValueError(f"THD query must be [t, heads, d], got {tuple(query.shape)}")
                key, value = self._expand_groups(key, value, 1)
                bounds = segment_bounds(packed_seq_params, query.shape[0])
                ctx = packed_causal_attention(
                    query, key, value, bounds, self.softmax_scale, dropout_p
                )
                # [t, 1, h*d]: a [t, h*d] tensor would broadcast wrongly in the residual add
                return ctx.reshape(ctx.shape[0], 1, -1)
            if packed_seq_params is not None:
                raise ValueError(
                    f"PackedCoreAttention supports qkv_format 'thd' or no packed params, "
                    f"got {packed_seq_params.qkv_format!r}"
                )
            key, value = self._expand_groups(key, value, 2)
            ctx = causal_attention_sbhd(
                query, key, value, attention_mask, self.softmax_scale, dropout_p
            )
            return ctx.reshape(ctx.shape[0], ctx.shape[1], -1)

    return PackedCoreAttention


_CLASS = None


def __getattr__(name):
    # PackedCoreAttention subclasses a Megatron module: built on first use so that importing this
    # module does not import Megatron.
    global _CLASS
    if name == "PackedCoreAttention":
        if _CLASS is None:
            _CLASS = _core_attention_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def gpt_layer_spec(use_te: bool = False, normalization: Optional[str] = None, **kwargs):
    """The GPT layer spec for packed rows.

    use_te=True: Megatron's Transformer Engine spec (GPU; packed rows need the `PackedSeqParams`
    built with qkv_format="thd"). use_te=False: Megatron's local spec with `PackedCoreAttention`.
    Extra keyword arguments go to the Megatron spec function.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        if not HAVE_TE:
            raise ImportError(
                "use_te=True needs Transformer Engine (not importable here); use use_te=False on CPU"
            )
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization, **kwargs)
    attention = spec.submodules.self_attention
    if not hasattr(attention.submodules, "core_attention"):
        raise ValueError("the local spec built here has no core_attention to replace (MLA?)")
    attention.submodules.core_attention = __getattr__("PackedCoreAttention")
    return spec
