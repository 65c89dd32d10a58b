// Bin packing of sample lengths into rows of `capacity` tokens (megatron_tokweight._packing).
//
// Indexing only: numpy lengths in; per item bin and offset, per bin fill and the items in row
// order out. Policy (overlong samples, empty samples) is decided by megatron_tokweight.packing.
//
// Every function returns a dict of int64 arrays: per item `bin`, `offset` (item i sits in bin[i]
// at token offset[i]); per bin `bin_fill` [B] and `bin_start` [B + 1]; and the items in row order
// (sorted by (bin, offset)): `row_order` [N] with their `row_bin`, `row_offset` and `row_length`,
// bin b's items being row_order[bin_start[b] : bin_start[b + 1]].
// Items of length 0 are accepted (they fit anywhere); lengths < 0 or > capacity raise ValueError.
//
// The packing loops touch only small structures and arrays read or written in placement order;
// per-item gathers from the input would cost a cache miss each on 10M-item inputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kMaxCapacity = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxItems = std::numeric_limits<int32_t>::max();  // item and bin ids fit int32
// Best fit keeps one bucket per remaining capacity (O(capacity) memory); beyond this a row would
// hold 16M tokens, far past any real sequence length, so we refuse rather than exhaust memory.
constexpr int64_t kMaxBestFitCapacity = int64_t(1) << 24;

template <typename T>
using Lengths = py::array_t<T, py::array::c_style>;

// Where a step's item went; one struct so a gather by step costs one cache line, not two.
struct Spot {
    int32_t bin;
    int32_t offset;
};

struct Packing {
    std::vector<int64_t> fill;  // tokens per bin
    int64_t n;                  // items
    // Per placement step k (uninitialised buffers: every entry is written before it is read).
    std::unique_ptr<int32_t[]> placement;      // the item placed at step k
    std::unique_ptr<int32_t[]> placement_len;  // its length
    std::unique_ptr<Spot[]> spot;              // its bin and offset
    std::unique_ptr<int32_t[]> position;       // per item: its step (placement[position[i]] == i)

    explicit Packing(int64_t items)
        : n(items),
          placement(new int32_t[items]),
          placement_len(new int32_t[items]),
          spot(new Spot[items]),
          position(new int32_t[items]) {}
};

template <typename T>
const T* checked_lengths(const Lengths<T>& lengths, int64_t capacity, int64_t max_capacity,
                         const char* algorithm) {
    if (lengths.ndim() != 1) {
        throw py::value_error(std::string(algorithm) + ": lengths must be 1-D, got " +
                              std::to_string(lengths.ndim()) + " dimensions");
    }
    if (capacity < 1 || capacity > max_capacity) {
        throw py::value_error(std::string(algorithm) + ": capacity must be in [1, " +
                              std::to_string(max_capacity) + "], got " + std::to_string(capacity));
    }
    const int64_t n = lengths.shape(0);
    if (n > kMaxItems) {
        throw py::value_error(std::string(algorithm) + ": at most " + std::to_string(kMaxItems) +
                              " lengths per call, got " + std::to_string(n));
    }
    const T* len = lengths.data();
    for (int64_t i = 0; i < n; ++i) {
        const int64_t v = static_cast<int64_t>(len[i]);
        if (v < 0) {
            throw py::value_error("sample " + std::to_string(i) + ": length " + std::to_string(v) +
                                  " is negative");
        }
        if (v > capacity) {
            throw py::value_error("sample " + std::to_string(i) + ": length " + std::to_string(v) +
                                  " exceeds the row capacity " + std::to_string(capacity));
        }
    }
    return len;
}

// Placement order = items by decreasing length, ties by item index (stable), so results are
// deterministic. Also fills placement_len.
template <typename T>
void decreasing_order(const T* len, int64_t n, int64_t capacity, Packing& p) {
    if (capacity <= 4 * n + 4096) {
        // Counting sort on key capacity - length: O(n + capacity) and stable by construction.
        std::vector<int64_t> start(capacity + 2, 0);  // start[key]: first slot of key's run
        for (int64_t i = 0; i < n; ++i) ++start[capacity - len[i] + 1];
        for (int64_t key = 1; key <= capacity + 1; ++key) start[key] += start[key - 1];
        for (int64_t key = 0; key <= capacity; ++key) {
            std::fill(p.placement_len.get() + start[key], p.placement_len.get() + start[key + 1],
                      static_cast<int32_t>(capacity - key));
        }
        for (int64_t i = 0; i < n; ++i) {
            const int64_t slot = start[capacity - len[i]]++;
            p.placement[slot] = static_cast<int32_t>(i);
            p.position[i] = static_cast<int32_t>(slot);
        }
    } else {
        // Few items in a huge capacity: a counting array would dominate.
        std::iota(p.placement.get(), p.placement.get() + n, int32_t(0));
        std::stable_sort(p.placement.get(), p.placement.get() + n,
                         [len](int32_t a, int32_t b) { return len[a] > len[b]; });
        for (int64_t k = 0; k < n; ++k) {
            p.placement_len[k] = static_cast<int32_t>(len[p.placement[k]]);
            p.position[p.placement[k]] = static_cast<int32_t>(k);
        }
    }
}

// Ordered set of integers in [0, size) with successor queries: a segment tree of fan-out 64 whose
// nodes are bitmasks (bit j set = child j's range holds a member). O(log_64 size) per operation.
class CapacitySet {
   public:
    explicit CapacitySet(int64_t size) {
        int64_t words = std::max<int64_t>(1, (size + 63) / 64);
        while (true) {
            levels_.emplace_back(words, 0);
            if (words == 1) break;
            words = (words + 63) / 64;
        }
    }

    void insert(int64_t x) {
        for (auto& level : levels_) {
            uint64_t& word = level[x >> 6];
            const bool had_members = word != 0;
            word |= uint64_t(1) << (x & 63);
            if (had_members) return;  // ancestors already mark this node
            x >>= 6;
        }
    }

    void erase(int64_t x) {
        for (auto& level : levels_) {
            uint64_t& word = level[x >> 6];
            word &= ~(uint64_t(1) << (x & 63));
            if (word != 0) return;  // node still has members: ancestors unchanged
            x >>= 6;
        }
    }

    // Smallest member >= x, or -1.
    int64_t successor(int64_t x) const {
        size_t depth = 0;
        for (; depth < levels_.size(); ++depth) {
            const auto& level = levels_[depth];
            const int64_t w = x >> 6;
            if (w >= static_cast<int64_t>(level.size())) return -1;
            const uint64_t above = level[w] & (~uint64_t(0) << (x & 63));
            if (above != 0) {
                x = (w << 6) | __builtin_ctzll(above);
                break;
            }
            x = w + 1;
        }
        if (depth == levels_.size()) return -1;
        while (depth > 0) {
            --depth;
            x = (x << 6) | __builtin_ctzll(levels_[depth][x]);
        }
        return x;
    }

   private:
    std::vector<std::vector<uint64_t>> levels_;  // levels_[0]: one bit per value
};

// True best fit: the open bin with the smallest remaining capacity that fits, lowest bin index
// among equals; a new bin only when none fits.
template <typename T>
Packing best_fit_decreasing(const T* len, int64_t n, int64_t capacity) {
    Packing p(n);
    decreasing_order(len, n, capacity, p);
    CapacitySet open(capacity + 1);                              // remaining capacities in use
    std::vector<std::vector<int32_t>> bins_with(capacity + 1);  // min-heaps of bin indices
    const std::greater<int32_t> min_heap;
    // Full bins can only take zero-length items, which sort last; keep them only if any exist.
    const bool keep_full_bins = n > 0 && p.placement_len[n - 1] == 0;
    int32_t num_bins = 0;
    for (int64_t k = 0; k < n; ++k) {
        const int64_t need = p.placement_len[k];
        const int64_t best = open.successor(need);
        int32_t b;
        int64_t room;
        if (best < 0) {
            b = num_bins++;
            room = capacity;
        } else {
            auto& heap = bins_with[best];
            std::pop_heap(heap.begin(), heap.end(), min_heap);
            b = heap.back();
            heap.pop_back();
            if (heap.empty()) open.erase(best);
            room = best;
        }
        p.spot[k] = {b, static_cast<int32_t>(capacity - room)};
        room -= need;
        if (room > 0 || keep_full_bins) {
            auto& heap = bins_with[room];
            heap.push_back(b);
            std::push_heap(heap.begin(), heap.end(), min_heap);
            if (heap.size() == 1) open.insert(room);
        }
    }
    // A bin in no bucket is full.
    p.fill.assign(num_bins, capacity);
    for (int64_t room = 0; room <= capacity; ++room) {
        for (const int32_t b : bins_with[room]) p.fill[b] = capacity - room;
    }
    return p;
}

// Max segment tree over bins' remaining capacities (-1 = bin not opened yet), grown by doubling.
class BinTree {
   public:
    BinTree() : size_(1024), tree_(2 * size_, -1) {}

    int64_t leaf_count() const { return size_; }

    void grow() {
        std::vector<int32_t> bigger(4 * size_, -1);
        std::copy(tree_.begin() + size_, tree_.end(), bigger.begin() + 2 * size_);
        size_ *= 2;
        tree_.swap(bigger);
        for (int64_t i = size_ - 1; i >= 1; --i) tree_[i] = std::max(tree_[2 * i], tree_[2 * i + 1]);
    }

    int64_t remaining(int64_t b) const { return tree_[size_ + b]; }

    void set(int64_t b, int64_t value) {
        int64_t i = size_ + b;
        tree_[i] = static_cast<int32_t>(value);
        for (i >>= 1; i >= 1; i >>= 1) {
            const int32_t m = std::max(tree_[2 * i], tree_[2 * i + 1]);
            if (tree_[i] == m) break;  // nothing above changes
            tree_[i] = m;
        }
    }

    // Leftmost bin whose remaining capacity is >= need, or -1.
    int64_t leftmost_at_least(int64_t need) const {
        if (tree_[1] < need) return -1;
        int64_t i = 1;
        while (i < size_) i = tree_[2 * i] >= need ? 2 * i : 2 * i + 1;
        return i - size_;
    }

   private:
    int64_t size_;
    std::vector<int32_t> tree_;  // int32: capacity <= INT32_MAX, half the cache traffic
};

template <typename T>
Packing first_fit_decreasing(const T* len, int64_t n, int64_t capacity) {
    Packing p(n);
    decreasing_order(len, n, capacity, p);
    BinTree tree;
    int64_t num_bins = 0;
    for (int64_t k = 0; k < n; ++k) {
        const int64_t need = p.placement_len[k];
        int64_t b = tree.leftmost_at_least(need);
        int64_t room;
        if (b < 0) {
            b = num_bins++;
            if (b == tree.leaf_count()) tree.grow();
            room = capacity;
        } else {
            room = tree.remaining(b);
        }
        p.spot[k] = {static_cast<int32_t>(b), static_cast<int32_t>(capacity - room)};
        tree.set(b, room - need);
    }
    p.fill.resize(num_bins);
    for (int64_t b = 0; b < num_bins; ++b) p.fill[b] = capacity - tree.remaining(b);
    return p;
}

// Order preserving: items in input order; a new bin whenever the current one cannot take the item.
template <typename T>
Packing next_fit(const T* len, int64_t n, int64_t capacity) {
    Packing p(n);
    std::iota(p.placement.get(), p.placement.get() + n, int32_t(0));
    std::iota(p.position.get(), p.position.get() + n, int32_t(0));
    int64_t room = -1;  // no bin open yet
    for (int64_t item = 0; item < n; ++item) {
        const int64_t need = len[item];
        if (need > room) {
            p.fill.push_back(0);
            room = capacity;
        }
        const int64_t b = static_cast<int64_t>(p.fill.size()) - 1;
        p.placement_len[item] = static_cast<int32_t>(need);
        p.spot[item] = {static_cast<int32_t>(b), static_cast<int32_t>(p.fill[b])};
        p.fill[b] += need;
        room -= need;
    }
    return p;
}

// Per item bin and offset, gathered in item order after the packing loop: sequential writes to
// the large int64 outputs and independent reads (one cache line each) from the smaller spots.
void per_item(const Packing& p, int64_t* bin, int64_t* offset) {
    for (int64_t i = 0; i < p.n; ++i) {
        const int32_t k = p.position[i];
        bin[i] = p.spot[k].bin;
        offset[i] = p.spot[k].offset;
    }
}

// Items sorted by (bin, offset): a counting sort by bin over the placement order, in which each
// bin's items already appear by increasing offset. bin_start gets num_bins + 1 entries. Only
// the item and its length are scattered; bins and offsets then follow in sequential passes.
void row_order(const Packing& p, int64_t* bin_start, int64_t* order, int64_t* row_bin,
               int64_t* row_offset, int64_t* row_length) {
    const int64_t num_bins = static_cast<int64_t>(p.fill.size());
    std::fill(bin_start, bin_start + num_bins + 1, int64_t(0));
    for (int64_t k = 0; k < p.n; ++k) ++bin_start[p.spot[k].bin + 1];
    for (int64_t b = 1; b <= num_bins; ++b) bin_start[b] += bin_start[b - 1];
    std::vector<int64_t> next(bin_start, bin_start + num_bins);
    for (int64_t k = 0; k < p.n; ++k) {
        const int64_t slot = next[p.spot[k].bin]++;
        order[slot] = p.placement[k];
        row_length[slot] = p.placement_len[k];
    }
    for (int64_t b = 0; b < num_bins; ++b) {
        int64_t cursor = 0;
        for (int64_t j = bin_start[b]; j < bin_start[b + 1]; ++j) {
            row_bin[j] = b;
            row_offset[j] = cursor;
            cursor += row_length[j];
        }
    }
}

template <typename T>
using Algorithm = Packing (*)(const T*, int64_t, int64_t);

template <typename T, Algorithm<T> algorithm>
py::dict pack(const Lengths<T>& lengths, int64_t capacity, const char* name, int64_t max_capacity) {
    const T* len = checked_lengths(lengths, capacity, max_capacity, name);
    const int64_t n = lengths.shape(0);
    py::array_t<int64_t> bin(n), offset(n), order(n), row_bin(n), row_offset(n), row_length(n);
    int64_t* bin_ptr = bin.mutable_data();
    int64_t* offset_ptr = offset.mutable_data();
    Packing p(0);
    {
        py::gil_scoped_release release;
        p = algorithm(len, n, capacity);
        per_item(p, bin_ptr, offset_ptr);
    }
    const auto num_bins = static_cast<py::ssize_t>(p.fill.size());
    py::array_t<int64_t> fill(num_bins), bin_start(num_bins + 1);
    int64_t* bin_start_ptr = bin_start.mutable_data();
    int64_t* order_ptr = order.mutable_data();
    int64_t* row_offset_ptr = row_offset.mutable_data();
    int64_t* row_length_ptr = row_length.mutable_data();
    std::copy(p.fill.begin(), p.fill.end(), fill.mutable_data());
    {
        py::gil_scoped_release release;
        row_order(p, bin_start_ptr, order_ptr, row_bin.mutable_data(), row_offset_ptr,
                  row_length_ptr);
    }
    py::dict out;
    out["bin"] = bin;
    out["offset"] = offset;
    out["bin_fill"] = fill;
    out["bin_start"] = bin_start;
    out["row_order"] = order;
    out["row_bin"] = row_bin;
    out["row_offset"] = row_offset;
    out["row_length"] = row_length;
    return out;
}

template <typename T>
void bind_variants(py::module_& m, const std::string& suffix) {
    const char* returns =
        " Returns a dict of int64 arrays: bin, offset (per item), bin_fill, bin_start (per bin),"
        " row_order, row_bin, row_offset, row_length (items sorted by (bin, offset)).";
    m.def(("best_fit_decreasing_" + suffix).c_str(),
          [](const Lengths<T>& lengths, int64_t capacity) {
              return pack<T, best_fit_decreasing<T>>(lengths, capacity, "best_fit_decreasing",
                                                     kMaxBestFitCapacity);
          },
          py::arg("lengths").noconvert(), py::arg("capacity"),
          (std::string("Best-fit-decreasing (tightest bin, lowest index on ties).") + returns).c_str());
    m.def(("first_fit_decreasing_" + suffix).c_str(),
          [](const Lengths<T>& lengths, int64_t capacity) {
              return pack<T, first_fit_decreasing<T>>(lengths, capacity, "first_fit_decreasing",
                                                      kMaxCapacity);
          },
          py::arg("lengths").noconvert(), py::arg("capacity"),
          (std::string("First-fit-decreasing (leftmost bin that fits).") + returns).c_str());
    m.def(("next_fit_" + suffix).c_str(),
          [](const Lengths<T>& lengths, int64_t capacity) {
              return pack<T, next_fit<T>>(lengths, capacity, "next_fit", kMaxCapacity);
          },
          py::arg("lengths").noconvert(), py::arg("capacity"),
          (std::string("Order-preserving next-fit.") + returns).c_str());
}

}  // namespace

PYBIND11_MODULE(_packing, m) {
    m.doc() = "Bin packing of sample lengths into fixed-capacity rows (BFD, FFD, next-fit).";
    m.attr("MAX_CAPACITY") = kMaxCapacity;
    m.attr("MAX_BEST_FIT_CAPACITY") = kMaxBestFitCapacity;
    bind_variants<int32_t>(m, "int32");
    bind_variants<int64_t>(m, "int64");
}
