"""`settle_vector_math()`: one single-threaded exp before a process's first multi-threaded one.

Why: with torch 2.13's CPU wheel on an AVX-512 Xeon, the first multi-threaded `exp` of a process
sometimes (7 of 120 processes with the other core busy) returns the worker thread's half of the
tensor with relative errors up to 1.5e-4; the main thread's half and every later call are exact.
`log` does the same (7 of 160). A race in the first call's set-up, shared by these functions, not
in this project's math: after one small single-threaded exp it happened in none of 150 processes
for exp, none of 100 for log. Ranks, tests and checking subprocesses call this first so that
loss equality does not depend on that race.
"""


def settle_vector_math() -> None:
    import torch

    torch.exp(torch.zeros(1))
