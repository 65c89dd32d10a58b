import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """GSM8K from ../shared; tests that need real data skip with a clear message without it."""
    if not (GSM8K_DIR / "train.jsonl").is_file():
        pytest.skip(f"real-data test: {GSM8K_DIR}/train.jsonl not found (../shared is absent)")
    return GSM8K_DIR
