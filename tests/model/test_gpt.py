"""GPTModel on packed rows: no cross-sample leakage, TP=1 == TP=2, config validation."""
import pytest
import torch

from megatron_tokweight.errors import ConfigError
from megatron_tokweight.model.gpt import ModelConfig
from megatron_tokweight.trainer.spawn import spawn

L = 24
# row 0: samples of 5, 9 and 6 tokens, then 4 padding tokens (one tail segment); row 1: 11 + 13
ROW_SEGMENTS = [[5, 9, 6, 4], [11, 13]]
CHANGED = (0, slice(5, 14))  # the second sample of row 0


def make_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = len(ROW_SEGMENTS)
    tokens = torch.randint(0, 250, (rows, L), generator=gen)
    position_ids = torch.zeros(rows, L, dtype=torch.long)
    cu = torch.full((rows, L + 1), -1, dtype=torch.int32)
    for i, segs in enumerate(ROW_SEGMENTS):
        bounds = torch.tensor([0] + segs).cumsum(0)
        cu[i, : len(bounds)] = bounds.to(torch.int32)
        position_ids[i] = torch.cat([torch.arange(n) for n in segs])
    return {
        "tokens": tokens,
        "position_ids": position_ids,
        "cu_seqlens": cu,
        "cu_seqlens_padded": cu.clone(),
        "num_segments": torch.tensor([len(s) for s in ROW_SEGMENTS]),
        "max_seqlen": torch.tensor([max(s) for s in ROW_SEGMENTS]),
    }


def single_row_batch(tokens):
    n = tokens.numel()
    cu = torch.full((1, n + 1), -1, dtype=torch.int32)
    cu[0, :2] = torch.tensor([0, n])
    return {
        "tokens": tokens.reshape(1, n), "position_ids": torch.arange(n).reshape(1, n),
        "cu_seqlens": cu, "cu_seqlens_padded": cu.clone(), "num_segments": torch.tensor([1]),
        "max_seqlen": torch.tensor([n]),
    }


def _models(rank, world_size, **extra):
    """The same seed's model at TP = 1 (this rank alone) and TP = 2 (both ranks)."""
    import torch.distributed as dist

    from megatron_tokweight.model.gpt import build_gpt_model

    tp2_group = dist.new_group(list(range(world_size)))
    tp1_group = dist.new_group([rank], use_local_synchronization=True)
    config = dict(vocab_size=250, seq_length=L, num_layers=2, hidden_size=32, num_attention_heads=4, **extra)
    torch.manual_seed(1234)
    model1 = build_gpt_model(ModelConfig(**config), tp_group=tp1_group).eval()
    torch.manual_seed(1234)
    model2 = build_gpt_model(ModelConfig(**config, tensor_model_parallel_size=2), tp_group=tp2_group).eval()
    return model1, model2


def _model_case(rank, world_size):
    model1, model2 = _models(rank, world_size)
    result = _isolation_case(model1, model2, world_size)
    # the model's loss (labels given) = plain torch cross-entropy on the full logits, at both TP sizes
    from megatron_tokweight.data.thd_batch import flatten_rows
    from megatron_tokweight.model.gpt import packed_token_loss

    batch = make_batch()
    labels = torch.randint(0, 250, batch["tokens"].shape, generator=torch.Generator().manual_seed(9))
    flat = flatten_rows({**batch, "labels": labels})
    reference = torch.nn.functional.cross_entropy(
        result["tp1"]["logits"].transpose(0, 1).reshape(-1, result["tp1"]["logits"].shape[-1]), labels.reshape(-1),
        reduction="none",
    ).reshape(1, -1)
    with torch.no_grad():
        for name, model in (("tp1", model1), ("tp2", model2)):
            loss = packed_token_loss(model, flat)
            result[name]["loss_shape"] = tuple(loss.shape)
            result[name]["loss_vs_reference"] = float((loss - reference).abs().max())
    del result["tp1"]["logits"], result["tp2"]["logits"]
    result["fused"] = _fused_case(model1, model2, flat)
    # rotary positions: the same isolation and TP checks (RoPE restarts per sample through cu_seqlens)
    rope1, rope2 = _models(rank, world_size, position_embedding_type="rope")
    result["rope"] = _isolation_case(rope1, rope2, world_size)
    result["rope"]["has_rotary"] = rope1.rotary_pos_emb is not None
    result["rope"]["has_learned_positions"] = hasattr(rope1.embedding, "position_embeddings")
    del result["rope"]["tp1"]["logits"], result["rope"]["tp2"]["logits"]
    return result


def _isolation_case(model1, model2, world_size):
    """Leakage, one sample alone, TP 2 against TP 1 and THD against SBHD for one pair of models
    (each "logits" entry is left for the caller's loss checks)."""
    import torch.distributed as dist

    from megatron_tokweight.model.gpt import row_logits as packed_logits

    batch = make_batch()
    changed = {k: v.clone() for k, v in batch.items()}
    changed["tokens"][CHANGED] = (changed["tokens"][CHANGED] + 17) % 250
    outside = torch.ones(L, len(ROW_SEGMENTS), dtype=torch.bool)
    outside[CHANGED[1], CHANGED[0]] = False
    result = {}
    with torch.no_grad():
        for name, model in (("tp1", model1), ("tp2", model2)):
            before, after = packed_logits(model, batch), packed_logits(model, changed)
            diff = (before - after).abs().amax(-1)  # [L, b]
            result[name] = {
                "shape": tuple(before.shape),
                "outside": float(diff[outside].max()),
                "inside": float(diff[~outside].min()),
            }
            # the sample run alone as its own row gives the same logits as inside the packed row
            alone = packed_logits(model, single_row_batch(batch["tokens"][CHANGED]))[:, 0]
            result[name]["alone"] = float((alone - before[CHANGED[1], CHANGED[0]]).abs().max())
            result[name]["logits"] = before
        # the sbhd path (no packed params) on one full-length sample per row = THD
        one_each = make_batch(seed=5)
        one_each["position_ids"] = torch.arange(L).repeat(2, 1)
        one_each["cu_seqlens"][:, :2] = torch.tensor([0, L], dtype=torch.int32)
        one_each["cu_seqlens"][:, 2:] = -1
        one_each["cu_seqlens_padded"] = one_each["cu_seqlens"].clone()
        one_each["num_segments"] = torch.tensor([1, 1])
        sbhd = model1(one_each["tokens"], one_each["position_ids"], None).transpose(0, 1)
        result["sbhd_vs_thd"] = float((sbhd - packed_logits(model1, one_each)).abs().max())
    # gather the TP=2 vocab shards to compare with TP=1
    shards = [torch.empty_like(result["tp2"]["logits"]) for _ in range(world_size)]
    dist.all_gather(shards, result["tp2"]["logits"].contiguous())
    full = torch.cat(shards, dim=-1)
    result["tp2_vs_tp1"] = float((full - result["tp1"]["logits"]).abs().max())
    return result


def _fused_case(model1, model2, flat):
    """The fused output layer against the model's own loss: w * l and every parameter gradient
    (tied embeddings), and the scorer's log-probs, at TP = 1 and 2."""
    from megatron_tokweight.longcontext.forward import stream_logprobs
    from megatron_tokweight.model.fused_output import (
        enable_fused_output,
        fused_enabled,
        packed_fused_loss,
    )
    from megatron_tokweight.loss.fused_linear_cross_entropy import STATS
    from megatron_tokweight.model.gpt import packed_token_loss
    from megatron_tokweight.model.gpt import row_logits as packed_logits

    weights = torch.rand(flat["labels"].shape, generator=torch.Generator().manual_seed(3))
    flat = {**flat, "loss_weights": weights}
    out = {}
    for name, model, group in (("tp1", model1, model1.pg_collection.tp), ("tp2", model2, model2.pg_collection.tp)):
        model.zero_grad(set_to_none=True)
        reference = packed_token_loss(model, flat) * weights
        (reference.sum() * 0.5).backward()
        ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        ref_logprobs = stream_logprobs(model, flat, group)
        model.zero_grad(set_to_none=True)
        assert not fused_enabled(model)
        enable_fused_output(model, chunk_size=7)
        enable_fused_output(model, chunk_size=7)  # idempotent
        forwards = STATS.forwards
        weighted, per_token = packed_fused_loss(model, flat)
        (weighted.sum() * 0.5).backward()
        weighted, reference = weighted.detach(), reference.detach()
        out[name] = {
            "loss": float((weighted - reference).abs().max() / reference.abs().max()),
            "per_token": float((per_token * weights - reference).abs().max() / reference.abs().max()),
            "grads": max(float((p.grad - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp(min=1e-12))
                         for k, p in model.named_parameters()),
            "logprobs": float((stream_logprobs(model, flat, group) - ref_logprobs).abs().max()),
            "scored_fused": STATS.forwards - forwards - 1,  # the scoring forward went through the fused loss
            # outside fused_targets the output layer is Megatron's own: logits as before
            "logits_shape": tuple(packed_logits(model, make_batch()).shape),
        }
    return out


@pytest.fixture(scope="module")
def two_ranks():
    """`_model_case` on two gloo ranks (TP = 1 on each rank and TP = 2 across both), one spawn."""
    return spawn(_model_case, 2)


@pytest.mark.distributed
def test_logits_shapes(two_ranks):
    padded_vocab = 256
    for res in two_ranks:
        assert res["tp1"]["shape"] == (L, 2, padded_vocab)
        assert res["tp2"]["shape"] == (L, 2, padded_vocab // 2)


def _positions(res, kind):
    return res["rope"] if kind == "rope" else res


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["learned_absolute", "rope"])
def test_no_cross_sample_leakage_tp1_and_tp2(two_ranks, kind):
    for rank, res in enumerate(two_ranks):
        res = _positions(res, kind)
        for name in ("tp1", "tp2"):
            # every other sample (and the padding) is untouched by the change ...
            assert res[name]["outside"] <= 1e-6, (rank, name, res[name])
            # ... while every position of the changed sample does change
            assert res[name]["inside"] > 1e-4, (rank, name, res[name])
            assert res[name]["alone"] <= 1e-5, (rank, name, res[name])


@pytest.mark.distributed
def test_packed_token_loss_equals_plain_cross_entropy(two_ranks):
    for rank, res in enumerate(two_ranks):
        for name in ("tp1", "tp2"):
            assert res[name]["loss_shape"] == (1, 2 * L)
            assert res[name]["loss_vs_reference"] <= 1e-5, (rank, name, res[name])


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["learned_absolute", "rope"])
def test_tp2_equals_tp1_and_thd_equals_sbhd(two_ranks, kind):
    for res in two_ranks:
        res = _positions(res, kind)
        assert res["tp2_vs_tp1"] <= 1e-5, res
        assert res["sbhd_vs_thd"] <= 1e-5, res


@pytest.mark.distributed
def test_rope_model_has_rotary_and_no_learned_positions(two_ranks):
    for res in two_ranks:
        assert res["rope"]["has_rotary"] and not res["rope"]["has_learned_positions"], res["rope"]


@pytest.mark.distributed
def test_fused_output_layer_equals_the_models_loss(two_ranks):
    for rank, res in enumerate(two_ranks):
        for name, padded in (("tp1", 256), ("tp2", 128)):
            fused = res["fused"][name]
            assert fused["loss"] <= 1e-5 and fused["per_token"] <= 1e-5 and fused["grads"] <= 1e-5, (rank, name, fused)
            assert fused["logprobs"] <= 1e-5 and fused["scored_fused"] == 1, (rank, name, fused)
            assert fused["logits_shape"] == (L, 2, padded)


def test_model_config_validation():
    ModelConfig(vocab_size=300, seq_length=8, tensor_model_parallel_size=2)
    with pytest.raises(ConfigError, match="must divide model.num_attention_heads=4"):
        ModelConfig(vocab_size=300, seq_length=8, tensor_model_parallel_size=3)
    with pytest.raises(ConfigError, match="padded vocabulary"):
        ModelConfig(vocab_size=301, seq_length=8, num_attention_heads=3, hidden_size=48,
                     tensor_model_parallel_size=3, pad_vocab_to_multiple_of=2)
    with pytest.raises(ConfigError, match="hidden_size=50 must be divisible"):
        ModelConfig(vocab_size=300, seq_length=8, hidden_size=50)
    with pytest.raises(ConfigError, match="normalization"):
        ModelConfig(vocab_size=300, seq_length=8, normalization="BatchNorm")
    with pytest.raises(ConfigError, match="position_embedding_type must be one of"):
        ModelConfig(vocab_size=300, seq_length=8, position_embedding_type="alibi")
    assert ModelConfig(vocab_size=300, seq_length=8).padded_vocab_size == 384
