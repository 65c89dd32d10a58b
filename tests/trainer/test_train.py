"""`tokweight train`: loss falls, resume == uninterrupted, config errors before any work."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from megatron_tokweight.errors import ConfigError, TokweightError
from megatron_tokweight.trainer.config import TrainConfig
from megatron_tokweight.trainer.plan import plan_run

SEQ = 256


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from megatron_tokweight.data.prepare import prepare_jsonl
    from megatron_tokweight.data.sources.demo_corpus import CorpusConfig, write_corpus

    root = tmp_path_factory.mktemp("train-data")
    paths = write_corpus(root / "corpus", CorpusConfig(num_train=300, num_eval=40, seed=7))
    for split, path in paths.items():
        prepare_jsonl(path, root / split)
    return root


def config_dict(data_dir, **overrides):
    base = {
        "data": {"prefixes": [str(data_dir / "train")], "eval_prefixes": [str(data_dir / "eval")],
                 "seq_length": SEQ},
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4},
        "weighting": "molmo2",
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "steps": 20,
        "micro_batch_size": 2,
        "num_micro_batches": 2,
        "tensor_parallel_size": 2,
        "seed": 3,
        "log_interval": 100,
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            base[section][field] = value
        else:
            base[key] = value
    return base


def checkpoint_params(save_dir, step, rank):
    state = torch.load(os.path.join(save_dir, f"step_{step:07d}", f"rank{rank:03d}.pt"), weights_only=False)
    return state["model"], state["optimizer"]["state"]


def _runs_on_rank(rank, world_size, plans):
    from megatron_tokweight.trainer.loop import train_on_rank
    from megatron_tokweight.trainer.micro_batches import make_groups

    groups = make_groups(rank, world_size, 1)
    return [train_on_rank(plan, rank, groups) for plan in plans]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Four runs in one spawn of two ranks (ranks start once; run_training = plan_run + spawn):
    20 weighted steps at TP = 2 with a checkpoint at the end; the same run interrupted after
    step 8 (checkpoint); its resumption from that checkpoint to step 20; the first run with the
    fused linear cross-entropy (`fused_cross_entropy: torch`)."""
    from megatron_tokweight.trainer.spawn import spawn

    root = tmp_path_factory.mktemp("runs")
    full_dir, part_dir = root / "full", root / "part"
    configs = [
        TrainConfig.from_dict(config_dict(data_dir, save_dir=str(full_dir))),
        TrainConfig.from_dict(config_dict(data_dir, save_dir=str(part_dir), exit_interval=8)),
        TrainConfig.from_dict(config_dict(data_dir, save_dir=str(part_dir), resume=True)),
        TrainConfig.from_dict(config_dict(data_dir, save_dir=str(root / "fused"), fused_cross_entropy="torch")),
    ]
    full, first, second, fused = spawn(_runs_on_rank, 2, [plan_run(c) for c in configs])[0]
    return {"full": full, "first": first, "second": second, "fused": fused, "full_dir": full_dir,
            "part_dir": part_dir, "fused_dir": root / "fused", "configs": configs}


@pytest.mark.distributed
def test_training_loss_falls_and_evaluates(runs):
    full = runs["full"]
    losses = [s.reports["weighted loss"] for s in full.steps]
    assert len(losses) == 20
    # the loss falls by well over 0.8 nats (about 5.7 -> 4.5) in 20 steps
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.8, losses
    assert full.evals and full.evals[-1]["step"] == 20
    assert set(full.evals[-1]["losses"]) >= {"lm loss", "caption", "multiple_choice"}


@pytest.mark.distributed
def test_resume_is_exact(runs):
    full, first, second = runs["full"], runs["first"], runs["second"]
    assert [s.step for s in first.steps] == list(range(1, 9))
    assert second.start_step == 8 and [s.step for s in second.steps] == list(range(9, 21))
    # the same rows (token counts) and bit-identical losses, step for step
    for a, b in zip(full.steps, first.steps + second.steps):
        assert a.real_tokens == b.real_tokens
        assert a.reports == b.reports, a.step
    for rank in range(2):
        model_a, opt_a = checkpoint_params(runs["full_dir"], 20, rank)
        model_b, opt_b = checkpoint_params(runs["part_dir"], 20, rank)
        for key, value in model_a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, model_b[key]), key
        assert opt_a.keys() == opt_b.keys()


@pytest.mark.distributed
def test_the_fused_cross_entropy_trains_the_same_model(runs):
    """Same reports (training and held-out) and parameters after 20 steps at TP = 2, to fp32
    round-off compounded over 20 Adam steps; no logits were held by the fused run."""
    full, fused = runs["full"], runs["fused"]
    for a, b in zip(full.steps, fused.steps):
        assert a.real_tokens == b.real_tokens
        for key, value in a.reports.items():
            assert abs(b.reports[key] - value) <= 1e-4 * max(1.0, abs(value)), (a.step, key, value, b.reports[key])
    for key, value in full.evals[-1]["losses"].items():
        assert abs(fused.evals[-1]["losses"][key] - value) <= 1e-4 * max(1.0, abs(value)), key
    for rank in range(2):
        model_a, _ = checkpoint_params(runs["full_dir"], 20, rank)
        model_b, _ = checkpoint_params(runs["fused_dir"], 20, rank)
        for key, value in model_a.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert float((value - model_b[key]).abs().max()) <= 1e-4 * max(1.0, float(value.abs().max())), key


@pytest.mark.distributed
def test_resume_checks_the_checkpoint_before_spawning(runs, data_dir):
    # resuming through the launcher reports the step it continues from
    assert plan_run(runs["configs"][2]).resume_step == 20
    # a checkpoint from another config is refused before any rank starts
    changed = TrainConfig.from_dict(
        config_dict(data_dir, save_dir=str(runs["part_dir"]), resume=True, **{"optimizer.lr": 1e-3})
    )
    with pytest.raises(ConfigError, match="optimizer.lr: checkpoint 0.003, config 0.001"):
        plan_run(changed)


def test_config_errors_before_any_work(data_dir, tmp_path):
    # unknown keys, top-level and in sections, named with a hint
    with pytest.raises(ConfigError, match="'stpes' \\(did you mean 'steps'\\?\\)"):
        TrainConfig.from_dict({**config_dict(data_dir), "stpes": 3})
    with pytest.raises(ConfigError, match="data: unknown key\\(s\\) 'seq_len'"):
        TrainConfig.from_dict(config_dict(data_dir, **{"data.seq_len": 3}))
    with pytest.raises(ConfigError, match="model: unknown key\\(s\\) 'hidden'"):
        TrainConfig.from_dict(config_dict(data_dir, **{"model.hidden": 3}))
    with pytest.raises(ConfigError, match="vocab_size comes from the prepared data"):
        TrainConfig.from_dict(config_dict(data_dir, **{"model.vocab_size": 300}))
    # TP must divide the heads and the padded vocabulary (checked against the data's vocabulary)
    with pytest.raises(ConfigError, match="must divide model.num_attention_heads=4"):
        plan_run(TrainConfig.from_dict(config_dict(data_dir, tensor_parallel_size=3)))
    with pytest.raises(ConfigError, match="padded vocabulary 263"):
        plan_run(TrainConfig.from_dict(config_dict(
            data_dir, **{"model.pad_vocab_to_multiple_of": 263, "model.num_attention_heads": 2,
                         "model.hidden_size": 32})))
    # every sample longer than the rows under overlong=drop
    with pytest.raises(ConfigError, match="overlong=drop drops them all"):
        plan_run(TrainConfig.from_dict(config_dict(data_dir, **{"data.seq_length": 8, "data.overlong": "drop"})))
    # a missing prefix
    with pytest.raises(ConfigError, match="nothere.*tokweight prepare"):
        plan_run(TrainConfig.from_dict(config_dict(data_dir, **{"data.prefixes": [str(tmp_path / "nothere")]})))
    # several prefixes need blend weights
    with pytest.raises(ConfigError, match="data.weights is required"):
        TrainConfig.from_dict(config_dict(data_dir, **{"data.prefixes": [str(data_dir / "train")] * 2}))


def test_cli_yaml_overrides_and_error_exit(data_dir, tmp_path, capsys):
    from megatron_tokweight.cli import main
    from megatron_tokweight.cli.train import config_from_args

    path = tmp_path / "run.yaml"
    raw = config_dict(data_dir)
    raw["data"]["prefixes"] = [os.path.relpath(data_dir / "train", tmp_path)]  # relative to the file
    path.write_text(yaml.safe_dump(raw))
    parser_args = ["train", "--config", str(path), "--set", "optimizer.lr=0.01", "--steps", "7", "--tp", "1",
                   "--set", "weighting.preset=uniform"]
    from megatron_tokweight.cli import build_parser

    args = build_parser("train").parse_args(parser_args)
    with pytest.raises(ConfigError, match="weighting.preset"):
        config_from_args(args)  # weighting is a preset string: a field cannot be set inside it
    args = build_parser("train").parse_args(parser_args[:-2] + ["--set", "weighting=uniform"])
    config = config_from_args(args)
    assert config.optimizer.lr == 0.01 and config.steps == 7 and config.tensor_parallel_size == 1
    assert config.weighting.normalization == "token_count"
    assert config.data.prefixes == [str(data_dir / "train")]

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw, "optimiser": {"lr": 1}}))
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) 'optimiser' (did you mean 'optimizer'?)" in err
    assert issubclass(ConfigError, TokweightError)


def test_cli_train_end_to_end(data_dir, tmp_path):
    path = tmp_path / "run.yaml"
    raw = config_dict(data_dir, steps=2, log_interval=1, eval_interval=2)
    raw["data"]["eval_prefixes"] = [str(data_dir / "eval")]
    path.write_text(yaml.safe_dump(raw))
    summary = tmp_path / "summary.json"
    # a fresh process, as a user runs it: the ranks print to its stdout
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_tokweight.cli", "train", "--config", str(path),
         "--tp", "1", "--summary", str(summary)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(summary.read_text())
    assert [s["step"] for s in out["steps"]] == [1, 2] and out["tokens_per_s"] > 0
    assert out["evals"][-1]["step"] == 2
    assert "step     2 | lm loss" in proc.stdout + proc.stderr


def test_blend_task_ids_map_to_the_run_names():
    from megatron_tokweight.trainer.micro_batches import _global_task_ids, dataset_names

    # prefix 0 numbers its tasks (a, b), prefix 1 (b, c): the run's names are (a, b, c)
    tables = [[0, 1], [1, 2]]
    rows = {"task_ids": torch.tensor([[0, 1, -1], [0, 1, 1]]), "dataset_id": torch.tensor([0, 1])}
    _global_task_ids(rows, tables)
    assert rows["task_ids"].tolist() == [[0, 1, -1], [1, 2, 2]]
    one = {"task_ids": torch.tensor([[1, 0, -1]])}
    _global_task_ids(one, [[2, 0]])
    assert one["task_ids"].tolist() == [[0, 2, -1]]
    assert dataset_names(["/a/x", "/b/y"]) == ("x", "y")
    assert dataset_names(["/a/x", "/b/x"]) == ("0:x", "1:x")
