"""Long-context weighting: formulas vs plain Python references, windows, scorers, TP reduction."""
import math

import numpy as np
import pytest
import torch

from megatron_tokweight.errors import ConfigError, TokweightError
from megatron_tokweight.longcontext import (
    LongContextConfig,
    apply_weights,
    dense_weights,
    helm_scores,
    long_context_weights,
    longce_weights,
    rho1_weights,
    segment_ids_from_cu_seqlens,
    segment_ids_from_sample_ids,
    sparse_weights,
)
from megatron_tokweight.longcontext.windows import plan_windows, split_plan

# two packed rows of 20 positions: pieces of 7, 9, 4 (tail padding) and 12, 8
ROW_PIECES = [[7, 9, 4], [12, 8]]
L = 20


def packed_layout():
    rows = len(ROW_PIECES)
    cu = torch.full((rows, L + 1), -1, dtype=torch.int32)
    sample_ids = torch.full((rows, L), -1, dtype=torch.long)
    next_id = 0
    for i, pieces in enumerate(ROW_PIECES):
        bounds = np.concatenate([[0], np.cumsum(pieces)])
        cu[i, : len(bounds)] = torch.from_numpy(bounds.astype(np.int32))
        for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if not (i == 0 and j == 2):  # row 0's third piece is tail padding
                sample_ids[i, a:b] = next_id
                next_id += 1
    return cu, torch.tensor([len(p) for p in ROW_PIECES]), sample_ids


def random_inputs(seed, zero_piece=False):
    gen = torch.Generator().manual_seed(seed)
    cu, counts, sample_ids = packed_layout()
    short = -torch.rand(2, L, generator=gen, dtype=torch.float64).float() * 6
    long = -torch.rand(2, L, generator=gen, dtype=torch.float64).float() * 6
    mask = (torch.rand(2, L, generator=gen) < 0.7).float()
    mask[sample_ids < 0] = 0
    mask[0, 0] = 1  # every piece keeps a loss token
    mask[1, 12] = 1
    # padding holds garbage that must be ignored
    short[sample_ids < 0] = float("nan")
    if zero_piece:  # the second piece of row 0: short == long, all scores 0
        long[0, 7:16] = short[0, 7:16]
    return short, long, mask, cu, counts, sample_ids


def pieces_of(mask, sample_ids):
    """{(row, sample): [flat positions of its loss tokens]} in position order (the reference)."""
    out = {}
    for i in range(mask.shape[0]):
        for p in range(mask.shape[1]):
            if mask[i, p] > 0:
                out.setdefault((i, int(sample_ids[i, p])), []).append(i * mask.shape[1] + p)
    return out


def ref_dense(scores, mask, sample_ids, lam):
    s = scores.reshape(-1).tolist()
    w = [0.0] * len(s)
    for positions in pieces_of(mask, sample_ids).values():
        total = sum(s[p] for p in positions)
        for p in positions:
            w[p] = 1.0 if total <= len(positions) * 1e-6 else lam + (1 - lam) * len(positions) * s[p] / total
    return np.array(w).reshape(scores.shape)


def ref_top(values, mask, sample_ids, fraction, chosen, other, flat_is_uniform):
    v = values.reshape(-1).tolist()
    w = [0.0] * len(v)
    for positions in pieces_of(mask, sample_ids).values():
        if flat_is_uniform and sum(v[p] for p in positions) <= len(positions) * 1e-6:
            for p in positions:
                w[p] = 1.0
            continue
        keep = max(1, math.ceil(round(fraction * len(positions), 9)))
        ranked = sorted(positions, key=lambda p: (-v[p], p))
        for rank, p in enumerate(ranked):
            w[p] = chosen if rank < keep else other
    return np.array(w).reshape(values.shape)


def test_roundoff_scores_give_uniform_weights():
    """The documented guard: a piece whose short and long log-probs differ only by round-off
    (mean s <= 1e-6 nats) is uniform under dense and sparse; a real signal of 1e-4 is not."""
    mask = torch.ones(2, 8)
    segment_ids = torch.tensor([[0] * 8, [1] * 8])
    noise = torch.zeros(2, 8)
    noise[0, 3], noise[1, 3] = 4e-7, 1e-4  # one token of each piece differs
    dense = dense_weights(noise, mask, segment_ids, 0.5)
    sparse = sparse_weights(noise, mask, segment_ids, 0.25)
    assert torch.equal(dense[0], torch.ones(8)) and torch.equal(sparse[0], torch.ones(8))
    assert dense[1, 3] == pytest.approx(0.5 + 0.5 * 8) and dense[1, 0] == pytest.approx(0.5)
    assert sparse[1].tolist() == [4.0, 0, 0, 4.0, 0, 0, 0, 0]


def segments(cu, counts):
    return segment_ids_from_cu_seqlens(cu, counts, L)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.75, 1.0])
def test_dense_matches_reference(seed, lam):
    short, long, mask, cu, counts, sample_ids = random_inputs(seed, zero_piece=seed == 2)
    s = helm_scores(short, long)
    got = dense_weights(s, mask, segments(cu, counts), lam)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), ref_dense(s.nan_to_num(0), mask, sample_ids, lam), rtol=1e-6, atol=1e-6)
    # per piece: mean weight 1 over its loss tokens (N * s / sum s averages to 1)
    for positions in pieces_of(mask, sample_ids).values():
        assert got.reshape(-1)[positions].double().mean().item() == pytest.approx(1.0, abs=1e-5)


def test_dense_all_zero_scores_are_uniform():
    mask = torch.tensor([[1.0, 1, 0, 1]])
    seg = torch.zeros(1, 4, dtype=torch.long)
    got = dense_weights(torch.zeros(1, 4), mask, seg, 0.3)
    assert got.tolist() == [[1.0, 1.0, 0.0, 1.0]]
    got = sparse_weights(torch.zeros(1, 4), mask, seg, 0.5)
    assert got.tolist() == [[1.0, 1.0, 0.0, 1.0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kappa", [0.1, 0.3, 0.5, 1.0])
def test_sparse_matches_reference(seed, kappa):
    short, long, mask, cu, counts, sample_ids = random_inputs(seed, zero_piece=seed == 2)
    # quantised scores: many ties, some at the cut
    short = (short * 2).round() / 2
    long = (long * 2).round() / 2
    s = helm_scores(short, long)
    got = sparse_weights(s, mask, segments(cu, counts), kappa)
    ref = ref_top(s.nan_to_num(0), mask, sample_ids, kappa, 1 / kappa, 0.0, flat_is_uniform=True)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)


def test_sparse_ties_at_the_cut_keep_earlier_positions():
    # one sequence of 5 loss tokens, kappa 0.4 keeps 2; three tie at the cut: positions 1, 2 win
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    seg = torch.zeros(5, dtype=torch.long)
    got = sparse_weights(scores, torch.ones(5), seg, 0.4)
    assert got.tolist() == [0.0, 2.5, 2.5, 0.0, 0.0]
    # ceil(0.3 * 10) keeps 3 (not 4 from 3.0000000000000004)
    got = sparse_weights(torch.arange(10.0), torch.ones(10), torch.zeros(10, dtype=torch.long), 0.3)
    assert (got > 0).sum() == 3 and torch.equal(got[7:], torch.full((3,), 1 / 0.3))
    # a tiny fraction still keeps one token
    got = sparse_weights(torch.tensor([0.0, 3.0, 1.0]), torch.ones(3), torch.zeros(3, dtype=torch.long), 0.01)
    assert got.tolist() == [0.0, 100.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_longce_matches_reference(seed, gamma):
    short, long, mask, *_ = random_inputs(seed)
    long[1, 3] = 50.0  # huge gain: capped without overflow
    got = longce_weights(short, long, mask, gamma)
    ref = np.zeros((2, L))
    for i in range(2):
        for p in range(L):
            if mask[i, p] > 0:
                l_short, l_long = -float(short[i, p]), -float(long[i, p])
                ref[i, p] = min(math.exp(min(l_short - l_long, 700)), gamma)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)
    if mask[1, 3] > 0:
        assert got[1, 3] == gamma


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [0.2, 0.6, 1.0])
def test_rho1_matches_reference(seed, k):
    model, reference, mask, cu, counts, sample_ids = random_inputs(seed)
    model = (model * 2).round() / 2  # ties
    reference = (reference * 2).round() / 2
    reference[sample_ids < 0] = 0.0
    got = rho1_weights(model, reference, mask, segments(cu, counts), k)
    excess = (-model) - (-reference)  # l_model - l_reference
    ref = ref_top(excess.nan_to_num(0), mask, sample_ids, k, 1.0, 0.0, flat_is_uniform=False)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_segment_ids_from_cu_seqlens_and_sample_ids_agree():
    _, _, mask, cu, counts, sample_ids = random_inputs(0)
    by_cu = segments(cu, counts)
    by_sample = segment_ids_from_sample_ids(sample_ids)
    real = sample_ids >= 0
    # same partition of the real positions
    pairs = set(zip(by_cu[real].tolist(), by_sample[real].tolist()))
    assert len(pairs) == len(set(by_cu[real].tolist())) == len(set(by_sample[real].tolist())) == 4
    assert (by_sample[~real] == -1).all()
    # -1 entries past num_segments are ignored even without num_segments
    assert torch.equal(segment_ids_from_cu_seqlens(cu, None, L), by_cu)
    # normalisation is per piece: the same piece weighs the same whatever it is packed with
    s = helm_scores(*random_inputs(1)[:2])
    row0 = dense_weights(s, mask, by_cu, 0.5)[0, :7]
    alone = dense_weights(s[0, :7], mask[0, :7], torch.zeros(7, dtype=torch.long), 0.5)
    torch.testing.assert_close(row0, alone)
    with pytest.raises(TokweightError, match="not decrease"):
        segment_ids_from_cu_seqlens(torch.tensor([0, 5, 3, 8]))


def test_bad_inputs_raise():
    seg = torch.zeros(3, dtype=torch.long)
    with pytest.raises(TokweightError, match="non-finite"):
        dense_weights(torch.tensor([1.0, float("nan"), 2.0]), torch.ones(3), seg, 0.5)
    with pytest.raises(TokweightError, match=">= 0"):
        sparse_weights(torch.tensor([1.0, -1.0, 2.0]), torch.ones(3), seg, 0.5)
    with pytest.raises(TokweightError, match="segment id -1"):
        dense_weights(torch.ones(3), torch.ones(3), torch.tensor([0, -1, 0]), 0.5)
    with pytest.raises(TokweightError, match="share one shape"):
        dense_weights(torch.ones(3), torch.ones(4), seg, 0.5)
    with pytest.raises(TokweightError, match=r"kappa must lie in \(0, 1\]"):
        sparse_weights(torch.ones(3), torch.ones(3), seg, 0.0)
    with pytest.raises(TokweightError, match="needs reference_logprobs"):
        long_context_weights(LongContextConfig(method="rho1"), torch.ones(3), seg,
                             long_logprobs=torch.zeros(3))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(method="topk"), "method 'topk' is unknown"),
        (dict(scorer="live"), "scorer 'live' is unknown"),
        (dict(lam=1.5), r"lambda must lie in \[0, 1\]"),
        (dict(lam=float("nan")), "must be finite"),
        (dict(kappa=0.0), r"kappa .* must lie in \(0, 1\]"),
        (dict(gamma=0), "gamma .* must be > 0"),
        (dict(k=60), "write 0.6 for 60%"),
        (dict(short_context=0), "short_context must be >= 1"),
        (dict(short_context=8, stride=9), r"stride must lie in \[1, short_context=8\]"),
        (dict(short_context=8.5), "whole number"),
        (dict(lam="0.5"), "expected a number"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        LongContextConfig(**fields)


def test_config_from_dict_and_sequence_length():
    config = LongContextConfig.from_dict({"method": "sparse", "lambda": 0.5, "n": 16, "stride": 8.0})
    assert (config.lam, config.short_context, config.stride) == (0.5, 16, 8)
    with pytest.raises(ConfigError, match="unknown key 'kapa'"):
        LongContextConfig.from_dict({"kapa": 0.2})
    with pytest.raises(ConfigError, match="given twice"):
        LongContextConfig.from_dict({"lambda": 0.2, "lam": 0.3})
    config.check_sequence_length(17)
    with pytest.raises(ConfigError, match="must be smaller than the training sequence length 16"):
        config.check_sequence_length(16)


def test_dispatch_and_composition_with_sample_weights():
    short, long, mask, cu, counts, sample_ids = random_inputs(3)
    seg = segments(cu, counts)
    sample_w = mask * torch.tensor([[0.4] * 7 + [2.0] * 13, [1.0] * 12 + [0.1] * 8])
    for method, expect in (
        ("dense", dense_weights(helm_scores(short, long), mask, seg, 0.6)),
        ("sparse", sparse_weights(helm_scores(short, long), mask, seg, 0.3)),
        ("longce", longce_weights(short, long, mask, 2.0)),
        ("rho1", rho1_weights(long, short, mask, seg, 0.3)),
    ):
        config = LongContextConfig(method=method, lam=0.6, kappa=0.3, gamma=2.0, k=0.3)
        got = long_context_weights(config, mask, seg, short_logprobs=short, long_logprobs=long,
                                   reference_logprobs=short)
        torch.testing.assert_close(got, expect)
        final = apply_weights(sample_w, got)
        torch.testing.assert_close(final, sample_w * expect)
        assert (final[mask == 0] == 0).all()


def test_windows_cover_every_position_once_with_bounded_context():
    begins, ends = [0, 30, 31], [30, 31, 70]
    for n, stride in ((8, 8), (8, 3), (5, 1), (64, 16)):
        for include_first in (True, False):
            plan = plan_windows(begins, ends, n, stride, include_first)
            cu = plan.cu_seqlens.long()
            lengths = cu.diff()
            assert (lengths <= n).all() and (lengths > 0).all()
            # windows are contiguous runs of one sequence; positions are those in the sequence
            window_start = torch.empty(plan.num_tokens, dtype=torch.long)
            for w in range(plan.num_windows):
                idx = plan.token_index[cu[w]:cu[w + 1]]
                assert torch.equal(idx.diff(), torch.ones(len(idx) - 1, dtype=torch.long))
                begin = max(b for b in begins if b <= idx[0])
                assert torch.equal(plan.position_ids[cu[w]:cu[w + 1]], idx - begin)
                window_start[cu[w]:cu[w + 1]] = idx[0]
            # context of a kept position = the window's tokens up to it
            context = plan.score_to - window_start[plan.score_from] + 1
            expect = {}
            for b, e in zip(begins, ends):
                for p in range(b, e):
                    if p - b + 1 <= n:
                        if include_first:
                            expect[p] = p - b + 1
                    else:
                        expect[p] = None
            got = dict(zip(plan.score_to.tolist(), context.tolist()))
            assert sorted(got) == sorted(expect) and len(got) == len(plan.score_to)
            for p, c in got.items():
                if expect[p] is None:
                    assert n - stride + 1 <= c <= n
                else:
                    assert c == expect[p]
            # splitting into bounded forwards keeps every window and kept position
            parts = list(split_plan(plan, 2 * n))
            assert sum(part.num_windows for part in parts) == plan.num_windows
            kept = [part.score_to for part in parts] or [torch.zeros(0, dtype=torch.long)]
            assert torch.equal(torch.cat(kept), plan.score_to)
            for part in parts:
                assert part.num_tokens <= 2 * n
                assert torch.equal(part.token_index[part.score_from], part.score_to)


# ---------------------------------------------------------------------------------------------
# scorers on a GPT model (one in-process gloo rank; TP = 2 in one spawn)

VOCAB = 100
SEQ = 32


def tiny_model(group, seed=0, vocab=VOCAB, tp=1):
    from megatron_tokweight.model.gpt import ModelConfig, build_gpt_model

    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, seq_length=SEQ, num_layers=2, hidden_size=32,
                         num_attention_heads=4, tensor_model_parallel_size=tp, init_method_std=0.1)
    return build_gpt_model(config, tp_group=group)


def row_batch(pieces_per_row, seed=0, length=SEQ, vocab=VOCAB):
    """Collated packed rows with PackedDataset's keys; the last piece of a row may be padding
    (marked by a negative length)."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(pieces_per_row)
    batch = {
        "tokens": torch.randint(0, vocab, (rows, length), generator=gen),
        "labels": torch.zeros(rows, length, dtype=torch.long),
        "loss_mask": torch.zeros(rows, length),
        "position_ids": torch.zeros(rows, length, dtype=torch.long),
        "cu_seqlens": torch.full((rows, length + 1), -1, dtype=torch.int32),
        "num_segments": torch.tensor([len(p) for p in pieces_per_row]),
        "max_seqlen": torch.tensor([max(abs(n) for n in p) for p in pieces_per_row]),
        "num_samples": torch.tensor([sum(n > 0 for n in p) for p in pieces_per_row]),
    }
    for i, pieces in enumerate(pieces_per_row):
        begin = 0
        batch["cu_seqlens"][i, 0] = 0
        for j, signed in enumerate(pieces):
            n = abs(signed)
            batch["cu_seqlens"][i, j + 1] = begin + n
            batch["position_ids"][i, begin:begin + n] = torch.arange(n)
            if signed > 0:
                batch["labels"][i, begin:begin + n - 1] = batch["tokens"][i, begin + 1:begin + n]
                batch["loss_mask"][i, begin:begin + n - 1] = 1
            begin += n
        assert begin == length
    batch["cu_seqlens_padded"] = batch["cu_seqlens"].clone()
    batch["loss_weights"] = batch["loss_mask"] * (1 + torch.rand(rows, length, generator=gen))
    return batch


def alone_logprob(model, tokens, positions, label):
    """log p(label | tokens) with the tokens run as their own sequence (the reference)."""
    from megatron_tokweight.model.gpt import packed_logits

    n = len(tokens)
    cu = torch.tensor([0, n], dtype=torch.int32)
    batch = {"tokens": tokens.reshape(1, n), "position_ids": positions.reshape(1, n), "cu_seqlens": cu,
             "cu_seqlens_padded": cu, "num_segments": torch.tensor(1), "max_seqlen": torch.tensor(n)}
    with torch.no_grad():
        logits = packed_logits(model, batch)[-1, 0].double()
    return float(torch.log_softmax(logits, -1)[label])


PIECES = [[20, 9, -3], [32]]  # row 0: samples of 20 and 9 tokens, 3 padding; row 1: one sample


def test_online_scorer_equals_each_window_run_alone(rank_group):
    from megatron_tokweight.longcontext.scorer_online import OnlineScorer, as_stream

    model = tiny_model(rank_group).eval()
    batch = row_batch(PIECES)
    n, stride = 6, 4
    scorer = OnlineScorer(LongContextConfig(short_context=n, stride=stride), seq_length=SEQ)
    scores = scorer.score(model, batch)
    checked = 0
    for i, pieces in enumerate(PIECES):
        begin = 0
        for signed in pieces:
            for p in range(begin, begin + abs(signed) - 1):
                if batch["loss_mask"][i, p] == 0:
                    continue
                label = int(batch["labels"][i, p])
                tokens, positions = batch["tokens"][i], batch["position_ids"][i]
                # the short window: the full prefix within the first n tokens, else the window
                # k = ceil((p - begin + 1 - n) / stride) starting at begin + k * stride
                k = max(0, -(-(p - begin + 1 - n) // stride))
                a = begin + k * stride
                assert p - a + 1 <= n and (k == 0 or p - a + 1 >= n - stride + 1)
                short = alone_logprob(model, tokens[a:p + 1], positions[a:p + 1], label)
                long = alone_logprob(model, tokens[begin:p + 1], positions[begin:p + 1], label)
                assert scores.short_logprobs[i, p].item() == pytest.approx(short, abs=2e-5)
                assert scores.long_logprobs[i, p].item() == pytest.approx(long, abs=2e-5)
                if k == 0:  # identical context: exactly the same value
                    assert scores.short_logprobs[i, p] == scores.long_logprobs[i, p]
                checked += 1
            begin += abs(signed)
    assert checked == 19 + 8 + 31
    # windows of the pieces beyond their first n tokens only; padding is never scored
    windows = {20: [6, 6, 6, 4], 9: [5], 32: [6, 6, 6, 6, 6, 6, 4]}  # windows k >= 1 start at k * 4
    assert scores.short_tokens == sum(sum(w) for w in windows.values())
    # a flattened (get_batch) micro-batch scores the same
    flat = scorer.score(model, as_stream(batch))
    torch.testing.assert_close(flat.short_logprobs.reshape(2, SEQ), scores.short_logprobs)
    # weights: the formula on these log-probabilities, times the sample weights, per piece
    weights = scorer.weights(model, batch)
    segments = segment_ids_from_cu_seqlens(batch["cu_seqlens"], batch["num_segments"], SEQ)
    expect = batch["loss_weights"] * dense_weights(
        helm_scores(scores.short_logprobs, scores.long_logprobs), batch["loss_mask"], segments, 0.75)
    torch.testing.assert_close(weights, expect)
    reweighted = scorer.reweight(model, [batch])[0]
    torch.testing.assert_close(reweighted["loss_weights"], expect)
    assert reweighted["tokens"] is batch["tokens"]
    with pytest.raises(ConfigError, match="smaller than the training sequence length"):
        OnlineScorer(LongContextConfig(short_context=SEQ, stride=4), seq_length=SEQ)
    with pytest.raises(TokweightError, match="reference_logprobs"):
        OnlineScorer(LongContextConfig(method="rho1")).weights(model, batch)
    # a context-parallel slice lacks half of every piece: refused
    sliced = dict(as_stream(batch))
    sliced.update({key: sliced[key][:, :SEQ] for key in ("tokens", "labels", "loss_mask", "position_ids")})
    with pytest.raises(TokweightError, match="context parallel size 1"):
        scorer.score(model, sliced)


def test_long_context_weights_compose_with_every_normalization():
    """Z of each mode over two micro-batches whose weights include long-context factors."""
    from megatron_tokweight.loss import LossSettings, weighted_loss_func

    batches = [row_batch(PIECES, seed=s) for s in (1, 2)]
    config = LongContextConfig(method="dense", lam=0.5)
    gen = torch.Generator().manual_seed(5)
    per_token = [torch.rand(2, SEQ, generator=gen) * 3 for _ in batches]
    finals = []
    for batch in batches:
        short, long = (-torch.rand(2, SEQ, generator=gen) * 4 for _ in range(2))
        segments = segment_ids_from_cu_seqlens(batch["cu_seqlens"], batch["num_segments"], SEQ)
        lc = long_context_weights(config, batch["loss_mask"], segments, short_logprobs=short,
                                  long_logprobs=long)
        finals.append(apply_weights(batch["loss_weights"], lc))
        batch["loss_weights"] = finals[-1]
    for mode in ("weight_sum", "sample_count", "token_count"):
        settings = LossSettings(mode, num_microbatches=2, dp_cp_size=1, calculate_per_token_loss=True)
        stats = settings.global_batch_stats(batches)
        total = sum(weighted_loss_func(b, stats, settings, l)[0] for b, l in zip(batches, per_token))
        # plain reference: sum w l / Z, Z from the final weights / the samples / the loss tokens
        weighted = sum(float((w * l).sum()) for w, l in zip(finals, per_token))
        z = {"weight_sum": sum(float(w.sum()) for w in finals),
             "sample_count": sum(int(b["num_samples"].sum()) for b in batches),
             "token_count": sum(int(b["loss_mask"].sum()) for b in batches)}[mode]
        # per-token-loss protocol: the schedule divides by the loss-token count
        assert float(total) / z_tokens(batches) == pytest.approx(weighted / z, rel=1e-6), mode


def z_tokens(batches):
    return sum(int(b["loss_mask"].sum()) for b in batches)


# ---------------------------------------------------------------------------------------------
# offline scorer: `tokweight score` on a checkpoint as `tokweight train` saves it

BYTE_VOCAB = 262  # the built-in byte tokenizer
# <bos> text <eot>: lengths 7, 22, 51 (two training sequences of SEQ = 32), 2 (no target), 34 (two)
TEXTS = ["hello", "a" * 10 + "bcdefghijk", "the quick brown fox jumps over the lazy dog twice", "", "z" * 32]


def save_checkpoint(save_dir, prefix, model, group, vocab=BYTE_VOCAB):
    """Save `model` exactly as `tokweight train` does (its identity and file layout)."""
    from megatron_tokweight.model import checkpoint
    from megatron_tokweight.trainer.config import TrainConfig

    config = TrainConfig.from_dict({
        "data": {"prefixes": [str(prefix)], "seq_length": SEQ},
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "init_method_std": 0.1},
        "steps": 1, "save_dir": str(save_dir),
    })
    optimizer = torch.optim.AdamW(model.parameters())
    return checkpoint.save(str(save_dir), 1, 1, config.identity(), model, optimizer, rank=0, world_size=1,
                           group=group)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, rank_group, prepared_prefix):
    """A prepared dataset, a random-init scorer checkpoint, and `tokweight score` run on them."""
    from megatron_tokweight import cli

    root = tmp_path_factory.mktemp("score")
    prefix = prepared_prefix(root, "data", [{"text": t} for t in TEXTS])
    model = tiny_model(rank_group, seed=4, vocab=BYTE_VOCAB).eval()
    save_checkpoint(root / "ckpt", prefix, model, rank_group)
    rc = cli.main(["score", prefix, "--scorer", str(root / "ckpt"), "--short-context", "8",
                   "--stride", "4", "--no-progress"])
    assert rc == 0
    return root, prefix, model


def test_offline_scores_equal_each_window_run_alone(scored):
    from megatron_tokweight.longcontext.score_sidecar import TokenScores

    root, prefix, model = scored
    scores = TokenScores.open(prefix)
    assert scores.meta["short_context"] == 8 and scores.meta["stride"] == 4 and scores.meta["seq_length"] == SEQ
    assert scores.meta["checkpoint"].endswith("step_0000001") and scores.meta["counts"]["clamped_to_float16"] == 0
    tokens = np.fromfile(prefix + ".bin", dtype=np.uint16).astype(np.int64)
    assert len(scores.short_logprobs) == len(tokens) == sum(len(t) + 2 for t in TEXTS)
    n, stride, start = 8, 4, 0
    for text in TEXTS:
        length = len(text) + 2
        for chunk in range(start, start + length, SEQ):  # training sequences of SEQ tokens
            end = min(chunk + SEQ, start + length)
            # the first token of a training sequence is predicted by nothing there: 0.0
            assert scores.short_logprobs[chunk] == 0 and scores.long_logprobs[chunk] == 0
            for j in range(chunk + 1, end):
                p = j - 1  # the position predicting token j
                t = torch.from_numpy(tokens)
                positions = torch.arange(SEQ)
                k = max(0, -(-(p - chunk + 1 - n) // stride))
                a = chunk + k * stride
                long = alone_logprob(model, t[chunk:p + 1], positions[:p + 1 - chunk], int(tokens[j]))
                short = alone_logprob(model, t[a:p + 1], positions[a - chunk:p + 1 - chunk], int(tokens[j]))
                # stored as float16
                assert float(scores.long_logprobs[j]) == pytest.approx(long, rel=2e-3, abs=2e-3)
                assert float(scores.short_logprobs[j]) == pytest.approx(short, rel=2e-3, abs=2e-3)
                if k == 0:
                    assert scores.short_logprobs[j] == scores.long_logprobs[j]
        start += length


def test_scored_rows_align_with_the_sidecar_and_match_the_online_scorer(scored, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from torch.utils.data import default_collate

    from megatron_tokweight.data.packed_dataset import (
        PackedDataset,
        PackedDatasetConfig,
    )
    from megatron_tokweight.longcontext.score_sidecar import ScoredRows, TokenScores
    from megatron_tokweight.longcontext.scorer_online import OnlineScorer

    root, prefix, model = scored
    config = PackedDatasetConfig(random_seed=1, blend=([prefix], None), split="1,0,0", sequence_length=SEQ,
                                 path_to_cache=str(tmp_path / "cache"), overlong="split")
    dataset = BlendedMegatronDatasetBuilder(PackedDataset, [None, None, None], lambda: True, config).build()[0]
    scores = TokenScores.open(prefix)
    lc_config = LongContextConfig(method="sparse", kappa=0.5, short_context=8, stride=4)
    rows = ScoredRows(dataset, scores)
    weighted = ScoredRows(dataset, scores, lc_config)
    tokens = np.fromfile(prefix + ".bin", dtype=np.uint16).astype(np.int64)
    starts = np.cumsum([len(t) + 2 for t in TEXTS]) - [len(t) + 2 for t in TEXTS]
    checked = 0
    for idx in range(len(rows)):
        item = rows[idx]
        for p in torch.nonzero(item["loss_mask"]).flatten().tolist():
            sample = int(item["sample_ids"][p])
            piece = item["sample_ids"] == sample
            first = int(torch.nonzero(piece)[0])
            # which chunk of the sample this piece is: its tokens say it
            sample_tokens = tokens[starts[sample]:starts[sample] + len(TEXTS[sample]) + 2]
            chunk = next(c for c in range(0, len(sample_tokens), SEQ)
                         if np.array_equal(sample_tokens[c:c + int(piece.sum())], item["tokens"][piece].numpy()))
            j = starts[sample] + chunk + (p - first) + 1  # the label token in the .bin
            assert item["labels"][p] == tokens[j]
            assert item["short_logprobs"][p] == float(scores.short_logprobs[j])
            assert item["long_logprobs"][p] == float(scores.long_logprobs[j])
            checked += 1
        # padding and the last position of each piece predict nothing: 0
        last = item["cu_seqlens"][1:item["num_segments"] + 1].long() - 1
        for name in ("short_logprobs", "long_logprobs"):
            assert (item[name][item["sample_ids"] < 0] == 0).all() and (item[name][last] == 0).all()
        segments = segment_ids_from_cu_seqlens(item["cu_seqlens_padded"], item["num_segments"], SEQ)
        expect = item["loss_weights"] * sparse_weights(
            helm_scores(item["short_logprobs"], item["long_logprobs"]), item["loss_mask"], segments, 0.5)
        torch.testing.assert_close(weighted[idx]["loss_weights"], expect)
    # every target: text and <eot> of each non-empty text, less the first token of the second
    # fragment of the two samples longer than SEQ
    assert checked == sum(len(t) + 1 for t in TEXTS if t) - 2
    # the unfrozen scorer on the same rows with the same model gives the same log-probabilities
    batch = default_collate([rows[i] for i in range(len(rows))])
    online = OnlineScorer(lc_config, seq_length=SEQ).score(model, batch)
    mask = batch["loss_mask"] > 0
    torch.testing.assert_close(online.long_logprobs[mask], batch["long_logprobs"][mask], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(online.short_logprobs[mask], batch["short_logprobs"][mask], rtol=2e-3, atol=2e-3)
    with pytest.raises(ConfigError, match="'rho1' needs the trained model"):
        ScoredRows(dataset, scores, LongContextConfig(method="rho1", short_context=8, stride=4))
    with pytest.raises(ConfigError, match=r"scored with short_context, stride = \(8, 4\)"):
        ScoredRows(dataset, scores, LongContextConfig(short_context=16, stride=4))


def test_score_errors(scored, tmp_path, capsys, rank_group, prepared_prefix):
    import shutil

    from megatron_tokweight import cli
    from megatron_tokweight.errors import DataFormatError
    from megatron_tokweight.longcontext.score_sidecar import (
        TokenScores,
        default_scores_dir,
    )

    root, prefix, _ = scored
    args = ["score", prefix, "--scorer", str(root / "ckpt"), "--no-progress"]
    assert cli.main(args + ["--short-context", str(SEQ)]) == 2
    assert "--short-context 32 must be smaller than the training sequence length 32" in capsys.readouterr().err
    assert cli.main(args + ["--short-context", "8", "--stride", "9"]) == 2
    assert "stride=9" in capsys.readouterr().err
    assert cli.main(args + ["--short-context", "4", "--seq-length", "64"]) == 2
    assert "exceeds the scorer's 32 learned positions" in capsys.readouterr().err
    assert cli.main(["score", prefix, "--scorer", str(tmp_path), "--short-context", "4"]) == 2
    assert "not a `tokweight train` checkpoint" in capsys.readouterr().err
    # a checkpoint of another vocabulary
    other = tiny_model(rank_group, vocab=600)
    save_checkpoint(tmp_path / "other", prefix, other, rank_group)
    assert cli.main(["score", prefix, "--scorer", str(tmp_path / "other"), "--short-context", "4"]) == 2
    assert "has a vocabulary of 640 (padded)" in capsys.readouterr().err
    # scores copied next to another dataset: token count, then sample lengths differ
    for name, texts in (("fewer", TEXTS[:-1]), ("same_count", ["x" * 4, "y" * 21] + TEXTS[2:])):
        other_prefix = prepared_prefix(tmp_path, name, [{"text": t} for t in texts])
        shutil.copytree(default_scores_dir(prefix), default_scores_dir(other_prefix))
        message = "values but .* tokens" if name == "fewer" else "sample lengths differ"
        with pytest.raises(DataFormatError, match=message):
            TokenScores.open(other_prefix)


# ---------------------------------------------------------------------------------------------
# tensor parallelism: one spawn of two ranks


def _tp_case(rank, world_size, prefix, out_root):
    import torch.distributed as dist

    from megatron_tokweight.longcontext.logprobs import target_logprobs
    from megatron_tokweight.longcontext.scorer_offline import (
        load_scorer,
        open_checkpoint,
        score_dataset,
    )
    from megatron_tokweight.longcontext.scorer_online import OnlineScorer

    tp2 = dist.new_group([0, 1])
    tp1 = dist.new_group([rank], use_local_synchronization=True)
    result = {}
    # 1. the reduction on random vocab-parallel logits, including labels in either shard
    gen = torch.Generator().manual_seed(11)
    full = torch.randn(7, 3, 20, generator=gen) * 4
    labels = torch.randint(0, 20, (7, 3), generator=gen)
    shard = full[..., rank * 10:(rank + 1) * 10].clone().requires_grad_()
    got = target_logprobs(shard, labels, tp2)
    reference = torch.log_softmax(full.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    result["reduction"] = float((got.double() - reference).abs().max())
    result["no_grad"] = not got.requires_grad
    result["labels_in_both_shards"] = bool((labels < 10).any() and (labels >= 10).any())
    # 2. the unfrozen scorer at TP = 2 and TP = 1 (the same seed gives the same full weights)
    model2, model1 = tiny_model(tp2, seed=3, tp=2).eval(), tiny_model(tp1, seed=3).eval()
    batch = row_batch(PIECES, seed=9)
    config = LongContextConfig(method="dense", lam=0.5, short_context=6, stride=3)
    s2 = OnlineScorer(config, tp_group=tp2).score(model2, batch)
    s1 = OnlineScorer(config, tp_group=tp1).score(model1, batch)
    result["online"] = max(float((s2.short_logprobs - s1.short_logprobs).abs().max()),
                           float((s2.long_logprobs - s1.long_logprobs).abs().max()))
    result["weights"] = OnlineScorer(config, tp_group=tp2).weights(model2, batch)
    result["weights_tp1"] = OnlineScorer(config, tp_group=tp1).weights(model1, batch)
    # 3. the offline scorer on a TP = 2 checkpoint (both ranks score, rank 0 writes) vs TP = 1
    from megatron_tokweight.model import checkpoint
    from megatron_tokweight.trainer.config import TrainConfig

    byte2 = tiny_model(tp2, seed=5, vocab=BYTE_VOCAB, tp=2)
    identity = TrainConfig.from_dict({
        "data": {"prefixes": [prefix], "seq_length": SEQ}, "tensor_parallel_size": 2,
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "init_method_std": 0.1},
    }).identity()
    checkpoint.save(f"{out_root}/ckpt2", 1, 1, identity, byte2, torch.optim.AdamW(byte2.parameters()),
                    rank=rank, world_size=2, group=tp2)
    ckpt = open_checkpoint(f"{out_root}/ckpt2")
    scorer = load_scorer(ckpt, BYTE_VOCAB, tp2, rank)
    score_dataset(prefix, scorer, model_vocab_size=BYTE_VOCAB, model_seq_length=SEQ, short_context=8, stride=4,
                  out_dir=f"{out_root}/tp2", tp_group=tp2, write=rank == 0, progress=False)
    if rank == 0:
        byte1 = tiny_model(tp1, seed=5, vocab=BYTE_VOCAB).eval()
        score_dataset(prefix, byte1, model_vocab_size=BYTE_VOCAB, model_seq_length=SEQ, short_context=8,
                      stride=4, out_dir=f"{out_root}/tp1", tp_group=tp1, progress=False)
    return result


@pytest.fixture(scope="module")
def tp_runs(scored, tmp_path_factory):
    """`_tp_case` on two gloo ranks (TP = 2 and TP = 1 scorers of one model), one spawn."""
    from megatron_tokweight.trainer.spawn import spawn

    _, prefix, _ = scored
    out_root = tmp_path_factory.mktemp("tp-scores")
    return prefix, out_root, spawn(_tp_case, 2, prefix, str(out_root))


@pytest.mark.distributed
def test_tensor_parallel_logprobs_equal_single_process(tp_runs):
    for res in tp_runs[2]:
        assert res["reduction"] < 1e-5 and res["no_grad"] and res["labels_in_both_shards"]
        assert res["online"] < 1e-5


@pytest.mark.distributed
def test_tensor_parallel_weights_equal_single_process_and_agree_across_ranks(tp_runs):
    results = tp_runs[2]
    for res in results:
        torch.testing.assert_close(res["weights"], res["weights_tp1"], rtol=1e-4, atol=1e-5)
    # every TP rank holds the same weights (never summed over TP)
    assert torch.equal(results[0]["weights"], results[1]["weights"])


@pytest.mark.distributed
def test_tensor_parallel_score_files_equal_single_process(tp_runs):
    from megatron_tokweight.longcontext.score_sidecar import TokenScores

    prefix, out_root, _ = tp_runs
    tp2, tp1 = TokenScores.open(prefix, out_root / "tp2"), TokenScores.open(prefix, out_root / "tp1")
    for name in ("short_logprobs", "long_logprobs"):
        np.testing.assert_allclose(getattr(tp2, name).astype(np.float32), getattr(tp1, name).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
