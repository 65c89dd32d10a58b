from pathlib import Path

import pytest
from jsonl_files import write_jsonl

from megatron_tokweight.common.cpu_math import settle_vector_math

settle_vector_math()  # before any test's first multi-threaded exp (the module says why)

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """GSM8K from ../shared; tests that need real data skip with a clear message without it."""
    if not (GSM8K_DIR / "train.jsonl").is_file():
        pytest.skip(f"real-data test: {GSM8K_DIR}/train.jsonl not found (../shared is absent)")
    return GSM8K_DIR


@pytest.fixture(scope="module")
def rank_group(tmp_path_factory):
    """A one-rank gloo world for the requesting module (Megatron's model needs process groups)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.new_group([dist.get_rank()])
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def prepared_prefix():
    """Factory: `prepared_prefix(directory, name, records, **prepare_kwargs)` writes the records
    as DIRECTORY/NAME.jsonl, runs `tokweight prepare` into DIRECTORY/NAME and returns that prefix."""
    from megatron_tokweight.data.prepare import prepare_jsonl

    def make(directory, name, records, **prepare_kwargs) -> str:
        prefix = Path(directory) / name
        prepare_jsonl(write_jsonl(Path(directory) / f"{name}.jsonl", records), prefix, **prepare_kwargs)
        return str(prefix)

    return make
