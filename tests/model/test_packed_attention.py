"""PackedCoreAttention against a dense masked softmax reference written out in float64."""
import math

import pytest
import torch

from megatron_tokweight.model.packed_attention import (
    HAVE_TE,
    _buckets,
    causal_attention_sbhd,
    packed_causal_attention,
    segment_bounds,
)


def dense_reference(q, k, v, segment_of, scale):
    """softmax(q k^T * scale + mask) v with mask = same segment and key <= query; float64.

    segment_of[t] = segment index, -1 for positions in no segment (their output is 0).
    """
    q, k, v = (x.double() for x in (q, k, v))
    t = q.shape[0]
    pos = torch.arange(t)
    allowed = (segment_of[:, None] == segment_of[None, :]) & (pos[None, :] <= pos[:, None])
    allowed &= (segment_of >= 0)[:, None]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no allowed key -> 0
    return torch.einsum("hqk,khd->qhd", probs, v)


def packed_params(cu, cu_padded=None):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor(cu, dtype=torch.int32)
    cu_padded = cu if cu_padded is None else torch.tensor(cu_padded, dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
    )


def segment_index(cu, cu_padded, total):
    seg = torch.full((total,), -1)
    for i in range(len(cu) - 1):
        start = cu_padded[i]
        seg[start : start + cu[i + 1] - cu[i]] = i
    return seg


# lengths chosen to span several length buckets, with singletons and a long segment
LENGTHS = [1, 2, 3, 7, 8, 12, 5, 30, 1, 19]


@pytest.mark.parametrize("padded", [False, True])
def test_packed_attention_equals_dense_reference(padded):
    torch.manual_seed(0)
    cu = [0]
    for n in LENGTHS:
        cu.append(cu[-1] + n)
    # CP-style physical layout: every segment starts at a multiple of 4, with gaps
    cu_padded = [0]
    for n in LENGTHS:
        cu_padded.append(cu_padded[-1] + (-(-n // 4) * 4 if padded else n))
    total = cu_padded[-1]
    heads, dim = 3, 8
    q, k, v = (torch.randn(total, heads, dim, requires_grad=True) for _ in range(3))
    params = packed_params(cu, cu_padded)
    bounds = segment_bounds(params, total)
    assert len(_buckets(bounds)) < len(LENGTHS)  # grouping really batches segments
    scale = 0.3
    out = packed_causal_attention(q, k, v, bounds, scale)
    ref = dense_reference(q, k, v, segment_index(cu, cu_padded, total), scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    # gradients too: the training path is autograd through the gather/scatter
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-6, rtol=1e-5)


def test_sbhd_causal_equals_reference():
    torch.manual_seed(1)
    s, b, h, d = 9, 2, 2, 4
    q, k, v = (torch.randn(s, b, h, d) for _ in range(3))
    out = causal_attention_sbhd(q, k, v, None, 0.5)
    for i in range(b):
        ref = dense_reference(q[:, i], k[:, i], v[:, i], torch.zeros(s, dtype=torch.long), 0.5)
        torch.testing.assert_close(out[:, i].double(), ref, atol=1e-6, rtol=1e-5)
    # a padding mask (True = masked) on the last two keys of batch 1 changes only batch 1
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[1, :, :, -2:] = True
    masked = causal_attention_sbhd(q, k, v, mask, 0.5)
    torch.testing.assert_close(masked[:, 0], out[:, 0])
    seg = torch.zeros(s, dtype=torch.long)
    ref = dense_reference(q[:-2, 1], k[:-2, 1], v[:-2, 1], seg[:-2], 0.5)
    torch.testing.assert_close(masked[:-2, 1].double(), ref, atol=1e-6, rtol=1e-5)


def test_segment_bounds_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="end at the packed length"):
        segment_bounds(packed_params([0, 3, 5]), 6)
    with pytest.raises(ValueError, match="do not fit"):
        segment_bounds(packed_params([0, 5, 6], [0, 3, 6]), 6)
    # empty segments are skipped, not attended
    assert segment_bounds(packed_params([0, 2, 2, 6]), 6) == [(0, 2), (2, 4)]


def test_module_in_local_spec_and_thd_output_shape():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_tokweight.model.packed_attention import (
        PackedCoreAttention,
        gpt_layer_spec,
    )

    spec = gpt_layer_spec(use_te=False)
    assert spec.submodules.self_attention.submodules.core_attention is PackedCoreAttention
    if not HAVE_TE:
        with pytest.raises(ImportError, match="Transformer Engine"):
            gpt_layer_spec(use_te=True)

    class OneRank:
        def size(self):
            return 1

    class Groups:
        tp = OneRank()

    from megatron_tokweight.model.gpt import ModelConfig

    config = ModelConfig(vocab_size=10, seq_length=16, hidden_size=16, num_attention_heads=4,
                         num_query_groups=2).transformer_config()
    module = PackedCoreAttention(config, 1, AttnMaskType.causal, "self", pg_collection=Groups())
    torch.manual_seed(2)
    cu = [0, 5, 16]
    q = torch.randn(16, 4, 4)
    k, v = torch.randn(16, 2, 4), torch.randn(16, 2, 4)
    out = module(q, k, v, None, attn_mask_type=AttnMaskType.causal,
                 packed_seq_params=packed_params(cu))
    assert out.shape == (16, 1, 16)  # [t, 1, heads * d], not [t, heads * d]
    # GQA: each pair of query heads shares one key/value head
    ref = dense_reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                          segment_index(cu, cu, 16), 0.5)
    torch.testing.assert_close(out.reshape(16, 4, 4).double(), ref, atol=1e-6, rtol=1e-5)
