"""Spawning gloo (CPU) or NCCL ranks for tests, benchmarks and the demo.

`spawn(fn, world_size, *args)` runs `fn(rank, world_size, *args)` in `world_size` fresh
processes with torch.distributed initialised, and returns the list of per-rank return values
(they must be picklable). An exception on any rank is re-raised here with that rank's traceback.
Ranks fork from a forkserver started on the first call, so they write to the stdout/stderr
this process had at that first call.
"""
import os
import socket
import tempfile
import traceback
from typing import Any, Callable, List

_PRELOAD = ["megatron_tokweight.trainer._rank_preload"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, fn, world_size, port, backend, result_dir, args):
    import torch
    import torch.distributed as dist

    from megatron_tokweight.common.expected_warnings import (
        silence_expected_megatron_warnings,
    )

    silence_expected_megatron_warnings()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # one intra-op thread per rank: ranks share the machine's cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
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
                args=(fn, world_size, free_port(), backend, result_dir, args),
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
