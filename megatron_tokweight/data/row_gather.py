"""`RowGather`: the thin front end of the C++ gather (`csrc/rows.cpp`) of a packed row's arrays.

It checks dtypes once and fills one row's arrays (docs/CONTRACTS.md, "A packed row") from the
`.bin` token buffer, the sidecar's spans and the `PackIndex`. Kept free of Megatron imports.
"""
from typing import Dict

import numpy as np

from megatron_tokweight.data.pack_index import PackIndex
from megatron_tokweight.errors import DataFormatError

# token dtype of the .bin -> C++ variant
_VARIANTS = {np.dtype(np.uint16): "RowBuilderUint16", np.dtype(np.int32): "RowBuilderInt32",
             np.dtype(np.int64): "RowBuilderInt64"}

# rows of the int64 block returned by `RowGather.blocks`
INT_FIELDS = ("tokens", "labels", "position_ids", "sample_ids", "task_ids")


class RowGather:
    """Fills packed rows of one dataset (C++; every index bounds-checked).

    The dataset's arrays are checked and bound once; `blocks(row)` / `gather(row)` then build
    one row. `token_buffer` is the whole .bin as a 1-D array and `sample_pointer[i]` the element
    offset of sample i in it. With `sample_weights` (float32 per sample) loss_weights holds the
    sample's weight on its targets, else 1.0 (token factors are applied by the caller).
    """

    def __init__(self, token_buffer, sample_pointer, sample_length, task_id, span_offsets, spans, span_kind,
                 index: PackIndex, seq_length: int, pad_id: int, cp_multiple: int = 1, sample_weights=None):
        from megatron_tokweight.data import _rows

        if not isinstance(token_buffer, np.ndarray) or token_buffer.ndim != 1:
            raise ValueError("token_buffer must be a 1-D numpy array (the .bin tokens)")
        variant = _VARIANTS.get(token_buffer.dtype)
        if variant is None:
            raise DataFormatError(
                f"token dtype {token_buffer.dtype} is not supported; use one of {', '.join(map(str, _VARIANTS))}"
            )
        self.token_buffer = np.ascontiguousarray(token_buffer)
        self.sample_pointer = _exact(sample_pointer, np.int64, "sample_pointer")
        self.index = PackIndex(_exact(index.pieces, np.int64, "pieces"), _exact(index.row_ptr, np.int64, "row_ptr"))
        self.seq_length = int(seq_length)
        weights = (np.zeros(0, np.float32) if sample_weights is None
                   else _exact(sample_weights, np.float32, "sample_weights"))
        self._builder = getattr(_rows, variant)(
            self.token_buffer, self.sample_pointer, _exact(sample_length, np.int32, "sample_length"),
            _exact(task_id, np.int32, "task_id"), _exact(span_offsets, np.int64, "span_offsets"),
            _exact(np.asarray(spans).reshape(-1, 2), np.int32, "spans"), _exact(span_kind, np.int16, "span_kind"),
            self.index.pieces, self.index.row_ptr, weights, self.seq_length, int(pad_id), int(cp_multiple),
        )

    @property
    def num_rows(self) -> int:
        return self._builder.num_rows

    def blocks(self, row: int):
        """Row `row` as five fresh arrays: int64 [5, L] (INT_FIELDS), float32 [2, L] (loss_mask,
        loss_weights), int16 [L] (span kind per target, -1 elsewhere), int32 [2, L + 1]
        (cu_seqlens, cu_seqlens_padded; -1 after the last boundary), int64 [3] (num_segments,
        max_seqlen, num_samples = samples whose first piece is in the row)."""
        return self._builder.build(int(row))

    def gather(self, row: int) -> Dict[str, np.ndarray]:
        """Row `row` as a dict of named numpy arrays (views into `blocks`) and scalars."""
        ints, floats, kinds, bounds, scalars = self.blocks(row)
        out = dict(zip(INT_FIELDS, ints))
        out.update(loss_mask=floats[0], loss_weights=floats[1], span_kinds=kinds,
                   cu_seqlens=bounds[0], cu_seqlens_padded=bounds[1])
        out.update(zip(("num_segments", "max_seqlen", "num_samples"), scalars.tolist()))
        return out


def _exact(array, dtype, name: str) -> np.ndarray:
    """The array itself when it has the dtype and layout (memory maps stay maps); small
    same-kind arrays are converted, anything else is a ValueError naming the array."""
    array = np.asarray(array)
    if array.dtype != np.dtype(dtype):
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise ValueError(f"{name}: expected {np.dtype(dtype)}, got {array.dtype}")
        array = array.astype(dtype)
    return np.ascontiguousarray(array)
