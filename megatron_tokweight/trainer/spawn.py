"""Spawning gloo (CPU) or NCCL ranks for tests, benchmarks and the demo.

`spawn(fn, world_size, *args)` runs `fn(rank, world_size, *args)` in `world_size` fresh
processes with torch.distributed initialised, and returns the list of per-rank return values
(they must be picklable). An exception on any rank is re-raised here with that rank's traceback.
Ranks fork from a forkserver started on the first call, so they write to the stdout/stderr
this process had at that first call. Ranks die with their launcher, however it ends (`kill -9`
included): each watches it (`_die_with_launcher`), so no rank trains on, and writes checkpoints,
unwatched.
"""
import os
import socket
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, List

_PRELOAD = ["megatron_tokweight.trainer._rank_preload"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_time(pid: int):
    """The kernel's start time of `pid` (None where /proc is absent): tells a pid reused by
    another process from the one it named."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _die_with_launcher(launcher: int, poll_seconds: float = 0.5) -> None:
    """End this rank when the process that spawned it is gone.

    The forkserver a rank forks from is not the launcher and outlives it while any rank lives (each
    rank holds its keep-alive pipe), so neither the parent's death signal nor the forkserver's
    exit can reach the ranks: a daemon thread polls the launcher instead."""
    started = _start_time(launcher)

    def watch():
        while True:
            time.sleep(poll_seconds)
            try:
                os.kill(launcher, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass  # exists, owned by someone else: only a reused pid; the start time tells
            if _start_time(launcher) != started:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tokweight-launcher-watch").start()


def _entry(rank, fn, world_size, port, backend, result_dir, launcher, args):
    import torch
    import torch.distributed as dist

    from megatron_tokweight.common.cpu_math import settle_vector_math
    from megatron_tokweight.common.expected_warnings import (
        silence_expected_megatron_warnings,
    )

    _die_with_launcher(launcher)
    silence_expected_megatron_warnings()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # one intra-op thread per rank: ranks share the machine's cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    settle_vector_math()
    out_path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "value": result}, out_path)
    except BaseException:  # reported to the parent, which re-raises
        torch.save({"ok": False, "error": traceback.format_exc()}, out_path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args, backend: str = "gloo") -> List[Any]:
    """Run fn(rank, world_size, *args) on `world_size` ranks; return each rank's result."""
    import torch
    import torch.multiprocessing as mp

    # Ranks fork from a server that imported torch and Megatron-Core once: a fresh interpreter
    # per rank would spend seconds re-importing them (most of a small test's cost).
    mp.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory(prefix="tokweight-spawn-") as result_dir:
        try:
            mp.start_processes(
                _entry,
                args=(fn, world_size, free_port(), backend, result_dir, os.getpid(), args),
                nprocs=world_size,
                join=True,
                start_method="forkserver",
            )
        except mp.ProcessRaisedException:
            pass  # the per-rank file below carries the full traceback
        records = {}
        for rank in range(world_size):
            path = os.path.join(result_dir, f"rank{rank}.pt")
            if os.path.exists(path):
                records[rank] = torch.load(path, weights_only=False)
        # a failing rank's traceback first: mp.spawn kills the others, which then leave no result
        for rank, record in sorted(records.items()):
            if not record["ok"]:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{record['error']}")
        missing = sorted(set(range(world_size)) - set(records))
        if missing:
            raise RuntimeError(f"ranks {missing} of {world_size} died without a result")
        return [records[rank]["value"] for rank in range(world_size)]
