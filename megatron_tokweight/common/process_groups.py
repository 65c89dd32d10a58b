"""Size and rank of an optional process group: None is a group of one (no collective runs).

Megatron-Core's `get_pg_size` / `get_pg_rank` (megatron.core.utils) answer exactly that where the
installed version has them; older versions get the same answer from torch.distributed.
"""


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
