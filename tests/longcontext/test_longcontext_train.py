"""Long-context weighting wired into training: `tokweight train` with `long_context`, the frozen
scores of `tokweight score`, the checkpoint's recorded vocabulary, the Megatron-LM hooks.

References are independent of the scorers: every piece of a packed row (and every short-context
window of the formula) runs alone through the model, the log-probabilities come from
`torch.log_softmax`, the weights from docs/CONTRACTS.md section 2 in plain Python, and the loss is
sum w l / Z with Z counted from the rows.
"""
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_longcontext import (
    pieces,
    plain_dense,
    plain_logprobs,
    plain_loss,
    plain_top,
)

from megatron_tokweight.errors import ConfigError, DataFormatError

SEQ, N_SHORT, STRIDE, LAM = 64, 8, 4, 0.5
MODEL = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "init_method_std": 0.1}
MODES = ("weight_sum", "sample_count", "token_count")
TOL = 2e-6  # relative, of a step's loss (fp32 training loop vs float64 reference)
ONLINE = {"method": "dense", "scorer": "unfrozen", "lambda": LAM, "n": N_SHORT, "stride": STRIDE}
FROZEN = dict(ONLINE, scorer="frozen")


# ---------------------------------------------------------------------------------------------
# the plain references


# ---------------------------------------------------------------------------------------------
# fixtures: one in-process gloo rank, a prepared dataset, training runs


@pytest.fixture(scope="module")
def group(rank_group):  # conftest's one-rank gloo world
    return rank_group


def texts(count, seed):
    """{"text"} records of 18..58 characters (samples shorter than SEQ: every piece is a whole
    sample), words repeated so that a longer context helps."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(3)) for _ in range(6)]
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 15)))[: rng.randint(18, 58)]}
            for _ in range(count)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, prepared_prefix):
    root = tmp_path_factory.mktemp("lc-train")
    prepared_prefix(root, "train", texts(60, 0))
    return root


def train_config(root, mode="weight_sum", long_context=None, steps=2, save=None, seed=5):
    from megatron_tokweight.trainer.config import TrainConfig

    return TrainConfig.from_dict({
        "data": {"prefixes": [str(root / "train")], "seq_length": SEQ},
        "model": MODEL,
        "weighting": {"preset": "molmo2", "normalization": mode},  # c / sqrt(n) sample weights
        "long_context": long_context,
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0},
        "steps": steps, "micro_batch_size": 2, "num_micro_batches": 2, "seed": seed, "log_interval": 100,
        "save_dir": None if save is None else str(save), "save_interval": 1 if save else 0,
    })


def train(config, group):
    from megatron_tokweight.trainer.loop import train_on_rank
    from megatron_tokweight.trainer.micro_batches import make_groups
    from megatron_tokweight.trainer.plan import plan_run

    plan = plan_run(config)
    return plan, train_on_rank(plan, 0, make_groups(0, 1, 1))


def step_rows(root, step):
    """The collated micro-batches step `step` (0-based) trains on: rows step*4 + m*2 + (0, 1)."""
    from torch.utils.data import default_collate

    from megatron_tokweight.trainer.plan import build_datasets

    dataset = build_datasets(train_config(root, steps=3))[0]  # no long_context: the plain rows
    return [default_collate([dataset[step * 4 + m * 2 + i] for i in range(2)]) for m in range(2)]


def load_model(plan, path=None, seed=5):
    """The run's model: initial (seed) or a checkpoint's parameters."""
    from megatron_tokweight.model.gpt import build_gpt_model
    from megatron_tokweight.trainer.micro_batches import make_groups

    torch.manual_seed(seed)
    model = build_gpt_model(plan.config.model_config(plan.vocab_size), tp_group=make_groups(0, 1, 1).tp)
    if path is not None:
        model.load_state_dict(torch.load(os.path.join(path, "rank000.pt"), weights_only=False)["model"])
    return model


@pytest.fixture(scope="module")
def online_runs(data, group):
    """2 steps per normalization mode with the unfrozen scorer, a checkpoint after each step."""
    runs = {}
    for mode in MODES:
        save = data / f"online-{mode}"
        runs[mode] = (*train(train_config(data, mode, ONLINE, save=save), group), save)
    return runs


# ---------------------------------------------------------------------------------------------
# unfrozen: the model scores itself each step


@pytest.mark.parametrize("mode", MODES)
def test_online_weights_in_the_loss_equal_an_independent_recomputation(data, online_runs, mode):
    plan, result, save = online_runs[mode]
    assert [s.step for s in result.steps] == [1, 2] and all(s.scoring_seconds > 0 for s in result.steps)
    # step 2 trains with the parameters after step 1: the scorer must use them (not the initial)
    model = load_model(plan, save / "step_0000001")
    rows = step_rows(data, 1)
    scored = [plain_logprobs(model, r, N_SHORT, STRIDE) for r in rows]
    lc = [plain_dense(short, long, r, LAM) for (short, long), r in zip(scored, rows)]
    weights = [r["loss_weights"].double() * w for r, w in zip(rows, lc)]
    long = [lp for _, lp in scored]
    expect = plain_loss(long, weights, rows, mode)
    got = result.steps[1].reports["weighted loss"]
    assert got == pytest.approx(expect, rel=TOL)
    # the long-context factor matters here: sample weights alone give another loss
    sample_only = plain_loss(long, [r["loss_weights"].double() for r in rows], rows, mode)
    assert abs(sample_only - expect) > 50 * TOL * expect
    # the unweighted mean is the model's plain cross-entropy on the same tokens
    tokens = sum(int((r["loss_mask"] > 0).sum()) for r in rows)
    assert result.steps[1].reports["lm loss"] == pytest.approx(-sum(float(lp.sum()) for lp in long) / tokens, rel=TOL)


def test_scoring_leaves_rng_dropout_and_gradients_alone(data, group):
    """The scorer runs under no_grad in eval mode and restores the RNG: a step with dropout draws
    the same masks whether it scored first or not."""
    from megatron_tokweight.data.thd_batch import flatten_rows
    from megatron_tokweight.longcontext import LongContextConfig
    from megatron_tokweight.longcontext.scorer_online import step_scorer
    from megatron_tokweight.model.gpt import (
        ModelConfig,
        build_gpt_model,
        packed_token_loss,
    )

    torch.manual_seed(0)
    model = build_gpt_model(ModelConfig(vocab_size=262, seq_length=SEQ, hidden_dropout=0.3, attention_dropout=0.3,
                                        **MODEL), tp_group=group).train()
    batch = flatten_rows(step_rows(data, 0)[0])
    scorer = step_scorer(LongContextConfig.from_dict(ONLINE), group, SEQ)
    packed_token_loss(model, batch).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.manual_seed(1)
    plain = packed_token_loss(model, batch)
    torch.manual_seed(1)
    reweighted = scorer.reweight(model, [batch])[0]
    assert model.training  # restored
    after_scoring = packed_token_loss(model, batch)
    assert torch.equal(plain, after_scoring)  # the same dropout masks
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name  # no gradient from the scoring forwards
    assert not reweighted["loss_weights"].requires_grad
    assert reweighted["tokens"] is batch["tokens"] and not torch.equal(reweighted["loss_weights"], batch["loss_weights"])


def test_long_context_config_section_and_overrides(data, tmp_path, capsys):
    import yaml

    from megatron_tokweight.cli import build_parser, main
    from megatron_tokweight.cli.train import config_from_args
    from megatron_tokweight.trainer.config import TrainConfig

    raw = {"data": {"prefixes": [str(data / "train")], "seq_length": SEQ}, "model": MODEL, "steps": 1,
           "long_context": {"method": "sparse", "kappa": 0.5, "n": N_SHORT, "stride": STRIDE}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))

    def load(*sets):
        return config_from_args(build_parser("train").parse_args(
            ["train", "--config", str(path), *sum((["--set", s] for s in sets), [])]))

    config = load("long_context.method=dense", "long_context.lambda=0.25", "long_context.scorer=unfrozen")
    lc = config.long_context
    assert (lc.method, lc.lam, lc.kappa, lc.scorer, lc.short_context) == ("dense", 0.25, 0.5, "unfrozen", N_SHORT)
    assert config.identity()["long_context"]["lam"] == 0.25
    # a run without the section keeps the identity its checkpoints were written with
    assert "long_context" not in train_config(data).identity()
    with pytest.raises(ConfigError, match="long_context: unknown key 'lamda'"):
        load("long_context.lamda=0.5")
    with pytest.raises(ConfigError, match="method 'helm_dense' is unknown; use one of dense, sparse, longce, rho1"):
        load("long_context.method=helm_dense")
    with pytest.raises(ConfigError, match="short_context=64 must be smaller than the training sequence length 64"):
        load("long_context.n=64")
    with pytest.raises(ConfigError, match="rho1' compares the trained model with a fixed reference"):
        load("long_context.method=rho1", "long_context.scorer=unfrozen")
    with pytest.raises(ConfigError, match="long_context must be null or a mapping"):
        load("long_context=dense")
    # the example config is valid
    example = TrainConfig.from_file(Path(__file__).resolve().parents[2] / "examples" / "train_longcontext.yaml")
    assert example.long_context.short_context * 4 == example.data.seq_length
    # the CLI prints the error and exits 2 (nothing spawned)
    assert main(["train", "--config", str(path), "--set", "long_context.kapa=1"]) == 2
    assert "unknown key 'kapa'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# frozen: `tokweight score` with a trained checkpoint, then training reads the sidecar


@pytest.fixture(scope="module")
def scored(data, online_runs, group):
    """`tokweight score` of the training prefix with the weight_sum run's last checkpoint: its checks
    and its rank function, in this process (a spawn costs seconds; tests/test_longcontext.py runs
    the command itself)."""
    from megatron_tokweight.cli.score import _score_rank
    from megatron_tokweight.data.sidecar import read_sidecar
    from megatron_tokweight.longcontext.scorer_offline import (
        check_scorer_matches_data,
        open_checkpoint,
    )

    _, _, save = online_runs["weight_sum"]
    prefix = str(data / "train")
    ckpt = open_checkpoint(str(save))
    tokenizer = read_sidecar(prefix).tokenizer
    check_scorer_matches_data(ckpt, prefix, tokenizer)
    _score_rank(0, 1, prefix, ckpt, tokenizer["vocab_size"],
                dict(short_context=N_SHORT, stride=STRIDE, seq_length=SEQ, out_dir=None, tokens_per_batch=None,
                     progress=False))
    return save / "step_0000002"


def sidecar_row_values(prefix, rows, name):
    """Label-aligned sidecar values [b, L] read straight from the .npy: every piece here is a whole
    sample, so position p of a piece at offset o predicts token p - o + 1 of its sample."""
    from megatron_tokweight.data.sidecar import read_sidecar

    values = np.load(os.path.join(f"{prefix}.tokweight", "longcontext", f"{name}.npy"))
    lengths = np.asarray(read_sidecar(prefix).lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    out = torch.zeros(rows["tokens"].shape, dtype=torch.float64)
    for r in range(out.shape[0]):
        for b, e in pieces(rows, r):
            sample = int(rows["sample_ids"][r, b])
            if sample < 0:
                continue
            assert e - b == lengths[sample]  # a whole sample
            for p in range(b, e - 1):
                out[r, p] = float(values[starts[sample] + p - b + 1])
    return out


def test_frozen_scores_are_read_and_weight_the_loss(data, scored, group):
    from megatron_tokweight.longcontext.scorer_offline import (
        load_scorer,
        open_checkpoint,
    )

    prefix = str(data / "train")
    plan, result = train(train_config(data, "weight_sum", FROZEN, steps=1), group)
    assert result.steps[0].scoring_seconds == 0  # nothing scored at step time
    rows = step_rows(data, 0)
    short = [sidecar_row_values(prefix, r, "short_logprobs") for r in rows]
    long_ref = [sidecar_row_values(prefix, r, "long_logprobs") for r in rows]
    # the sidecar holds the scorer checkpoint's log-probabilities (float16)
    scorer = load_scorer(open_checkpoint(str(scored)), plan.vocab_size, group, 0)
    for r, s, l in zip(rows, short, long_ref):
        want_short, want_long = plain_logprobs(scorer, r, N_SHORT, STRIDE)
        mask = r["loss_mask"] > 0
        torch.testing.assert_close(s[mask], want_short[mask], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(l[mask], want_long[mask], rtol=2e-3, atol=2e-3)
    lc = [plain_dense(s, l, r, LAM) for s, l, r in zip(short, long_ref, rows)]
    assert max(float(w[r["loss_mask"] > 0].std()) for w, r in zip(lc, rows)) > 0.1  # far from uniform
    # the trained model (initial parameters at step 1) gives the per-token losses
    model = load_model(plan)
    long = [plain_logprobs(model, r, N_SHORT, STRIDE, short=False)[1] for r in rows]
    weights = [r["loss_weights"].double() * w for r, w in zip(rows, lc)]
    expect = plain_loss(long, weights, rows, "weight_sum")
    assert result.steps[0].reports["weighted loss"] == pytest.approx(expect, rel=TOL)
    sample_only = plain_loss(long, [r["loss_weights"].double() for r in rows], rows, "weight_sum")
    assert abs(sample_only - expect) > 50 * TOL * expect


def test_frozen_rho1_scores_the_trained_model_against_the_sidecar(data, scored, group):
    prefix = str(data / "train")
    rho1 = {"method": "rho1", "k": 0.5, "n": N_SHORT, "stride": STRIDE}
    plan, result = train(train_config(data, "token_count", rho1, steps=1), group)
    assert result.steps[0].scoring_seconds > 0  # the trained model's log-probabilities, each step
    rows = step_rows(data, 0)
    model = load_model(plan)
    long = [plain_logprobs(model, r, N_SHORT, STRIDE, short=False)[1] for r in rows]
    reference = [sidecar_row_values(prefix, r, "long_logprobs") for r in rows]
    # excess loss l_model - l_reference = reference log p - model log p; the top half kept
    keep = [plain_top(ref - lp, r, 0.5) for ref, lp, r in zip(reference, long, rows)]
    weights = [r["loss_weights"].double() * k for r, k in zip(rows, keep)]
    expect = plain_loss(long, weights, rows, "token_count")
    assert result.steps[0].reports["weighted loss"] == pytest.approx(expect, rel=TOL)


def test_frozen_errors_before_training(data, scored, tmp_path, prepared_prefix):
    from megatron_tokweight.trainer.config import TrainConfig
    from megatron_tokweight.trainer.plan import plan_run

    # scores for another short context than the config asks for
    with pytest.raises(ConfigError, match=r"scored with short_context, stride = \(8, 4\).*asks for \(16, 4\)"):
        plan_run(train_config(data, long_context=dict(FROZEN, n=16)))
    # a prefix nobody scored: named, with the command that fixes it
    prepared_prefix(tmp_path, "other", texts(20, 1))
    raw = train_config(data, long_context=FROZEN).to_dict()
    raw["data"]["prefixes"] = [str(tmp_path / "other")]
    with pytest.raises(DataFormatError, match="other.tokweight/longcontext/meta.json not found: run `tokweight score"):
        plan_run(TrainConfig.from_dict(raw))


# ---------------------------------------------------------------------------------------------
# checkpoint meta: vocabulary, tokenizer, model config; the scorer refuses a mismatch


def build_hf_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["abc abd abe bcd bce cde"] * 20, trainer=trainer)
    tok.save(str(path))
    return str(path)


def test_checkpoint_records_the_model_and_the_scorer_refuses_another_vocabulary(data, scored, tmp_path, capsys,
                                                                               prepared_prefix):
    from megatron_tokweight import cli
    from megatron_tokweight.data.sidecar import read_sidecar
    from megatron_tokweight.data.tokenizer import ByteTokenizer, tokenizer_differences
    from megatron_tokweight.longcontext.scorer_offline import (
        check_scorer_matches_data,
        open_checkpoint,
    )
    from megatron_tokweight.model import checkpoint

    meta = checkpoint.read_meta(str(scored))
    assert meta.vocab_size == 262 and meta.tokenizer == ByteTokenizer().spec()
    assert meta.model_config["vocab_size"] == 262 and meta.model_config["seq_length"] == SEQ
    assert meta.model_config["hidden_size"] == MODEL["hidden_size"]
    # data tokenized with another (Hugging Face) tokenizer
    tok = build_hf_tokenizer(tmp_path / "tokenizer.json", 300)
    prepared_prefix(tmp_path, "hf", texts(10, 2), tokenizer=tok)
    spec = read_sidecar(str(tmp_path / "hf")).tokenizer
    assert spec["vocab_size"] != 262
    rc = cli.main(["score", str(tmp_path / "hf"), "--scorer", str(scored), "--short-context", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"the scorer checkpoint {scored} does not match {tmp_path / 'hf'}" in err
    assert f"vocab_size: checkpoint 262, data {spec['vocab_size']}" in err
    # a tokenizer of the same size is still another tokenizer: the recorded spec tells
    ckpt = open_checkpoint(str(scored))
    with pytest.raises(ConfigError, match="tokenizer.kind: checkpoint 'byte', data 'hf'"):
        check_scorer_matches_data(ckpt, str(tmp_path / "hf"), dict(spec, vocab_size=262))
    # the same tokenizer.json copied elsewhere is the same tokenizer (the path is not compared)
    assert tokenizer_differences(spec, dict(spec, path="/elsewhere/tokenizer.json")) == []


# ---------------------------------------------------------------------------------------------
# Megatron-LM hooks (one rank; TP = 2 runs in tests/test_megatron_hooks.py's spawn)


def megatron_args(argv, checked=True):
    """Megatron-LM-like arguments with the plugin's flags; `checked=False` skips the parse-time
    refusal of flag combinations, to reach the readers' own errors."""
    import argparse

    from megatron_tokweight.megatron.arguments import extra_args_provider

    parser = argparse.ArgumentParser()
    for flag, kwargs in (("--data-path", dict(nargs="*")), ("--split", dict(default=None)),
                         ("--seq-length", dict(type=int)), ("--seed", dict(type=int, default=1234)),
                         ("--micro-batch-size", dict(type=int, default=1)),
                         ("--pipeline-model-parallel-size", dict(type=int, default=1)),
                         ("--context-parallel-size", dict(type=int, default=1)),
                         ("--calculate-per-token-loss", dict(action="store_true")),
                         ("--check-for-nan-in-loss-and-grad", dict(action="store_true"))):
        parser.add_argument(flag, **kwargs)
    parser = extra_args_provider(parser)
    if checked:
        return parser.parse_args(argv)
    namespace, rest = argparse.ArgumentParser.parse_known_args(parser, argv)
    assert not rest, rest
    return namespace


def test_megatron_long_context_flags(tmp_path, capsys):
    from megatron_tokweight.megatron.arguments import long_context_config_from_args

    assert long_context_config_from_args(megatron_args([])) is None  # off unless asked for
    path = tmp_path / "lc.yaml"
    path.write_text("method: sparse\nkappa: 0.5\nlam: 0.3\nn: 16\nstride: 8\n")
    config = long_context_config_from_args(megatron_args(
        ["--long-context-config", str(path), "--long-context-lambda", "0.9", "--long-context-scorer", "unfrozen"]))
    assert (config.method, config.kappa, config.lam, config.short_context, config.stride, config.scorer) == (
        "sparse", 0.5, 0.9, 16, 8, "unfrozen")
    assert long_context_config_from_args(megatron_args(["--long-context-method", "longce"])).gamma == 5.0
    bad_stride = ["--long-context-short-context", "4", "--long-context-stride", "5"]
    with pytest.raises(ConfigError, match="--long-context-\\* flags: long_context.stride must lie in"):
        long_context_config_from_args(megatron_args(bad_stride, checked=False))
    with pytest.raises(SystemExit):  # and Megatron-LM's parse refuses it before anything is built
        megatron_args(bad_stride)
    assert "long_context.stride must lie in" in capsys.readouterr().err
    path.write_text("method: dense\nlamda: 0.3\n")
    with pytest.raises(ConfigError, match="lc.yaml and --long-context-\\* flags: long_context: unknown key 'lamda'"):
        long_context_config_from_args(megatron_args(["--long-context-config", str(path)], checked=False))
    with pytest.raises(SystemExit):
        megatron_args(["--long-context-method", "helm"])


def test_megatron_frozen_datasets_carry_the_scores(data, scored):
    from megatron_tokweight.data.packed_dataset import build_packed_datasets
    from megatron_tokweight.longcontext.score_sidecar import (
        ScoredRows,
        TokenScores,
        with_scores,
    )
    from megatron_tokweight.megatron.arguments import long_context_config_from_args
    from megatron_tokweight.megatron.datasets_provider import (
        packed_dataset_config_from_args,
    )

    prefix = str(data / "train")
    args = megatron_args(["--data-path", "1", prefix, "1", prefix, "--split", "1,0,0", "--seq-length", str(SEQ),
                          "--long-context-method", "sparse", "--long-context-kappa", "0.5",
                          "--long-context-short-context", str(N_SHORT), "--long-context-stride", str(STRIDE)])
    config = packed_dataset_config_from_args(args)
    lc = long_context_config_from_args(args)
    blend = with_scores(build_packed_datasets(config, [8, 0, 0]), lc)[0]
    plain = build_packed_datasets(config, [8, 0, 0])[0]
    assert all(isinstance(member, ScoredRows) for member in blend.datasets)
    for i in range(8):
        got, row = blend[i], plain[i]
        member = plain.datasets[int(row["dataset_id"])]
        want = ScoredRows(member, TokenScores.open(prefix), lc)[int(plain.dataset_sample_index[i])]
        assert torch.equal(got["loss_weights"], want["loss_weights"]) and torch.equal(got["tokens"], row["tokens"])
        assert not torch.equal(got["loss_weights"], row["loss_weights"])


def test_megatron_online_hooks_on_one_rank(data, online_runs, group):
    """TokweightSteps with the unfrozen scorer through the schedule == the plain reference; the
    prefetcher scores before Z (weight_sum: the scored weights are Z)."""
    from megatron_tokweight.longcontext import LongContextConfig
    from megatron_tokweight.longcontext.scorer_online import step_scorer
    from megatron_tokweight.loss import reduce_reports
    from megatron_tokweight.megatron.steps import TokweightSteps
    from megatron_tokweight.trainer.forward_backward import (
        ScheduleConfig,
        forward_backward,
    )

    plan, _, save = online_runs["weight_sum"]
    model = load_model(plan, save / "step_0000002")
    rows = step_rows(data, 0)
    for per_token_loss in (False, True):
        steps = TokweightSteps("weight_sum", per_token_loss, 2, group, None, group, device="cpu",
                               long_context_scorer=step_scorer(LongContextConfig.from_dict(ONLINE), group, SEQ))
        reports, _ = forward_backward(steps.forward_step, iter(rows), model, 2, ScheduleConfig(per_token_loss), group)
        got = reduce_reports(reports, group)["weighted loss"]
        scored = [plain_logprobs(model, r, N_SHORT, STRIDE) for r in rows]
        weights = [r["loss_weights"].double() * plain_dense(s, l, r, LAM) for (s, l), r in zip(scored, rows)]
        assert got == pytest.approx(plain_loss([l for _, l in scored], weights, rows, "weight_sum"), rel=TOL)
    with pytest.raises(ValueError, match="needs the model: call pull"):
        steps.prefetcher(iter(rows)).pull()


def test_megatron_online_scorer_refuses_pipeline_parallelism(data):
    from megatron_tokweight.megatron.steps import steps_from_megatron_args

    args = megatron_args(["--data-path", str(data / "train"), "--seq-length", str(SEQ),
                          "--pipeline-model-parallel-size", "2", "--long-context-scorer", "unfrozen",
                          "--long-context-short-context", "8", "--long-context-stride", "4"], checked=False)
    # refused from the arguments alone, before any parallel state is read (for arguments parsed
    # without extra_args_provider's check, which refuses them first: tests/megatron)
    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size 1 \\(got 2\\)"):
        steps_from_megatron_args(args)
