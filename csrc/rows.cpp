// Gather of one packed row's arrays from the .bin token buffer (indexing only).
//
// A RowBuilder binds one dataset's arrays once (token buffer, per-sample pointers, lengths,
// tasks, spans, the pack index, optional per-sample weights); `build(row)` then allocates and
// fills that row's arrays. Binding once matters: converting ~20 numpy arguments per call costs
// more than filling a 4096-token row. Every index followed is checked; bad input raises
// ValueError. The Python front end is megatron_tokweight/data/row_gather.py.
//
// Layout (docs/ARCHITECTURE.md, "A packed row"): pieces sit back to back, each padded to a
// multiple of `cp_multiple` (2 x CP, or 1); the rest of the row is one tail padding segment.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace py = pybind11;

namespace {

// Columns of the pieces table (int64 [P, 5]).
constexpr int kSample = 0, kStart = 1, kLength = 2, kRow = 3, kOffset = 4, kColumns = 5;
// Rows of the int64 output block.
constexpr int kTokens = 0, kLabels = 1, kPositions = 2, kSampleIds = 3, kTaskIds = 4, kIntRows = 5;

constexpr int64_t kMaxSeqLength = int64_t(1) << 24;

[[noreturn]] void fail(const std::string& what) { throw py::value_error("rows: " + what); }

template <typename A>
void check_length(const A& arr, int64_t expected, const char* name) {
    if (arr.ndim() != 1 || arr.shape(0) != expected)
        fail(std::string(name) + " must be 1-D of length " + std::to_string(expected) + ", got shape (" +
             (arr.ndim() ? std::to_string(arr.shape(0)) : std::string()) + (arr.ndim() > 1 ? ", ...)" : ")"));
}

template <typename T>
class RowBuilder {
   public:
    RowBuilder(py::array_t<T, py::array::c_style> token_buffer,
               py::array_t<int64_t, py::array::c_style> sample_pointer,
               py::array_t<int32_t, py::array::c_style> sample_length,
               py::array_t<int32_t, py::array::c_style> task_id,
               py::array_t<int64_t, py::array::c_style> span_offsets,
               py::array_t<int32_t, py::array::c_style> spans,
               py::array_t<int16_t, py::array::c_style> span_kind,
               py::array_t<int64_t, py::array::c_style> pieces,
               py::array_t<int64_t, py::array::c_style> row_ptr,
               py::array_t<float, py::array::c_style> sample_weight,
               int64_t seq_length, int64_t pad_id, int64_t cp_multiple)
        : token_buffer_(token_buffer), sample_pointer_(sample_pointer), sample_length_(sample_length),
          task_id_(task_id), span_offsets_(span_offsets), spans_(spans), span_kind_(span_kind),
          pieces_(pieces), row_ptr_(row_ptr), sample_weight_(sample_weight),
          L_(seq_length), pad_(pad_id), multiple_(cp_multiple) {
        if (token_buffer.ndim() != 1) fail("token_buffer must be 1-D");
        if (sample_pointer.ndim() != 1) fail("sample_pointer must be 1-D");
        num_tokens_ = token_buffer.shape(0);
        num_samples_ = sample_pointer.shape(0);
        check_length(sample_length, num_samples_, "sample_length");
        check_length(task_id, num_samples_, "task_id");
        check_length(span_offsets, num_samples_ + 1, "span_offsets");
        if (spans.ndim() != 2 || spans.shape(1) != 2) fail("spans must have shape [S, 2]");
        num_spans_ = spans.shape(0);
        check_length(span_kind, num_spans_, "span_kind");
        if (pieces.ndim() != 2 || pieces.shape(1) != kColumns) fail("pieces must have shape [P, 5]");
        num_pieces_ = pieces.shape(0);
        if (row_ptr.ndim() != 1 || row_ptr.shape(0) < 1) fail("row_ptr must be 1-D and non-empty");
        num_rows_ = row_ptr.shape(0) - 1;
        if (sample_weight.ndim() != 1 || (sample_weight.shape(0) != 0 && sample_weight.shape(0) != num_samples_))
            fail("sample_weight must be 1-D with one weight per sample, or empty (weight 1)");
        // a row is ~58 bytes per position: past 2^24 tokens one row would take a gigabyte
        if (seq_length < 1 || seq_length > kMaxSeqLength)
            fail("seq_length must lie in [1, " + std::to_string(kMaxSeqLength) + "], got " + std::to_string(seq_length));
        // a piece is padded to a multiple of cp_multiple inside the row: bounding it by the row
        // length keeps every padded length (and offset) below seq_length, free of overflow
        if (cp_multiple < 1 || cp_multiple > seq_length)
            fail("cp_multiple must lie in [1, seq_length = " + std::to_string(seq_length) + "], got " +
                 std::to_string(cp_multiple));
    }

    int64_t num_rows() const { return num_rows_; }

    // (int64 [5, L] tokens/labels/position_ids/sample_ids/task_ids, float32 [2, L]
    //  loss_mask/loss_weights, int16 [L] span kinds, int32 [2, L + 1] cu_seqlens/_padded,
    //  int64 [3] num_segments/max_seqlen/num_samples)
    py::tuple build(int64_t row) const {
        if (row < 0 || row >= num_rows_)
            fail("row " + std::to_string(row) + " out of range [0, " + std::to_string(num_rows_) + ")");
        const int64_t L = L_;
        py::array_t<int64_t> ints({static_cast<int64_t>(kIntRows), L});
        py::array_t<float> floats({static_cast<int64_t>(2), L});
        py::array_t<int16_t> kinds(L);
        py::array_t<int32_t> bounds({static_cast<int64_t>(2), L + 1});
        py::array_t<int64_t> scalars(3);
        int64_t* out_ints = ints.mutable_data();
        float* out_floats = floats.mutable_data();
        int16_t* out_kinds = kinds.mutable_data();
        int32_t* out_bounds = bounds.mutable_data();
        int64_t* out_scalars = scalars.mutable_data();
        {
            py::gil_scoped_release release;  // plain memory work from here on
            fill(row, out_ints, out_floats, out_kinds, out_bounds, out_scalars);
        }
        return py::make_tuple(ints, floats, kinds, bounds, scalars);
    }

   private:
    void fill(int64_t row, int64_t* ints, float* floats, int16_t* kinds_out, int32_t* bounds,
              int64_t* scalars) const {
        const int64_t L = L_, m = multiple_;
        const T* buf = token_buffer_.data();
        const int64_t* ptr = sample_pointer_.data();
        const int32_t* slen = sample_length_.data();
        const int32_t* task = task_id_.data();
        const int64_t* soff = span_offsets_.data();
        const int32_t* sp = spans_.data();
        const int16_t* skind = span_kind_.data();
        const int64_t* pc = pieces_.data();
        const int64_t* rp = row_ptr_.data();
        const float* weight = sample_weight_.shape(0) ? sample_weight_.data() : nullptr;
        int64_t *tok = ints + kTokens * L, *lab = ints + kLabels * L, *pos = ints + kPositions * L;
        int64_t *sid = ints + kSampleIds * L, *tid = ints + kTaskIds * L;
        float *mask = floats, *wts = floats + L;
        int32_t *cu = bounds, *cup = bounds + (L + 1);

        const int64_t p0 = rp[row], p1 = rp[row + 1];
        if (p0 < 0 || p0 > p1 || p1 > num_pieces_)
            fail("row_ptr[" + std::to_string(row) + ":" + std::to_string(row + 2) +
                 "] out of range of the pieces table");

        int64_t cursor = 0;  // physical position in the row
        int64_t actual = 0;  // cumulative actual (unpadded) length
        int64_t segments = 0, max_seqlen = 0, first_pieces = 0;
        cu[0] = 0;
        cup[0] = 0;
        for (int64_t k = p0; k < p1; ++k) {
            const int64_t* piece = pc + k * kColumns;
            const int64_t s = piece[kSample], start = piece[kStart], len = piece[kLength];
            // the message is built only on failure: this loop runs for every row read
            auto where = [&]() { return "piece " + std::to_string(k) + " (sample " + std::to_string(s) + ")"; };
            if (s < 0 || s >= num_samples_) fail(where() + ": sample out of range");
            if (piece[kRow] != row) fail(where() + ": belongs to row " + std::to_string(piece[kRow]));
            if (start < 0 || len < 1 || start > slen[s] || len > slen[s] - start)
                fail(where() + ": start " + std::to_string(start) + ", length " + std::to_string(len) +
                     " outside the sample's " + std::to_string(slen[s]) + " tokens");
            if (piece[kOffset] != cursor)
                fail(where() + ": offset " + std::to_string(piece[kOffset]) +
                     " but the previous piece ends at " + std::to_string(cursor));
            if (len > L - cursor) fail(where() + ": ends past the row length " + std::to_string(L));
            const int64_t padded = len + (m - len % m) % m;  // len <= L and m <= L: no overflow
            if (padded > L - cursor)
                fail(where() + ": padded to a multiple of " + std::to_string(m) +
                     " it ends past the row length " + std::to_string(L));
            if (ptr[s] < 0 || ptr[s] > num_tokens_ - start - len)
                fail(where() + ": tokens outside the token buffer");
            const int64_t s0 = soff[s], s1 = soff[s + 1];
            if (s0 < 0 || s0 > s1 || s1 > num_spans_) fail(where() + ": span offsets out of range");

            const T* src = buf + ptr[s] + start;
            const int64_t task_s = task[s];
            for (int64_t i = 0; i < len; ++i) {
                tok[cursor + i] = static_cast<int64_t>(src[i]);
                sid[cursor + i] = s;
                tid[cursor + i] = task_s;
            }
            // labels are next tokens inside the piece only; the last position predicts nothing
            for (int64_t i = 0; i + 1 < len; ++i) lab[cursor + i] = static_cast<int64_t>(src[i + 1]);
            lab[cursor + len - 1] = pad_;
            for (int64_t i = len; i < padded; ++i) {  // context-parallel padding inside the segment
                tok[cursor + i] = pad_;
                lab[cursor + i] = pad_;
                sid[cursor + i] = -1;
                tid[cursor + i] = -1;
            }
            for (int64_t i = 0; i < padded; ++i) pos[cursor + i] = i;
            std::fill(mask + cursor, mask + cursor + padded, 0.0f);
            std::fill(wts + cursor, wts + cursor + padded, 0.0f);
            std::fill(kinds_out + cursor, kinds_out + cursor + padded, static_cast<int16_t>(-1));
            // token j of the sample is a target when j >= 1 and j is in a span; it is predicted
            // at the position holding token j - 1, which must lie in this piece
            const float w = weight ? weight[s] : 1.0f;
            for (int64_t q = s0; q < s1; ++q) {
                const int64_t a = sp[2 * q], b = sp[2 * q + 1];
                if (a < 0 || a > b || b > slen[s])
                    fail(where() + ": span " + std::to_string(q) + " [" + std::to_string(a) + ", " +
                         std::to_string(b) + ") outside the sample's " + std::to_string(slen[s]) + " tokens");
                const int64_t lo = std::max(a, start + 1), hi = std::min(b, start + len);
                for (int64_t j = lo; j < hi; ++j) {
                    const int64_t at = cursor + j - 1 - start;
                    mask[at] = 1.0f;
                    wts[at] = w;
                    kinds_out[at] = skind[q];
                }
            }
            if (start == 0) ++first_pieces;
            ++segments;
            actual += len;
            cursor += padded;
            cu[segments] = static_cast<int32_t>(actual);
            cup[segments] = static_cast<int32_t>(cursor);
            max_seqlen = std::max(max_seqlen, padded);
        }
        if (cursor < L) {  // tail padding: one final segment
            std::fill(tok + cursor, tok + L, pad_);
            std::fill(lab + cursor, lab + L, pad_);
            for (int64_t i = cursor; i < L; ++i) pos[i] = i - cursor;
            std::fill(sid + cursor, sid + L, -1);
            std::fill(tid + cursor, tid + L, -1);
            std::fill(mask + cursor, mask + L, 0.0f);
            std::fill(wts + cursor, wts + L, 0.0f);
            std::fill(kinds_out + cursor, kinds_out + L, static_cast<int16_t>(-1));
            ++segments;
            actual += L - cursor;
            max_seqlen = std::max(max_seqlen, L - cursor);
            cu[segments] = static_cast<int32_t>(actual);
            cup[segments] = static_cast<int32_t>(L);
        }
        std::fill(cu + segments + 1, cu + L + 1, -1);
        std::fill(cup + segments + 1, cup + L + 1, -1);
        scalars[0] = segments;
        scalars[1] = max_seqlen;
        scalars[2] = first_pieces;
    }

    // held so the buffers outlive the raw pointers taken from them
    py::array_t<T, py::array::c_style> token_buffer_;
    py::array_t<int64_t, py::array::c_style> sample_pointer_;
    py::array_t<int32_t, py::array::c_style> sample_length_;
    py::array_t<int32_t, py::array::c_style> task_id_;
    py::array_t<int64_t, py::array::c_style> span_offsets_;
    py::array_t<int32_t, py::array::c_style> spans_;
    py::array_t<int16_t, py::array::c_style> span_kind_;
    py::array_t<int64_t, py::array::c_style> pieces_;
    py::array_t<int64_t, py::array::c_style> row_ptr_;
    py::array_t<float, py::array::c_style> sample_weight_;
    int64_t L_, pad_, multiple_;
    int64_t num_tokens_ = 0, num_samples_ = 0, num_spans_ = 0, num_pieces_ = 0, num_rows_ = 0;
};

template <typename T>
void bind(py::module_& m, const char* name) {
    // noconvert: a wrong dtype must fail loudly, never copy the memory-mapped token buffer
    py::class_<RowBuilder<T>>(m, name)
        .def(py::init<py::array_t<T, py::array::c_style>, py::array_t<int64_t, py::array::c_style>,
                      py::array_t<int32_t, py::array::c_style>, py::array_t<int32_t, py::array::c_style>,
                      py::array_t<int64_t, py::array::c_style>, py::array_t<int32_t, py::array::c_style>,
                      py::array_t<int16_t, py::array::c_style>, py::array_t<int64_t, py::array::c_style>,
                      py::array_t<int64_t, py::array::c_style>, py::array_t<float, py::array::c_style>,
                      int64_t, int64_t, int64_t>(),
             py::arg("token_buffer").noconvert(), py::arg("sample_pointer").noconvert(),
             py::arg("sample_length").noconvert(), py::arg("task_id").noconvert(),
             py::arg("span_offsets").noconvert(), py::arg("spans").noconvert(),
             py::arg("span_kind").noconvert(), py::arg("pieces").noconvert(), py::arg("row_ptr").noconvert(),
             py::arg("sample_weight").noconvert(), py::arg("seq_length"), py::arg("pad_id"),
             py::arg("cp_multiple"))
        .def_property_readonly("num_rows", &RowBuilder<T>::num_rows)
        .def("build", &RowBuilder<T>::build, py::arg("row"),
             "Row `row`: (int64 [5, L], float32 [2, L], int16 [L], int32 [2, L + 1], int64 [3]).");
}

}  // namespace

PYBIND11_MODULE(_rows, m) {
    m.doc() = "C++ gather of a packed row's arrays from the .bin token buffer (indexing only).";
    bind<uint16_t>(m, "RowBuilderUint16");
    bind<int32_t>(m, "RowBuilderInt32");
    bind<int64_t>(m, "RowBuilderInt64");
}
