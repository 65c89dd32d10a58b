"""Size and rank of an optional process group: None is a group of one (no collective runs).

Megatron-Core's `get_pg_size` / `get_pg_rank` (megatron.core.utils) answer exactly that where the
installed version has them; older versions get the same answer from torch.distributed.
`one_process_group` gives a process that has none a world of its own for a block.
"""
import os
from contextlib import contextmanager


def group_size(group) -> int:
    """Ranks in `group` (1 for None)."""
    if group is None:
        return 1
    try:
        from megatron.core.utils import get_pg_size
    except ImportError:
        import torch.distributed as dist

        return dist.get_world_size(group)
    return get_pg_size(group)


def group_rank(group) -> int:
    """This process's rank in `group` (0 for None)."""
    if group is None:
        return 0
    try:
        from megatron.core.utils import get_pg_rank
    except ImportError:
        import torch.distributed as dist

        return dist.get_rank(group)
    return get_pg_rank(group)


@contextmanager
def one_process_group():
    """A world of this process alone for the block, unless torch.distributed is up already:
    Megatron-Core's `BlendedDataset` asks for the rank when it caches its indices, also in a
    launcher that builds the caches before any rank exists."""
    import tempfile

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="tokweight-pg-") as directory:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(os.path.join(directory, "store"), 1))
        try:
            yield
        finally:
            dist.destroy_process_group()
