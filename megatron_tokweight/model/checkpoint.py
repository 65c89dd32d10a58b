"""Training checkpoints of the CPU loop: model shard, optimizer, data position and RNG, per rank.

Layout under `save_dir`:

    step_0000050/meta.json        step, consumed rows, world layout, the run's config identity,
                                  and what the weights mean: `vocab_size` (the data's, before
                                  padding), `tokenizer` (the spec the data was prepared with: byte,
                                  or a tokenizer.json path and its sha256) and `model_config` (every
                                  ModelConfig field), so a scorer can check it fits a dataset
                                  `datasets`: the content identity of every prefix read
    step_0000050/rank000.pt       this rank's model state_dict (its TP shard), optimizer state,
                                  torch / numpy / python RNG states
    latest                        the name of the newest complete step directory

A step is written into `step_XXXXXXX.tmp-*` by every rank, then renamed by rank 0 after a
barrier, and `latest` is replaced last: an interrupted save never looks complete.
"""
import json
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from megatron_tokweight.common.files import atomic_file, replace_path
from megatron_tokweight.errors import ConfigError

LATEST = "latest"
META = "meta.json"


LOCK = "tokweight-run.lock"


@contextmanager
def save_dir_lock(save_dir: Optional[str]):
    """Hold `save_dir` for one run: a second run that asks for it while this one lives (its
    launcher, and so its ranks) gets a ConfigError naming the first. The lock is an `flock` on
    SAVE_DIR/tokweight-run.lock, released by the kernel however the holder ends; the file keeps
    the holder's pid, host and start time for the message. None: nothing to hold."""
    if not save_dir:
        yield
        return
    import fcntl
    import socket
    import time

    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(
                f"save_dir {save_dir} is in use by another run ({holder}); wait for it to end, or give "
                "this run its own save_dir"
            ) from None
        record = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def rank_file(rank: int) -> str:
    return f"rank{rank:03d}.pt"


@dataclass(frozen=True)
class CheckpointMeta:
    step: int
    consumed_rows: int
    world_size: int
    identity: Dict[str, Any]  # the config fields a resumed run must repeat exactly
    path: str
    vocab_size: Optional[int] = None  # None: written before these fields were recorded
    tokenizer: Optional[Dict[str, Any]] = None
    model_config: Optional[Dict[str, Any]] = None
    # [{"role", "prefix", "identity"}] of every dataset the run read (`data.content_identity`)
    datasets: Optional[List[Dict[str, str]]] = None


# the fields `model_info` records next to the identity
MODEL_FIELDS = ("vocab_size", "tokenizer", "model_config")
# every optional field of meta.json (absent in checkpoints written before it was recorded)
RECORDED_FIELDS = MODEL_FIELDS + ("datasets",)


def model_info(vocab_size: int, tokenizer: Optional[Dict[str, Any]], model_config) -> Dict[str, Any]:
    """What `save` records about the model: the data's vocabulary size, its tokenizer spec and the
    full model config (a `ModelConfig` or its dict)."""
    from dataclasses import asdict, is_dataclass

    config = asdict(model_config) if is_dataclass(model_config) else dict(model_config)
    return {"vocab_size": int(vocab_size), "tokenizer": None if tokenizer is None else dict(tokenizer),
            "model_config": json.loads(json.dumps(config))}


def rng_state() -> Dict[str, Any]:
    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(save_dir: str, step: int, consumed_rows: int, identity: Dict[str, Any], model, optimizer,
         rank: int, world_size: int, group=None, model_info: Optional[Dict[str, Any]] = None,
         datasets: Optional[List[Dict[str, str]]] = None) -> str:
    """Every rank calls this (collective over `group`, default the world); returns the step dir.

    model_info: `model_info(...)`'s fields for meta.json (recommended: scorers check them);
    datasets: [{"role", "prefix", "identity"}] of the data the run reads (a resume checks them)."""
    import torch
    import torch.distributed as dist

    final = os.path.join(save_dir, step_dir_name(step))
    tmp = f"{final}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier(group=group)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "step": step,
        "rank": rank,
    }
    torch.save(state, os.path.join(tmp, rank_file(rank)))
    dist.barrier(group=group)
    if rank == 0:
        meta = {"step": step, "consumed_rows": consumed_rows, "world_size": world_size,
                "identity": identity, **(model_info or {}),
                **({"datasets": datasets} if datasets is not None else {})}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        replace_path(tmp, final)
        with atomic_file(os.path.join(save_dir, LATEST), "w") as f:
            f.write(step_dir_name(step) + "\n")
    dist.barrier(group=group)
    return final


def find_latest(save_dir: str) -> Optional[CheckpointMeta]:
    """The newest complete checkpoint under `save_dir`, or None when there is none."""
    latest = os.path.join(save_dir, LATEST)
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        name = f.read().strip()
    path = os.path.join(save_dir, name)
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{latest} names {name}, but {meta_path} does not exist; the checkpoint is incomplete")
    return read_meta(path)


def read_meta(step_dir: str) -> CheckpointMeta:
    """The `meta.json` of one step directory."""
    meta_path = os.path.join(step_dir, META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        return CheckpointMeta(meta["step"], meta["consumed_rows"], meta["world_size"], meta["identity"], step_dir,
                              **{key: meta.get(key) for key in RECORDED_FIELDS})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{meta_path}: not a readable checkpoint meta.json ({err!r})") from None


def identity_differences(saved: Dict[str, Any], current: Dict[str, Any], prefix: str = "") -> list:
    """Dotted keys whose values differ between two nested identity dicts, with both values."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(identity_differences(a, b, name + "."))
        elif a != b:
            diffs.append(f"{name}: checkpoint {a!r}, config {b!r}")
    return diffs


def dataset_differences(saved: Optional[List[Dict[str, str]]], current: Optional[List[Dict[str, str]]]) -> list:
    """One line per dataset whose content differs from what the checkpoint recorded."""
    if saved is None or current is None:
        return []  # a checkpoint from before datasets were recorded: nothing to compare
    recorded = {entry["role"]: entry for entry in saved}
    diffs = []
    for entry in current:
        old = recorded.get(entry["role"])
        if old is not None and old["identity"] != entry["identity"]:
            diffs.append(f"{entry['role']} {entry['prefix']} holds other data than the run trained on (content "
                         f"identity {old['identity'][:12]}... in the checkpoint, {entry['identity'][:12]}... now: "
                         "prepared again or replaced)")
    return diffs


def check_compatible(meta: CheckpointMeta, identity: Dict[str, Any], world_size: int,
                     datasets: Optional[List[Dict[str, str]]] = None) -> None:
    """ConfigError unless the checkpoint was written by a run of the same config and world, on
    datasets of the same content (`datasets`: as `save` records them)."""
    diffs = identity_differences(meta.identity, identity) + dataset_differences(meta.datasets, datasets)
    if meta.world_size != world_size:
        diffs.append(f"world size: checkpoint {meta.world_size}, config {world_size}")
    if diffs:
        raise ConfigError(
            f"cannot resume from {meta.path}: it was written with a different configuration ("
            + "; ".join(diffs)
            + "). Resume with the same config and data, or point save_dir to a new directory"
        )


def load(meta: CheckpointMeta, model, optimizer, rank: int) -> None:
    """Restore this rank's model shard, optimizer state and RNG states."""
    import torch

    path = os.path.join(meta.path, rank_file(rank))
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is missing: the checkpoint has no state for rank {rank}")
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
