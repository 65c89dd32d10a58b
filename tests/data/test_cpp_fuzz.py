"""Every C++ entry point (csrc/) under random shapes, dtypes and values, extreme integers included.

Each call must give the plain-Python reference's answer when its input is within the contract,
and raise a Python exception when it is not: never a crash, never a silently wrong answer. The
contract of each entry point is written out here as a predicate, independently of the C++.

About 30 s in CI. Before a release, `python benchmarks/fuzz_cpp.py --minutes 10` runs the same
properties with `TOKWEIGHT_FUZZ_SCALE` times more examples each.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_packed_dataset import reference_row
from test_packing import REFERENCES, reference_pieces

from megatron_tokweight.data import _packing, _rows
from megatron_tokweight.data.packing import pack_lengths
from megatron_tokweight.weighting import _counting

SCALE = int(os.environ.get("TOKWEIGHT_FUZZ_SCALE", "1"))
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
# values that have broken integer arithmetic before (or would): type limits and their neighbours
EXTREMES = (0, 1, 2, -1, -2, 2**15 - 1, 2**16 - 1, 2**16, 2**24, 2**24 + 1, INT32_MAX - 1, INT32_MAX, 2**31,
            -(2**31), 2**32, 2**62, INT64_MAX - 3, INT64_MAX - 1, INT64_MAX, -(2**63))
FUZZ = settings(max_examples=500 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))


def ints(small_max=40):
    """Mostly small values, often an extreme one."""
    return st.one_of(st.integers(-3, small_max), st.sampled_from(EXTREMES))


def fits(value, dtype) -> bool:
    info = np.iinfo(dtype)
    return info.min <= value <= info.max


def call(fn, *args):
    """(True, result) or (False, the exception): only Python exceptions are acceptable failures."""
    try:
        return True, fn(*args)
    except (ValueError, TypeError, OverflowError, MemoryError) as err:
        return False, err


# ---- packing (csrc/packing.cpp) ----------------------------------------------------------------

CPP_NAMES = {"bfd": "best_fit_decreasing", "ffd": "first_fit_decreasing", "next-fit": "next_fit"}
MAX_CAPACITY = {"bfd": 2**24, "ffd": INT32_MAX, "next-fit": INT32_MAX}


@FUZZ
@given(lengths=st.lists(ints(), max_size=30), capacity=ints(), algorithm=st.sampled_from(sorted(CPP_NAMES)))
def test_packers(lengths, capacity, algorithm):
    dtype = np.int32  # the one packer: pack_lengths hands every dtype over as int32
    lengths = [v for v in lengths if fits(v, dtype)]
    if capacity > 2**24 and algorithm == "bfd":
        capacity = capacity % 2**25  # past 2**24 only the refusal is checked, and that once is enough
    array = np.array(lengths, dtype=dtype)
    ok, got = call(getattr(_packing, f"{CPP_NAMES[algorithm]}_{np.dtype(dtype).name}"), array, capacity)
    valid = 1 <= capacity <= MAX_CAPACITY[algorithm] and all(0 <= v <= capacity for v in lengths)
    assert ok == valid, (lengths, capacity, got)
    if not valid:
        return
    placed, fill = REFERENCES[algorithm](lengths, capacity)
    assert list(zip(got["bin"].tolist(), got["offset"].tolist())) == [tuple(p) for p in placed]
    assert got["bin_fill"].tolist() == fill


@FUZZ
@given(lengths=st.lists(st.one_of(st.integers(0, 60), st.sampled_from(EXTREMES)), max_size=12),
       seq_length=ints(), algorithm=st.sampled_from(sorted(CPP_NAMES)),
       overlong=st.sampled_from(["truncate", "split", "drop"]),
       dtype=st.sampled_from([np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]))
def test_pack_lengths_front_end(lengths, seq_length, algorithm, overlong, dtype):
    lengths = [v for v in lengths if fits(v, dtype)]
    ok_config = 1 <= seq_length <= (2**24 if algorithm == "bfd" else INT32_MAX)
    pieces = sum(-(-v // seq_length) if v > seq_length else 1 for v in lengths if v > 0) if ok_config else 0
    if overlong == "split" and 2_000 < pieces < 2**34:
        return  # between what the reference can enumerate and what is refused for memory
    ok, got = call(pack_lengths, np.array(lengths, dtype=dtype), seq_length, algorithm, overlong)
    valid = ok_config and all(v >= 0 for v in lengths) and not (overlong == "split" and pieces >= 2**34)
    if not ok:
        assert not valid or isinstance(got, OverflowError), (lengths, seq_length, got)
        return
    assert valid, (lengths, seq_length)
    want, counts = reference_pieces(lengths, seq_length, overlong)
    placed, fill = REFERENCES[algorithm]([p[2] for p in want], seq_length)
    expect = sorted((b, off, s, start, length) for (s, start, length), (b, off) in zip(want, placed))
    assert list(zip(got.piece_row.tolist(), got.piece_offset.tolist(), got.piece_sample.tolist(),
                    got.piece_start.tolist(), got.piece_length.tolist())) == expect
    assert got.row_fill.tolist() == fill
    for name, value in counts.items():
        assert getattr(got, name) == value, name


# ---- counting (csrc/counting.cpp) --------------------------------------------------------------


@FUZZ
@given(ids=st.lists(ints(300), max_size=40), vocab_size=ints(300),
       dtype=st.sampled_from([np.uint16, np.int32, np.int64]))
def test_token_counting(ids, vocab_size, dtype):
    ids = [v for v in ids if fits(v, dtype)]
    ok, got = call(getattr(_counting, f"count_token_ids_{np.dtype(dtype).name}"), np.array(ids, dtype=dtype),
                   vocab_size)
    valid = 1 <= vocab_size <= 2**24
    assert ok == valid, (vocab_size, got)
    if not valid:
        return
    counts, first_bad = got
    bad = [i for i, v in enumerate(ids) if not 0 <= v < vocab_size]
    assert first_bad == (bad[0] if bad else -1)
    kept = ids[: bad[0]] if bad else ids  # counting stops at the first bad id
    assert counts.tolist() == np.bincount(np.array(kept, dtype=np.int64), minlength=vocab_size).tolist()


# ---- the row gather (csrc/rows.cpp) ------------------------------------------------------------


def gather_inputs(seed):
    """A consistent small dataset and its pack index (the reference's home ground)."""
    rng = np.random.default_rng(seed)
    num = int(rng.integers(1, 6))
    lengths = rng.integers(1, 12, num)
    spans, span_offsets, kinds = [], [0], []
    for n in lengths:
        for start in sorted({int(rng.integers(0, n)) for _ in range(int(rng.integers(0, 3)))}):
            spans.append((start, min(int(n), start + int(rng.integers(1, 4)))))
            kinds.append(int(rng.integers(0, 3)))
        span_offsets.append(len(spans))
    seq_length = int(rng.integers(4, 16))
    pointers = np.cumsum(lengths) - lengths
    pieces, row_ptr, cursor = [], [0], 0
    for s, n in enumerate(lengths):  # next-fit of (truncated) samples, one piece each
        length = int(min(n, seq_length))
        if cursor + length > seq_length:
            row_ptr.append(len(pieces))
            cursor = 0
        pieces.append([s, 0, length, len(row_ptr) - 1, cursor])
        cursor += length
    row_ptr.append(len(pieces))
    return dict(
        tokens=rng.integers(0, 1000, int(lengths.sum())).astype(np.int32), pointers=pointers.astype(np.int64),
        lengths=lengths.astype(np.int32), task_id=rng.integers(0, 3, num).astype(np.int32),
        span_offsets=np.array(span_offsets, np.int64), spans=np.array(spans, np.int32).reshape(-1, 2),
        span_kind=np.array(kinds, np.int16), pieces=np.array(pieces, np.int64), row_ptr=np.array(row_ptr, np.int64),
        weights=rng.random(num).astype(np.float32), seq_length=seq_length, pad_id=int(rng.integers(-5, 1000)),
        cp_multiple=1, row=0)


# (field, where) a mutation may overwrite with an extreme or small value
MUTABLE = [("pieces", (0, 0)), ("pieces", (0, 1)), ("pieces", (0, 2)), ("pieces", (0, 3)), ("pieces", (0, 4)),
           ("pieces", (-1, 2)), ("pieces", (-1, 4)), ("row_ptr", 0), ("row_ptr", -1), ("pointers", 0),
           ("pointers", -1), ("span_offsets", 0), ("span_offsets", -1), ("spans", (0, 0)), ("spans", (0, 1)),
           ("lengths", 0), ("seq_length", None), ("cp_multiple", None), ("pad_id", None), ("row", None)]


def row_input_valid(d) -> bool:
    """The gather's contract, written independently of the C++."""
    L, m, pieces, row_ptr = d["seq_length"], d["cp_multiple"], d["pieces"], d["row_ptr"]
    n_samples, n_tokens, n_spans = len(d["pointers"]), len(d["tokens"]), len(d["spans"])
    if not (1 <= L <= 2**24 and 1 <= m <= L and 0 <= d["row"] < len(row_ptr) - 1):
        return False
    p0, p1 = int(row_ptr[d["row"]]), int(row_ptr[d["row"] + 1])
    if not 0 <= p0 <= p1 <= len(pieces):
        return False
    cursor = 0
    for s, start, length, row, offset in pieces[p0:p1].tolist():
        if not 0 <= s < n_samples or row != d["row"] or offset != cursor:
            return False
        n = int(d["lengths"][s])
        if not (start >= 0 and length >= 1 and start + length <= n):
            return False
        padded = -(-length // m) * m
        if padded > L - cursor:
            return False
        if not 0 <= int(d["pointers"][s]) <= n_tokens - start - length:
            return False
        s0, s1 = int(d["span_offsets"][s]), int(d["span_offsets"][s + 1])
        if not 0 <= s0 <= s1 <= n_spans:
            return False
        if any(not 0 <= a <= b <= n for a, b in d["spans"][s0:s1].tolist()):
            return False
        cursor += padded
    return True


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), mutations=st.lists(st.tuples(st.sampled_from(MUTABLE), ints(20)), max_size=2))
def test_row_gather(seed, mutations):
    d = gather_inputs(seed)
    for (name, where), value in mutations:
        if name == "seq_length" and 2**12 < value <= 2**24:
            value = value % 2**12 + 1  # valid but a row of up to 1 GB: kept small here
        if where is None:
            d[name] = value
        elif fits(value, d[name].dtype) and d[name].size:
            d[name] = d[name].copy()
            d[name][where] = value
    ok, builder = call(_rows.RowBuilderInt32, d["tokens"], d["pointers"], d["lengths"], d["task_id"],
                       d["span_offsets"], d["spans"], d["span_kind"], d["pieces"], d["row_ptr"], d["weights"],
                       d["seq_length"], d["pad_id"], d["cp_multiple"])
    if ok:
        ok, got = call(builder.build, d["row"])
    valid = row_input_valid(d) and fits(d["pad_id"], np.int64)
    assert ok == valid, (mutations, got if not ok else "returned a row")
    if not valid:
        return
    want = reference_row(d["tokens"].astype(np.int64), d["pointers"], d["task_id"], d["span_offsets"], d["spans"],
                         d["span_kind"], d["pieces"], d["row_ptr"], d["row"], d["seq_length"], d["pad_id"],
                         d["cp_multiple"], d["weights"])
    ints_block, floats, kinds, bounds, scalars = got
    fields = dict(zip(("tokens", "labels", "position_ids", "sample_ids", "task_ids"), ints_block))
    fields.update(loss_mask=floats[0], loss_weights=floats[1], span_kinds=kinds, cu_seqlens=bounds[0],
                  cu_seqlens_padded=bounds[1], num_segments=scalars[0], max_seqlen=scalars[1], num_samples=scalars[2])
    for name, value in want.items():
        np.testing.assert_array_equal(fields[name], value, err_msg=name)


@pytest.mark.parametrize("cp_multiple", [2**63 - 1, 2**63 - 4, 2**62, 9])
def test_row_gather_refuses_a_cp_multiple_past_the_row(cp_multiple):
    """The overflow the audit found: (len + m - 1) / m * m wrapped for m near 2**63 (a crash, or
    silently wrong rows for 2**63 - 4 .. 2**63 - 1)."""
    d = gather_inputs(0)
    with pytest.raises(ValueError, match="cp_multiple must lie in"):
        _rows.RowBuilderInt32(d["tokens"], d["pointers"], d["lengths"], d["task_id"], d["span_offsets"], d["spans"],
                              d["span_kind"], d["pieces"], d["row_ptr"], d["weights"], 8, 0, cp_multiple)
