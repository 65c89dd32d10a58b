"""Faults around a training run: a killed launcher, two runs on one save_dir, resuming on data
that changed, data with nothing to train, steps without loss tokens, numbers in --set."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from megatron_tokweight.errors import ConfigError
from megatron_tokweight.trainer.config import TrainConfig
from megatron_tokweight.trainer.plan import plan_run


def corpus_records(count, seed):
    """Prompt/response records of varied lengths (two tasks)."""
    import random

    rng = random.Random(seed)
    return [{"prompt": "".join(rng.choice("abcdef ") for _ in range(rng.randint(3, 30))),
             "response": "".join(rng.choice("ghijk ") for _ in range(rng.randint(1, 40))),
             "task": ("qa", "caption")[i % 2]} for i in range(count)]


def config_dict(prefix, save_dir=None, **top):
    return {"data": {"prefixes": [str(prefix)], "seq_length": 128},
            "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2},
            "steps": 3, "num_micro_batches": 2, "seed": 3, "log_interval": 1,
            **({"save_dir": str(save_dir)} if save_dir else {}), **top}


def session_members(session: int):
    """Live processes of a session (a launcher started with start_new_session leads its own)."""
    members = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(pid))
    return members


@pytest.fixture(scope="module")
def running(tmp_path_factory, prepared_prefix):
    """A `tokweight train` launcher (TP = 2) in its own session, past its first step, with a
    long run ahead; killed with all it leaves at the end of the module."""
    root = tmp_path_factory.mktemp("running")
    prefix = prepared_prefix(root, "train", corpus_records(200, 0))
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(config_dict(prefix, root / "save", steps=100000, save_interval=5,
                                                 tensor_parallel_size=2)))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_tokweight.cli", "train", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step"):
            break
    assert proc.poll() is None, "".join(seen[-20:])
    yield proc, config, root / "save"
    for pid in session_members(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.distributed
def test_a_second_run_refuses_a_save_dir_in_use(running, capsys):
    from megatron_tokweight.cli import main

    proc, config, save_dir = running
    assert main(["train", "--config", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"save_dir {save_dir} is in use by another run (pid {proc.pid} on " in err, err


@pytest.mark.distributed
def test_ranks_die_with_their_launcher(running):
    proc, _, save_dir = running
    ranks = [pid for pid in session_members(proc.pid) if pid != proc.pid]
    assert len(ranks) >= 2  # the two TP ranks (and the forkserver)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while session_members(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert session_members(proc.pid) == []
    # nothing writes the save_dir any more: its checkpoints stay as they are
    before = sorted(os.listdir(save_dir))
    time.sleep(2)
    assert sorted(os.listdir(save_dir)) == before


def test_resume_refuses_data_prepared_again(tmp_path, prepared_prefix, rank_group):
    from megatron_tokweight.trainer.loop import train_on_rank
    from megatron_tokweight.trainer.micro_batches import make_groups

    prefix = prepared_prefix(tmp_path, "train", corpus_records(120, 1))
    save = tmp_path / "save"
    plan = plan_run(TrainConfig.from_dict(config_dict(prefix, save, steps=4, exit_interval=2)))
    train_on_rank(plan, 0, make_groups(0, 1, 1))
    resume = TrainConfig.from_dict(config_dict(prefix, save, steps=4, resume=True))
    assert plan_run(resume).resume_step == 2  # the same data resumes
    # the same path, prepared again from other lines (fewer, shuffled): refused, naming the prefix
    records = corpus_records(120, 1)[:90]
    records.reverse()
    prepared_prefix(tmp_path, "train", records)
    with pytest.raises(ConfigError, match=rf"data.prefixes\[0\] {prefix} holds other data than the run trained on"):
        plan_run(resume)


def test_no_target_anywhere_is_refused_before_training(tmp_path, prepared_prefix):
    prefix = prepared_prefix(tmp_path, "prompts", [{"prompt": "q" * (i + 1), "response": ""} for i in range(20)])
    with pytest.raises(ConfigError, match="no sample of .* has a target once packed.*nothing to train on"):
        plan_run(TrainConfig.from_dict(config_dict(prefix)))


def test_a_step_without_loss_tokens_is_named_not_nan():
    from megatron_tokweight.trainer.loop import RunResult, StepRecord, format_step

    record = StepRecord(step=4, lr=1e-3, grad_norm=0.0, seconds=0.5, real_tokens=100,
                        reports={"lm loss": math.nan, "weighted loss": math.nan})
    line = format_step(record, ["qa"])
    assert "nan" not in line and "no loss tokens in this step's rows" in line
    assert RunResult(steps=[record]).steps_without_targets == 1


def test_numbers_with_exponents_are_numbers(tmp_path, prepared_prefix):
    from megatron_tokweight.cli import build_parser
    from megatron_tokweight.cli.train import config_from_args

    prefix = prepared_prefix(tmp_path, "train", corpus_records(10, 2))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_dict(prefix)).replace("steps: 3", "steps: 3\noptimizer: {min_lr: 1e-5}"))
    config = config_from_args(build_parser("train").parse_args(
        ["train", "--config", str(path), "--set", "optimizer.lr=1e-3"]))  # the CLI help's own example
    assert config.optimizer.lr == 1e-3 and config.optimizer.min_lr == 1e-5
