"""Long-context weights find the tokens that need long context: a key-value retrieval task.

Each sample (byte tokenizer, one assistant turn) is

    <bos> <assistant> k1 v1 k2 v2 ... k8 v8 | 64 filler characters | "|" | k1 v1 ... k8 v8 <eot>

with 8 distinct random keys (letters a-p) and random values (digits 0-7): in the query section a
value is predictable only from its key's definition about 80 tokens back, far beyond the short
context (n = 32). Filler characters are uniformly random: no context helps predict them.

A tiny GPT is trained for 300 steps with `tokweight train` (the definition/filler span weighted
0.1, the query span 1: the retrieval circuit forms within a few hundred CPU steps then), scores a
held-out set with `tokweight score`, and the weights must single out the retrieved values:
dense weights (lambda 0.5) >= 3x the filler mean, sparse selection (kappa 0.25) of (almost) every value. The unfrozen
scorer (the same model scoring itself) must agree with the frozen sidecar.
"""
import random

import pytest
import torch

KEYS, VALUES = "abcdefghijklmnop", "01234567"
FILLER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&*"
PAIRS, FILL, SEQ = 8, 64, 256
N_SHORT, STRIDE = 32, 16
# position ids (within a sample) whose label is a queried value / a filler character
QUERY = 2 + 2 * PAIRS + FILL + 1  # first query key
VALUE_POSITIONS = list(range(QUERY, QUERY + 2 * PAIRS, 2))
FILLER_POSITIONS = list(range(2 + 2 * PAIRS - 1, 2 + 2 * PAIRS + FILL - 1))


def sample(rng):
    keys = rng.sample(KEYS, PAIRS)
    pairs = "".join(k + rng.choice(VALUES) for k in keys)
    context = pairs + "".join(rng.choice(FILLER) for _ in range(FILL)) + "|"
    segments = [{"text": context, "kind": "context"}, {"text": pairs, "kind": "query"}]
    return {"messages": [{"role": "assistant", "content": segments}]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_prefix):
    """Prepared train/eval sets, a trained checkpoint, `tokweight score` run on the eval set."""
    import torch.distributed as dist

    from megatron_tokweight import cli
    from megatron_tokweight.trainer.config import TrainConfig
    from megatron_tokweight.trainer.loop import train_on_rank
    from megatron_tokweight.trainer.micro_batches import make_groups
    from megatron_tokweight.trainer.plan import plan_run

    root = tmp_path_factory.mktemp("kv")
    rng = random.Random(0)
    prepared_prefix(root, "train", [sample(rng) for _ in range(800)])
    prepared_prefix(root, "eval", [sample(rng) for _ in range(48)])
    config = TrainConfig.from_dict({
        "data": {"prefixes": [str(root / "train")], "seq_length": SEQ},
        # a larger init than Megatron's 0.02 lets the retrieval attention form in ~150 steps
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "init_method_std": 0.1},
        "weighting": {"span_weights": {"context": 0.1}},
        "optimizer": {"lr": 3e-3, "min_lr": 1e-3, "warmup_steps": 10},
        "steps": 300, "micro_batch_size": 4, "num_micro_batches": 2, "seed": 0, "log_interval": 1000,
        "save_dir": str(root / "ckpt"),
    })
    plan = plan_run(config)
    owner = not dist.is_initialized()  # one in-process gloo rank (Megatron's model needs groups)
    if owner:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(str(root / "store"), 1))
    try:
        train_on_rank(plan, 0, make_groups(0, 1, 1))
        rc = cli.main(["score", str(root / "eval"), "--scorer", str(root / "ckpt"), "--short-context",
                       str(N_SHORT), "--stride", str(STRIDE), "--no-progress"])
        assert rc == 0
        yield root, plan
    finally:
        if owner:
            dist.destroy_process_group()


def eval_rows(root, config=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from torch.utils.data import default_collate

    from megatron_tokweight.data.packed_dataset import (
        PackedDataset,
        PackedDatasetConfig,
    )
    from megatron_tokweight.longcontext.score_sidecar import ScoredRows, TokenScores

    data_config = PackedDatasetConfig(random_seed=1, blend=([str(root / "eval")], None), split="1,0,0",
                                      sequence_length=SEQ, path_to_cache=str(root / "cache"))
    dataset = BlendedMegatronDatasetBuilder(PackedDataset, [None, None, None], lambda: True, data_config).build()[0]
    rows = ScoredRows(dataset, TokenScores.open(str(root / "eval")), config)
    return default_collate([rows[i] for i in range(len(rows))])


def position_masks(batch):
    """Label positions of retrieved values and of filler characters, [rows, SEQ]."""
    positions, real = batch["position_ids"], batch["sample_ids"] >= 0
    values = real & torch.isin(positions, torch.tensor(VALUE_POSITIONS))
    filler = real & torch.isin(positions, torch.tensor(FILLER_POSITIONS))
    assert int(values.sum()) == 48 * PAIRS and int(filler.sum()) == 48 * FILL
    return values, filler


def test_retrieval_is_learned_and_dense_weights_single_out_the_values(trained):
    from megatron_tokweight.longcontext import LongContextConfig

    root, _ = trained
    config = LongContextConfig(method="dense", lam=0.5, short_context=N_SHORT, stride=STRIDE)
    batch = eval_rows(root, config)
    values, filler = position_masks(batch)
    # the model retrieves: with full context the values are near certain, without it near chance
    long_value, short_value = batch["long_logprobs"][values].mean(), batch["short_logprobs"][values].mean()
    assert long_value > -0.5, f"retrieval not learned: mean log p(value) {long_value:.3f} with full context"
    assert short_value < -1.5, f"values predictable from {N_SHORT} tokens: {short_value:.3f}"
    # dense weights (loss_weights here = long-context weights, the eval set has no sample weighting)
    weights = batch["loss_weights"]
    ratio = weights[values].mean() / weights[filler].mean()
    print(f"dense lambda 0.5: values {ratio:.2f}x filler; log p(value) long {long_value:.3f} short {short_value:.3f}")
    assert ratio >= 3.0, f"dense: values get {ratio:.2f}x the filler mean weight"
    # per piece the weights average to 1 over its loss tokens (N * s / sum s)
    per_piece = weights.sum() / batch["loss_mask"].sum()
    assert per_piece == pytest.approx(1.0, abs=1e-4)
    # lambda is the uniform floor: the contrast shrinks as it grows, never reverses
    from megatron_tokweight.longcontext import (
        dense_weights,
        helm_scores,
        segment_ids_from_cu_seqlens,
    )

    scores = helm_scores(batch["short_logprobs"], batch["long_logprobs"])
    segments = segment_ids_from_cu_seqlens(batch["cu_seqlens_padded"], batch["num_segments"], SEQ)
    ratios = []
    for lam in (0.0, 0.25, 0.5, 0.75):
        w = dense_weights(scores, batch["loss_mask"], segments, lam)
        ratios.append(float(w[values].mean() / w[filler].mean()))
    print("value/filler weight ratio at lambda 0, 0.25, 0.5, 0.75:", [round(r, 2) for r in ratios])
    assert ratios[2] == pytest.approx(float(ratio), rel=1e-5)
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] > 1.5


def test_sparse_weights_select_the_values_and_the_online_scorer_agrees(trained):
    from megatron_tokweight.longcontext import LongContextConfig
    from megatron_tokweight.longcontext.scorer_offline import (
        load_scorer,
        open_checkpoint,
    )
    from megatron_tokweight.longcontext.scorer_online import OnlineScorer

    root, plan = trained
    config = LongContextConfig(method="sparse", kappa=0.25, short_context=N_SHORT, stride=STRIDE)
    batch = eval_rows(root, config)
    values, filler = position_masks(batch)
    selected = batch["loss_weights"] > 0
    value_rate, filler_rate = selected[values].float().mean(), selected[filler].float().mean()
    print(f"sparse kappa 0.25: values {value_rate:.1%}, filler {filler_rate:.1%} selected")
    assert value_rate >= 0.9, f"sparse: only {value_rate:.1%} of the values selected"
    # a quarter of each piece is kept: the filler falls well below that base rate
    assert filler_rate <= 0.2, f"sparse: {filler_rate:.1%} of the filler selected"
    # the unfrozen scorer: the same checkpoint scoring the packed rows itself, under no_grad
    import torch.distributed as dist

    model = load_scorer(open_checkpoint(str(root / "ckpt")), plan.vocab_size, dist.new_group([0]), 0)
    unweighted = dict(batch, loss_weights=batch["loss_mask"].clone())
    online_scorer = OnlineScorer(config, seq_length=SEQ)
    scores = online_scorer.score(model, unweighted)
    mask = batch["loss_mask"] > 0
    for name in ("short_logprobs", "long_logprobs"):  # the sidecar holds float16
        torch.testing.assert_close(getattr(scores, name)[mask], batch[name][mask], rtol=3e-3, atol=3e-3)
    online = online_scorer.weights(model, unweighted) > 0
    assert online[values].float().mean() >= 0.9
    assert (online != selected).float().mean() < 0.01  # ties at float16 resolution may differ
