"""`SampleMetadataBuilder`: a sidecar collected one sample at a time while `prepare` streams."""
from __future__ import annotations

from array import array
from typing import Dict, Hashable, Optional, Sequence, Tuple

import numpy as np

from megatron_tokweight.data.sidecar import ANSWER_KIND, SampleMetadata


class SampleMetadataBuilder:
    """Collects the sidecar one sample at a time (typed buffers, no per-sample Python objects)."""

    def __init__(self):
        self._lengths = array("i")
        self._task_id = array("i")
        self._group_id = array("q")
        self._n_answer = array("i")
        self._span_offsets = array("q", [0])
        self._spans = array("i")
        self._span_kind = array("h")
        self._task_ids: Dict[str, int] = {}
        self._kind_ids: Dict[str, int] = {ANSWER_KIND: 0}
        self._group_ids: Dict[Hashable, int] = {}
        self._next_group = 0

    def task_id(self, task: str) -> int:
        return self._task_ids.setdefault(task, len(self._task_ids))

    def add(self, length: int, task: str, group: Optional[Hashable], spans: Sequence[Tuple[int, int, str]]) -> int:
        """Record one sample; `group` None gives it a group of its own. Returns its n (targets)."""
        if group is None:
            gid = self._next_group
            self._next_group += 1
        else:
            gid = self._group_ids.get(group)
            if gid is None:
                gid = self._group_ids[group] = self._next_group
                self._next_group += 1
        n = 0
        for start, end, kind in spans:
            self._spans.extend((start, end))
            self._span_kind.append(self._kind_ids.setdefault(kind, len(self._kind_ids)))
            n += max(end - max(start, 1), 0)
        self._lengths.append(length)
        self._task_id.append(self.task_id(task))
        self._group_id.append(gid)
        self._n_answer.append(n)
        self._span_offsets.append(len(self._span_kind))
        return n

    def build(self, tokenizer: dict, token_dtype: str, source=None, counts=None) -> SampleMetadata:
        def arr(buf, dtype):
            # the typecodes 'i', 'q', 'h' are numpy's names for the same C types; astype copies
            return np.frombuffer(buf, dtype=np.dtype(buf.typecode)).astype(dtype)

        return SampleMetadata(
            lengths=arr(self._lengths, np.int32),
            task_id=arr(self._task_id, np.int32),
            group_id=arr(self._group_id, np.int64),
            n_answer=arr(self._n_answer, np.int32),
            span_offsets=arr(self._span_offsets, np.int64),
            spans=arr(self._spans, np.int32).reshape(-1, 2),
            span_kind=arr(self._span_kind, np.int16),
            task_names=list(self._task_ids),
            span_kinds=list(self._kind_ids),
            tokenizer=tokenizer,
            token_dtype=token_dtype,
            source=source,
            counts=dict(counts or {}),
        )
