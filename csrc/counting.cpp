// Token-id histogram over a token buffer (megatron_tokweight.weighting._counting).
//
// Indexing only: a C-contiguous numpy token array (e.g. a memmap of a .bin) in,
// (counts int64[vocab_size], first_bad_position) out. first_bad_position is -1 when every id is in
// [0, vocab_size); otherwise counting stops there and the Python front end reports the position.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace py = pybind11;

namespace {

// 2^24 ids (a 128 MiB table): 64x the largest vocabularies in use (~2^18)
constexpr int64_t kMaxVocab = int64_t(1) << 24;

template <typename T>
py::tuple count_token_ids(const py::array_t<T, py::array::c_style>& tokens, int64_t vocab_size) {
    // a larger table is a caller's mistake that would allocate and touch 8 bytes x vocab_size
    if (vocab_size < 1 || vocab_size > kMaxVocab) {
        throw py::value_error("vocab_size must lie in [1, " + std::to_string(kMaxVocab) + "], got " +
                              std::to_string(vocab_size));
    }
    py::array_t<int64_t> counts(vocab_size);
    int64_t* c = counts.mutable_data();
    const T* ids = tokens.data();
    const int64_t n = tokens.size();  // all elements: the array is contiguous
    int64_t first_bad = -1;
    {
        py::gil_scoped_release release;
        std::fill(c, c + vocab_size, int64_t(0));
        for (int64_t i = 0; i < n; ++i) {
            const T id = ids[i];
            bool bad = static_cast<int64_t>(id) >= vocab_size;
            if constexpr (std::is_signed_v<T>) bad = bad || id < 0;
            if (bad) {
                first_bad = i;
                break;
            }
            ++c[id];
        }
    }
    return py::make_tuple(counts, first_bad);
}

template <typename T>
void bind(py::module_& m, const std::string& suffix) {
    m.def(("count_token_ids_" + suffix).c_str(), &count_token_ids<T>,
          py::arg("tokens").noconvert(), py::arg("vocab_size"),
          "Histogram of token ids. Returns (counts int64[vocab_size], first position whose id is "
          "outside [0, vocab_size) or -1).");
}

}  // namespace

PYBIND11_MODULE(_counting, m) {
    m.doc() = "Token-id counting over a token buffer.";
    bind<uint16_t>(m, "uint16");
    bind<int32_t>(m, "int32");
    bind<int64_t>(m, "int64");
}
