"""pack_lengths and the C++ packers against plain-Python references (the oracle lives here)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_tokweight.data import _packing
from megatron_tokweight.data.packing import (
    ALGORITHMS,
    OVERLONG_POLICIES,
    PackResult,
    pack_lengths,
)
from megatron_tokweight.errors import ConfigError, DataFormatError

# ---------------------------------------------------------------- plain-Python references


def decreasing(lengths):
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def reference_bfd(lengths, capacity):
    """O(N * bins): the open bin with the least room that fits; on ties, the one that took its
    last item longest ago."""
    fill, last, placed = [], [], [None] * len(lengths)
    for step, i in enumerate(decreasing(lengths)):
        fitting = [b for b in range(len(fill)) if capacity - fill[b] >= lengths[i]]
        if fitting:
            b = min(fitting, key=lambda b: (capacity - fill[b], last[b]))
        else:
            b = len(fill)
            fill.append(0)
            last.append(None)
        placed[i] = (b, fill[b])
        fill[b] += lengths[i]
        last[b] = step
    return placed, fill


def reference_ffd(lengths, capacity):
    fill, placed = [], [None] * len(lengths)
    for i in decreasing(lengths):
        b = next((b for b in range(len(fill)) if capacity - fill[b] >= lengths[i]), len(fill))
        if b == len(fill):
            fill.append(0)
        placed[i] = (b, fill[b])
        fill[b] += lengths[i]
    return placed, fill


def reference_next_fit(lengths, capacity):
    fill, placed = [], [None] * len(lengths)
    for i, n in enumerate(lengths):
        if not fill or capacity - fill[-1] < n:
            fill.append(0)
        placed[i] = (len(fill) - 1, fill[-1])
        fill[-1] += n
    return placed, fill


# every integer dtype numpy has: each takes the one int32 packer (issue 12: int64 was 6x slower)
INT_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
REFERENCES = {"bfd": reference_bfd, "ffd": reference_ffd, "next-fit": reference_next_fit}
CPP = {"bfd": "best_fit_decreasing", "ffd": "first_fit_decreasing", "next-fit": "next_fit"}


def reference_pieces(lengths, seq_length, overlong):
    """(sample, start, length) per piece in sample order, plus the expected counts."""
    pieces = []
    counts = dict(truncated=0, split=0, dropped=0, empty=0, truncated_tokens=0, dropped_tokens=0)
    for s, n in enumerate(lengths):
        if n == 0:
            counts["empty"] += 1
        elif n <= seq_length:
            pieces.append((s, 0, n))
        elif overlong == "truncate":
            counts["truncated"] += 1
            counts["truncated_tokens"] += n - seq_length
            pieces.append((s, 0, seq_length))
        elif overlong == "drop":
            counts["dropped"] += 1
            counts["dropped_tokens"] += n
        else:
            counts["split"] += 1
            for start in range(0, n, seq_length):
                pieces.append((s, start, min(seq_length, n - start)))
    return pieces, counts


# ---------------------------------------------------------------- properties


def check_against_reference(lengths, seq_length, algorithm, overlong):
    result = pack_lengths(lengths, seq_length, algorithm=algorithm, overlong=overlong)
    lengths = [int(n) for n in lengths]
    pieces, counts = reference_pieces(lengths, seq_length, overlong)
    placed, fill = REFERENCES[algorithm]([p[2] for p in pieces], seq_length)

    # Same placement as the reference, piece by piece, listed in (row, offset) order.
    expected = sorted((b, off, s, start, length) for (s, start, length), (b, off) in zip(pieces, placed))
    got = list(zip(result.piece_row.tolist(), result.piece_offset.tolist(), result.piece_sample.tolist(),
                   result.piece_start.tolist(), result.piece_length.tolist()))
    assert got == expected
    assert result.num_rows == len(fill)
    assert result.row_fill.tolist() == fill
    for name, value in counts.items():
        assert getattr(result, name) == value, name

    # Every sample: placed with pieces covering it exactly once, or reported dropped / empty.
    n_samples = len(lengths)
    assert result.row.shape == result.offset.shape == (n_samples,)
    for s, n in enumerate(lengths):
        mine = sorted((start, length) for (_, _, sample, start, length) in got if sample == s)
        if n == 0 or (n > seq_length and overlong == "drop"):
            assert mine == [] and result.row[s] == -1 and result.offset[s] == -1
            continue
        kept = min(n, seq_length) if overlong == "truncate" else n
        covered = 0
        for start, length in mine:
            assert start == covered and length >= 1
            covered += length
        assert covered == kept
        first = next(g for g in got if g[2] == s and g[3] == 0)
        assert (result.row[s], result.offset[s]) == (first[0], first[1])

    # Rows: contiguous, non-overlapping pieces from offset 0, never over seq_length.
    assert result.row_piece_offsets[0] == 0 and result.row_piece_offsets[-1] == result.num_pieces
    for r in range(result.num_rows):
        cursor = 0
        sl = result.pieces_of_row(r)
        assert (result.piece_row[sl] == r).all()
        for off, length in zip(result.piece_offset[sl], result.piece_length[sl]):
            assert off == cursor
            cursor += int(length)
        assert cursor == result.row_fill[r] <= seq_length
    real = sum(fill)
    assert result.efficiency == (real / (len(fill) * seq_length) if fill else 0.0)
    return result


lengths_arrays = st.integers(1, 40).flatmap(
    lambda seq_length: st.tuples(
        st.just(seq_length),
        st.lists(
            # lengths up to 3 rows long; zeros, exact fits and duplicates are all likely
            st.one_of(st.integers(0, 3 * seq_length), st.sampled_from([0, 1, seq_length, seq_length + 1])),
            max_size=60,
        ),
        st.sampled_from(INT_DTYPES),
    )
)


@settings(max_examples=120, deadline=None)
@given(case=lengths_arrays, algorithm=st.sampled_from(ALGORITHMS), overlong=st.sampled_from(OVERLONG_POLICIES))
def test_pack_lengths_matches_reference(case, algorithm, overlong):
    seq_length, lengths, dtype = case
    check_against_reference(np.array(lengths, dtype=dtype), seq_length, algorithm, overlong)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    seq_length=st.integers(8, 64),
    n=st.integers(20, 120),
    algorithm=st.sampled_from(ALGORITHMS),
    overlong=st.sampled_from(OVERLONG_POLICIES),
    dtype=st.sampled_from(INT_DTYPES[1:4] + INT_DTYPES[5:]),  # 3 x seq_length is past int8 / uint8
)
def test_pack_lengths_matches_reference_on_dense_rows(seed, seq_length, n, algorithm, overlong, dtype):
    # Many short samples per row: the regime where best fit and first fit choose different rows
    # (small hypothesis-drawn lists rarely get there), with some zeros, exact fits and overlong ones.
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq_length // 2 + 1, size=n)
    special = rng.random(n)
    lengths[special < 0.05] = 0
    lengths[(special >= 0.05) & (special < 0.1)] = seq_length
    overlong_mask = (special >= 0.1) & (special < 0.15)
    lengths[overlong_mask] = rng.integers(seq_length + 1, 3 * seq_length, size=int(overlong_mask.sum()))
    check_against_reference(lengths.astype(dtype), seq_length, algorithm, overlong)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    capacity=st.integers(1, 40),
    n=st.integers(0, 100),
    algorithm=st.sampled_from(ALGORITHMS),
)
def test_cpp_packers_match_reference_including_zero_lengths(seed, capacity, n, algorithm):
    # The raw C++ accepts zero lengths (pack_lengths never sends them): they fit any row.
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, capacity // 2 + 1, size=n)
    lengths[rng.random(n) < 0.1] = capacity
    check_cpp_against_reference(lengths.tolist(), capacity, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("capacity", [64, 5000])
def test_cpp_packers_match_reference_on_long_runs(algorithm, capacity):
    # Thousands of items over few distinct lengths: long runs of one length, which the C++ packs a
    # bin at a time (or, for BFD, a queue of equal-room bins at a time); BFD sends the zeros round
    # the fullest rows. capacity 5000 needs three levels in the C++ set of remaining capacities.
    rng = np.random.default_rng(capacity)
    n = 2000
    lengths = np.where(rng.random(n) < 0.3, rng.integers(capacity // 3, capacity + 1, n),
                       rng.integers(1, capacity // 8 + 1, n))
    step = max(1, capacity // 40)
    lengths = np.maximum(lengths // step * step, 1)
    lengths[rng.random(n) < 0.02] = 0
    check_cpp_against_reference(lengths.tolist(), capacity, algorithm)


def check_cpp_against_reference(lengths, capacity, algorithm):
    placed, fill = REFERENCES[algorithm](lengths, capacity)
    out = getattr(_packing, f"{CPP[algorithm]}_int32")(np.array(lengths, dtype=np.int32), capacity)
    assert all(a.dtype == np.int32 for a in out.values())
    assert list(zip(out["bin"].tolist(), out["offset"].tolist())) == placed
    assert out["bin_fill"].tolist() == fill
    by_row = sorted(range(len(lengths)), key=lambda i: placed[i])
    assert out["row_order"].tolist() == by_row
    assert out["row_bin"].tolist() == [placed[i][0] for i in by_row]
    assert out["row_offset"].tolist() == [placed[i][1] for i in by_row]
    assert out["row_length"].tolist() == [lengths[i] for i in by_row]
    per_bin = [sum(1 for b, _ in placed if b == bin_) for bin_ in range(len(fill))]
    assert out["bin_start"].tolist() == np.concatenate(([0], np.cumsum(per_bin, dtype=np.int64))).tolist()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_cpp_packers_huge_capacity_and_many_rows(algorithm):
    # Capacity far above 4 N: the C++ sorts with std::stable_sort instead of a counting sort.
    rng = np.random.default_rng(3)
    fn = getattr(_packing, f"{CPP[algorithm]}_int32")
    lengths = rng.integers(0, 60_000, size=50, dtype=np.int32)
    lengths[::7] = lengths[0]  # ties, to check stability
    out = fn(lengths, 100_000)
    placed, fill = REFERENCES[algorithm](lengths.tolist(), 100_000)
    assert list(zip(out["bin"].tolist(), out["offset"].tolist())) == placed
    assert out["bin_fill"].tolist() == fill
    # More than 1024 rows: FFD's segment tree over rows grows past its first size.
    lengths = np.concatenate([rng.integers(6, 11, size=1500), rng.integers(1, 5, size=1500)]).astype(np.int32)
    out = fn(lengths, 10)
    placed, fill = REFERENCES[algorithm](lengths.tolist(), 10)
    assert len(fill) > 1024
    assert list(zip(out["bin"].tolist(), out["offset"].tolist())) == placed


def test_known_packing_by_hand():
    # L = 10, stable decreasing order 7 (s2), 6 (s3), 4 (s5), 3 (s1), 3 (s4), 2 (s0):
    # 7 -> r0 (3 left), 6 -> r1 (4 left), 4 -> r1 (exact), 3 (s1) -> r0 (exact), 3 (s4) -> r2, 2 -> r2.
    for algorithm in ("bfd", "ffd"):
        result = pack_lengths(np.array([2, 3, 7, 6, 3, 4], dtype=np.int32), 10, algorithm=algorithm)
        assert result.row.tolist() == [2, 0, 0, 1, 2, 1]
        assert result.offset.tolist() == [3, 7, 0, 0, 0, 6]
        assert result.row_fill.tolist() == [10, 10, 5]
    next_fit = pack_lengths([6, 5, 4, 1], 10, algorithm="next-fit")
    assert next_fit.row.tolist() == [0, 1, 1, 1] and next_fit.offset.tolist() == [0, 0, 5, 9]


def test_best_fit_ties_go_to_the_row_idle_longest():
    # L = 10: 7 -> r0 (3 left), 5 -> r1 (5 left), 4 -> r1 (1 left), 2 -> r0 (1 left). Both rows
    # have room 1 for the last sample; r1 took its last sample earlier, so it gets it.
    assert pack_lengths([7, 5, 4, 2, 1], 10, algorithm="bfd").row.tolist() == [0, 1, 1, 0, 1]


def test_best_fit_is_not_first_fit():
    # 7 -> r0 (3 left), 4 -> r1 (6 left), 4 -> r1 (2 left); then 2 fits both rows:
    # best fit takes the tighter r1, first fit the lower r0.
    assert pack_lengths([2, 7, 4, 4], 10, algorithm="bfd").row.tolist() == [1, 0, 1, 1]
    assert pack_lengths([2, 7, 4, 4], 10, algorithm="ffd").row.tolist() == [0, 0, 1, 1]


def test_split_truncate_drop_by_hand():
    lengths = [25, 4, 0, 10]
    split = pack_lengths(lengths, 10, overlong="split")
    # pieces: s0 [0,10) [10,20) [20,25) ; s1 4 ; s3 10. Two exact rows, then 5 + 4 packed together.
    assert split.split == 1 and split.empty == 1 and split.num_rows == 4
    assert sorted(zip(split.piece_sample.tolist(), split.piece_start.tolist(), split.piece_length.tolist())) == [
        (0, 0, 10), (0, 10, 10), (0, 20, 5), (1, 0, 4), (3, 0, 10)]
    assert split.row[2] == -1
    trunc = pack_lengths(lengths, 10, overlong="truncate")
    assert (trunc.truncated, trunc.truncated_tokens, trunc.num_rows) == (1, 15, 3)
    drop = pack_lengths(lengths, 10, overlong="drop")
    assert (drop.dropped, drop.dropped_tokens, drop.row[0], drop.num_rows) == (1, 25, -1, 2)


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("lengths, overlong", [([3, 1, 2], "truncate"), ([3, 0, 9, 2], "split"),
                                               ([3, 0, 9, 2], "drop")])
def test_every_dtype_gives_int32_arrays_and_the_same_packing(dtype, lengths, overlong):
    # One packer for every integer dtype, whether every sample is one piece or some are split,
    # dropped or empty: the same pieces as the int64 input, all in int32.
    result = pack_lengths(np.array(lengths, dtype=dtype), 4, overlong=overlong)
    wide = pack_lengths(np.array(lengths, dtype=np.int64), 4, overlong=overlong)
    for name in RESULT_ARRAYS:
        assert getattr(result, name).dtype == np.int32, name
        assert getattr(result, name).tolist() == getattr(wide, name).tolist(), name


RESULT_ARRAYS = ("row", "offset", "piece_sample", "piece_start", "piece_length", "piece_row",
                 "piece_offset", "row_fill", "row_piece_offsets")


@pytest.mark.parametrize("dtype", [np.int64, np.uint32, np.uint64])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_samples_past_int32_are_cut_exactly(dtype, algorithm):
    # Lengths past 2**31 - 1 (only the wide dtypes hold them) never reach the int32 packer
    # uncut: truncated to seq_length, or split into pieces whose starts pass int32, which makes
    # the whole result int64 (a silent wrap would give negative starts).
    big, seq_length = 3 * 2**30 + 5, 2**24  # 193 pieces; 2**24: the most BFD takes
    lengths = np.array([7, big, 2**30], dtype=dtype)
    truncated = check_against_reference(lengths, seq_length, algorithm, "truncate")
    assert truncated.truncated_tokens == big + 2**30 - 2 * seq_length and truncated.piece_start.dtype == np.int32
    split = pack_lengths(lengths, seq_length, algorithm, "split")
    assert all(getattr(split, name).dtype == np.int64 for name in RESULT_ARRAYS)
    pieces, _ = reference_pieces([int(v) for v in lengths], seq_length, "split")
    got = sorted(zip(split.piece_sample.tolist(), split.piece_start.tolist(), split.piece_length.tolist()))
    assert got == sorted(pieces) and max(split.piece_start.tolist()) == 3 * 2**30


def test_result_type_and_empty_input():
    result = pack_lengths(np.array([3, 1, 2], dtype=np.uint16), 4)
    assert isinstance(result, PackResult) and result.algorithm == "bfd" and result.seq_length == 4
    assert result.summary()["lower_bound_rows"] == 2 and result.num_rows == 2
    empty = pack_lengths(np.zeros(0, dtype=np.int64), 8)
    assert empty.num_rows == 0 and empty.efficiency == 0.0 and empty.num_pieces == 0
    all_empty = pack_lengths([0, 0], 8)
    assert all_empty.empty == 2 and all_empty.num_rows == 0 and all_empty.row.tolist() == [-1, -1]


# ---------------------------------------------------------------- errors


def test_bad_lengths_name_the_sample():
    with pytest.raises(DataFormatError, match="sample 2: length -1 is negative"):
        pack_lengths(np.array([1, 2, -1, -5], dtype=np.int32), 8)
    with pytest.raises(DataFormatError, match="integer dtype"):
        pack_lengths(np.array([1.0, 2.0]), 8)
    with pytest.raises(DataFormatError, match="integer dtype"):
        pack_lengths(np.array([True, False]), 8)
    with pytest.raises(DataFormatError, match="1-D"):
        pack_lengths(np.ones((2, 2), dtype=np.int32), 8)
    with pytest.raises(DataFormatError, match="sample 1: length .* does not fit in int64"):
        pack_lengths(np.array([1, 2**63], dtype=np.uint64), 8)


@pytest.mark.parametrize("dtype", [d for d in INT_DTYPES if np.issubdtype(d, np.signedinteger)])
def test_negative_lengths_are_refused_in_every_signed_dtype(dtype):
    # Before the cast to the int32 packer, whatever the width: -1 must never wrap into a length.
    lengths = np.array([1, 2, 3, -1, 5], dtype=dtype)
    with pytest.raises(DataFormatError, match="sample 3: length -1 is negative"):
        pack_lengths(lengths, 8)


@pytest.mark.parametrize("seq_length", [0, -3, 2.5, True, 2**31])
def test_bad_seq_length(seq_length):
    with pytest.raises(ConfigError, match="seq_length"):
        pack_lengths([1, 2], seq_length)


def test_bad_algorithm_and_policy():
    with pytest.raises(ConfigError, match="algorithm"):
        pack_lengths([1], 4, algorithm="worst-fit")
    with pytest.raises(ConfigError, match="overlong"):
        pack_lengths([1], 4, overlong="wrap")
    with pytest.raises(ConfigError, match="use algorithm='ffd'"):
        pack_lengths([1], 2**24 + 1, algorithm="bfd")


@pytest.mark.parametrize("stem", sorted(CPP.values()))
def test_cpp_bounds_checks(stem):
    dtype = "int32"
    fn = getattr(_packing, f"{stem}_{dtype}")
    with pytest.raises(ValueError, match="sample 1: length -2 is negative"):
        fn(np.array([1, -2], dtype=dtype), 8)
    with pytest.raises(ValueError, match="sample 2: length 9 exceeds the row capacity 8"):
        fn(np.array([1, 8, 9], dtype=dtype), 8)
    with pytest.raises(ValueError, match="capacity"):
        fn(np.array([1], dtype=dtype), 0)
    with pytest.raises(ValueError, match="1-D"):
        fn(np.ones((2, 2), dtype=dtype), 8)
    with pytest.raises(TypeError):  # never silently converted
        fn(np.array([1, 2], dtype=np.int64), 8)
    assert not hasattr(_packing, f"{stem}_int64")  # one packer: pack_lengths casts after its checks


def test_split_refuses_more_pieces_than_memory_holds():
    """The audit's case: one sample of 2**31 - 1 tokens split into rows of 1 allocated until the
    kernel killed the process (23 GB). The pieces are predicted and refused, with the numbers."""
    with pytest.raises(DataFormatError, match=r"2,147,483,647 pieces, about 192\.0 GiB .* GiB available"):
        pack_lengths(np.array([2**31 - 1], np.int64), 1, "ffd", "split")
    with pytest.raises(DataFormatError, match="pieces"):  # past the int32 piece ids, whatever the memory
        pack_lengths(np.array([2**40, 2**40], np.int64), 256, "next-fit", "split")
    # what fits is packed as before
    assert pack_lengths(np.array([10**6], np.int64), 1000, "next-fit", "split").num_rows == 1000
