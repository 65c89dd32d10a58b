"""JSONL lines encoded in chunks, in this process or in N worker processes, delivered in file order.

`tokweight prepare --workers N`: the main process reads raw lines and cuts them into chunks of
about `chunk_bytes`; workers (forked, so the tokenizer and chat template loaded once in the main
process are inherited, not pickled) parse and encode a chunk each and return its tokens as one
array; the main process takes the chunks back in submission order and appends them to the one
`.bin`/`.idx` and sidecar it writes (an ordered merge: the output equals one worker's byte for
byte). At most 2 x N chunks are in flight, so memory stays flat whatever the corpus size.
A worker that raises (a bad line) raises the same error in the main process, in file order; a
worker that dies (killed, out of memory) is a `TokweightError` naming the lines it held. Either
way `prepare` writes nothing (its outputs appear only at the end, atomically).
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain
from typing import Hashable, Iterator, List, Optional, Tuple

import numpy as np

from megatron_tokweight.data.jsonl_shapes import JsonlFields, JsonlReader, encode_record, parse_line
from megatron_tokweight.errors import ConfigError, TokweightError

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class EncodeJob:
    """Everything encoding a line needs; workers inherit it."""

    path: str
    tokenizer: object
    fields: JsonlFields
    template: object = None
    drop_non_text_parts: bool = False
    dtype: type = np.int32


@dataclass
class EncodedChunk:
    """The samples of consecutive lines: all tokens in one array, per-sample metadata in lists."""

    tokens: np.ndarray
    lengths: List[int]
    tasks: List[str]
    groups: List[Optional[Hashable]]
    spans: List[List[Tuple[int, int, str]]]
    dropped_parts: int
    input_bytes: int

    def samples(self):
        """(tokens, task, group, spans) per sample, in line order."""
        start = 0
        for length, task, group, spans in zip(self.lengths, self.tasks, self.groups, self.spans):
            yield self.tokens[start:start + length], task, group, spans
            start += length


def encode_chunk(job: EncodeJob, lines: List[Tuple[int, bytes]]) -> EncodedChunk:
    samples = [encode_record(parse_line(job.path, n, raw), job.tokenizer, job.fields, job.path, n,
                             job.template, job.drop_non_text_parts) for n, raw in lines]
    tokens = np.fromiter(chain.from_iterable(s.tokens for s in samples), dtype=job.dtype)
    return EncodedChunk(
        tokens=tokens,
        lengths=[len(s.tokens) for s in samples],
        tasks=[s.task for s in samples],
        groups=[s.group for s in samples],
        spans=[s.spans for s in samples],
        dropped_parts=sum(s.dropped_parts for s in samples),
        input_bytes=sum(len(raw) for _, raw in lines),
    )


def _chunks(reader: JsonlReader, chunk_bytes: int) -> Iterator[List[Tuple[int, bytes]]]:
    chunk, size = [], 0
    for line_no, raw in reader.raw_lines():
        chunk.append((line_no, raw))
        size += len(raw)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_JOB: Optional[EncodeJob] = None  # a worker's job, set once by its initializer


def _init_worker(job: EncodeJob) -> None:
    global _JOB
    _JOB = job


def _encode_in_worker(lines: List[Tuple[int, bytes]]) -> EncodedChunk:
    return encode_chunk(_JOB, lines)


def encoded_chunks(reader: JsonlReader, job: EncodeJob, workers: int = 1,
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator[EncodedChunk]:
    """The file's chunks, encoded, in file order (see the module docstring)."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if workers == 1:
        for lines in _chunks(reader, chunk_bytes):
            yield encode_chunk(job, lines)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init_worker, initargs=(job,))
    pending: deque = deque()
    try:
        source = _chunks(reader, chunk_bytes)
        for lines in source:
            pending.append((lines[0][0], lines[-1][0], pool.submit(_encode_in_worker, lines)))
            if len(pending) >= 2 * workers:
                yield _result(job, *pending.popleft())
        while pending:
            yield _result(job, *pending.popleft())
    finally:
        for _, _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _result(job: EncodeJob, first: int, last: int, future) -> EncodedChunk:
    try:
        return future.result()
    except BrokenProcessPool as err:
        raise TokweightError(
            f"{job.path}: a prepare worker process died (killed or crashed, e.g. out of memory) while "
            f"encoding lines {first}-{last}; nothing was written. Run again, with fewer --workers if "
            "memory is short"
        ) from err
