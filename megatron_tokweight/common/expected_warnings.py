"""Warnings Megatron-Core emits on every CPU run that a user cannot act on (regexes matched at
the start of the message).

Optional TE/Apex being absent is the expected CPU setup, and "full scope is deprecated" comes
from a default inside Megatron's own TransformerConfig; the CUDA_DEVICE_MAX_CONNECTIONS hint is
about CUDA streams. Filtered by message, nothing else.
"""
import warnings

EXPECTED_MEGATRON_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
    ".*CUDA_DEVICE_MAX_CONNECTIONS",  # a CUDA stream setting; meaningless on CPU
)


def silence_expected_megatron_warnings() -> None:
    for message in EXPECTED_MEGATRON_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
