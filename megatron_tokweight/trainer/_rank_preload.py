"""Imported only by the forkserver of `trainer.spawn`: ranks fork from a process that has
torch and Megatron-Core loaded once, with Megatron's expected CPU warnings filtered first."""
from megatron_tokweight.common.expected_warnings import (
    silence_expected_megatron_warnings,
)

silence_expected_megatron_warnings()

import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.tensor_parallel  # noqa: E402,F401
import torch  # noqa: E402,F401
import torch.distributed  # noqa: E402,F401
