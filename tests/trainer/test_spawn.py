import pytest
import torch
import torch.distributed as dist

from megatron_tokweight.trainer.spawn import spawn


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


@pytest.mark.distributed
def test_spawn_returns_each_rank_result_and_reports_failures():
    assert spawn(_allreduce_rank, 2) == [1.0, 1.0]
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 of 2 failed:.*boom on rank 1"):
        spawn(_fail_on_rank_one, 2)
