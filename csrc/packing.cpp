// Bin packing of sample lengths into rows of `capacity` tokens (megatron_tokweight.data._packing).
//
// Indexing only: numpy lengths in; per item bin and offset, per bin fill and the items in row
// order out. Policy (overlong samples, empty samples) is decided by megatron_tokweight.data.packing.
//
// Bound for int32 lengths only (`*_int32`): every value fits int32 (n and capacity are <=
// INT32_MAX), and an int64 variant only doubled the memory traffic; the Python front end hands
// every integer dtype over as int32 once it has checked and cut the lengths. Every function
// returns a dict of int32 arrays: per item `bin`, `offset` (item i sits in bin[i] at token
// offset[i]); per bin `bin_fill` [B] and `bin_start` [B + 1]; and the items in row order (sorted
// by (bin, offset)): `row_order` [N] with their `row_bin`, `row_offset` and `row_length`, bin b's
// items being row_order[bin_start[b] : bin_start[b + 1]].
// Items of length 0 are accepted (they fit anywhere); lengths < 0 or > capacity raise ValueError.
//
// Three passes over memory. The decreasing packers work on runs of equal length: a bin takes as
// many items of a run as fit in one go, so their cost grows with the bins touched per run, not
// with the items; they write one Segment per bin and run (consecutive steps into one bin), in
// placement order. One pass in item order reads each item's Segment (a length's segments are
// consecutive: one stream per distinct length) and writes bin/offset and the item of each step;
// one pass over the segments writes the row-order arrays (a segment's items take consecutive
// slots).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kMaxCapacity = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxItems = std::numeric_limits<int32_t>::max();  // item and bin ids fit int32
// Best fit keeps one queue per remaining capacity (O(capacity) memory); beyond this a row would
// hold 16M tokens, far past any real sequence length, so we refuse rather than exhaust memory.
constexpr int64_t kMaxBestFitCapacity = int64_t(1) << 24;

template <typename T>
using Lengths = py::array_t<T, py::array::c_style>;

// Consecutive placement steps of one run (items of one length `need`) that went into one bin:
// the items of steps [first, next segment's first) sit at offset + j * need with ranks rank + j
// (rank: items placed in the bin before; the slot among the bin's items).
struct Segment {
    int32_t bin;
    int32_t offset;
    int32_t rank;
    int32_t first;
};

struct Packing {
    int64_t n;
    // In step order, then an end marker (first = n). Room for one per step, uninitialised: the
    // pages past the ones used are never touched.
    std::unique_ptr<Segment[]> segments;
    int64_t num_segments = 0;
    std::vector<int32_t> run_segment;  // decreasing orders: per run, its first segment
    std::vector<int64_t> fill;   // per bin: tokens
    std::vector<int32_t> count;  // per bin: items
    // Placement order: counting-sort runs (steps of length capacity - key are
    // [key_start[key], key_start[key + 1])), or else the item of each step in `placement`, or
    // else (both empty: next-fit) step k places item k. per_item fills `placement` for the runs.
    std::vector<int64_t> key_start;
    std::unique_ptr<int32_t[]> placement;
    bool has_empty_items = false;  // set by decreasing_order

    explicit Packing(int64_t items) : n(items), segments(new Segment[items + 1]) {}

    void add_segment(int32_t bin, int64_t offset, int32_t rank, int64_t first) {
        segments[num_segments++] = {bin, static_cast<int32_t>(offset), rank,
                                    static_cast<int32_t>(first)};
    }

    // Opens a bin; returns its id.
    int32_t open_bin() {
        fill.push_back(0);
        count.push_back(0);
        return static_cast<int32_t>(fill.size() - 1);
    }
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
// deterministic.
template <typename T>
void decreasing_order(const T* len, int64_t n, int64_t capacity, Packing& p) {
    if (capacity <= 4 * n + 4096) {
        // Counting sort on key capacity - length: O(n + capacity) and stable by construction.
        // Only the run boundaries are kept: per_item walks the items in order and counts off
        // each key's steps.
        p.key_start.assign(capacity + 2, 0);
        for (int64_t i = 0; i < n; ++i) ++p.key_start[capacity - len[i] + 1];
        p.has_empty_items = p.key_start[capacity + 1] > 0;
        std::partial_sum(p.key_start.begin(), p.key_start.end(), p.key_start.begin());
    } else {
        // Few items in a huge capacity: a counting array would dominate.
        p.placement.reset(new int32_t[n]);
        std::iota(p.placement.get(), p.placement.get() + n, int32_t(0));
        std::stable_sort(p.placement.get(), p.placement.get() + n,
                         [len](int32_t a, int32_t b) { return len[a] > len[b]; });
        p.has_empty_items = n > 0 && len[p.placement[n - 1]] == 0;
    }
}

// Calls f(need, count) for each run of equal lengths in placement order.
template <typename T, typename F>
void for_each_run(const Packing& p, const T* len, int64_t capacity, F&& f) {
    if (!p.key_start.empty()) {
        for (int64_t key = 0; key <= capacity; ++key) {
            const int64_t count = p.key_start[key + 1] - p.key_start[key];
            if (count > 0) f(capacity - key, count);
        }
        return;
    }
    const int32_t* placement = p.placement.get();
    for (int64_t k = 0; k < p.n;) {
        const int64_t need = placement ? len[placement[k]] : len[k];
        int64_t end = k + 1;
        while (end < p.n && (placement ? len[placement[end]] : len[end]) == need) ++end;
        f(need, end - k);
        k = end;
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

// An open bin and the items it holds so far (carried along, so no per-bin array is touched).
struct OpenBin {
    int32_t bin;
    int32_t items;
};

// The open bins with one remaining capacity, in the order they took their last item (FIFO).
// Lengths come in decreasing order, so a queue only grows while its room is below the current
// length and only shrinks once the length is down to its room (a bin with room >= length would
// be the best fit, so nothing lands in between): a popped front is never followed by a push
// before the queue empties, and the buffer is simply reset then.
class BinQueue {
   public:
    bool empty() const { return head_ == bins_.size(); }
    int64_t size() const { return static_cast<int64_t>(bins_.size() - head_); }
    OpenBin* begin() { return bins_.data() + head_; }
    const OpenBin* begin() const { return bins_.data() + head_; }
    const OpenBin* end() const { return bins_.data() + bins_.size(); }
    void push_back(OpenBin b) { bins_.push_back(b); }

    void pop_front(int64_t m) {
        head_ += m;
        if (head_ == bins_.size()) {
            bins_.clear();
            head_ = 0;
        }
    }

   private:
    std::vector<OpenBin> bins_;
    size_t head_ = 0;
};

// True best fit: the open bin with the smallest remaining capacity that fits; among bins with
// equal room, the one that took its last item longest ago (FIFO, as in TRL's and OLMo-core's
// packers); a new bin only when none fits. Bins with equal room are interchangeable for the
// rows to come, so the tie rule only names bins. Per run of equal lengths `need`:
// - room best >= 2 need (or a new bin): that bin takes items until less than need is left (no
//   other bin has room in [need, best), so step by step it would be chosen again each time);
// - need <= best < 2 need: the bins at the front of best's queue take one item each and move,
//   in that order, to the back of the queue for best - need;
// - need == 0: the zero-length items go round the queue of the smallest room (each bin would
//   take one and move to the back).
template <typename T>
Packing best_fit_decreasing(const T* len, int64_t n, int64_t capacity) {
    Packing p(n);
    decreasing_order(len, n, capacity, p);
    CapacitySet open(capacity + 1);         // remaining capacities that some open bin has
    std::vector<BinQueue> with(capacity + 1);  // with[room]: the open bins with that room
    // Full bins can only take zero-length items, which come last; keep them only if any exist.
    const bool keep_full_bins = p.has_empty_items;
    int64_t k = 0;  // next placement step

    // A bin that now has `room` left joins the back of its queue, or is done if full.
    auto requeue = [&](int64_t room, OpenBin b) {
        if (room > 0 || keep_full_bins) {
            BinQueue& queue = with[room];
            if (queue.empty()) open.insert(room);
            queue.push_back(b);
        } else {
            p.fill[b.bin] = capacity;
            p.count[b.bin] = b.items;
        }
    };
    auto take_front = [&](int64_t room, int64_t m) {
        with[room].pop_front(m);
        if (with[room].empty()) open.erase(room);
    };

    for_each_run(p, len, capacity, [&](int64_t need, int64_t count) {
        p.run_segment.push_back(static_cast<int32_t>(p.num_segments));
        while (count > 0) {
            int64_t best = open.successor(need);
            if (need == 0 && best >= 0) {
                // Zero lengths come last: the queue's order afterwards does not matter.
                BinQueue& queue = with[best];
                const int64_t size = queue.size();
                OpenBin* front = queue.begin();
                for (int64_t j = 0; j < count; ++j) {
                    OpenBin& b = front[j % size];
                    p.add_segment(b.bin, capacity - best, b.items++, k++);
                }
                count = 0;
            } else if (best >= 0 && best < 2 * need) {
                const int64_t m = std::min(count, with[best].size());
                const int32_t offset = static_cast<int32_t>(capacity - best);
                for (OpenBin *b = with[best].begin(), *end = b + m; b != end; ++b) {
                    p.add_segment(b->bin, offset, b->items++, k++);
                    requeue(best - need, *b);  // another queue: `b` stays valid
                }
                take_front(best, m);
                count -= m;
            } else {
                OpenBin b;
                if (best < 0) {
                    b = {p.open_bin(), 0};
                    best = capacity;
                } else {
                    b = *with[best].begin();
                    take_front(best, 1);
                }
                const int64_t m = need > 0 ? std::min(count, best / need) : count;
                p.add_segment(b.bin, capacity - best, b.items, k);
                b.items += static_cast<int32_t>(m);
                k += m;
                requeue(best - m * need, b);
                count -= m;
            }
        }
    });
    for (int64_t room = 0; room <= capacity; ++room) {
        for (const OpenBin& b : with[room]) {
            p.fill[b.bin] = capacity - room;
            p.count[b.bin] = b.items;
        }
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

// First fit: the lowest bin with room. Per run of equal lengths, that bin takes items until less
// than `need` is left (every lower bin already has less than need), then the next one.
template <typename T>
Packing first_fit_decreasing(const T* len, int64_t n, int64_t capacity) {
    Packing p(n);
    decreasing_order(len, n, capacity, p);
    BinTree tree;
    int64_t k = 0;
    for_each_run(p, len, capacity, [&](int64_t need, int64_t count) {
        p.run_segment.push_back(static_cast<int32_t>(p.num_segments));
        while (count > 0) {
            int64_t b = tree.leftmost_at_least(need);
            int64_t room;
            if (b < 0) {
                b = p.open_bin();
                if (b == tree.leaf_count()) tree.grow();
                room = capacity;
            } else {
                room = tree.remaining(b);
            }
            const int64_t m = need > 0 ? std::min(count, room / need) : count;
            p.add_segment(static_cast<int32_t>(b), capacity - room, p.count[b], k);
            p.count[b] += static_cast<int32_t>(m);
            k += m;
            tree.set(b, room - m * need);
            count -= m;
        }
    });
    for (size_t b = 0; b < p.fill.size(); ++b) p.fill[b] = capacity - tree.remaining(b);
    return p;
}

// Order preserving: items in input order; a new bin whenever the current one cannot take the item.
template <typename T>
Packing next_fit(const T* len, int64_t n, int64_t capacity) {
    Packing p(n);
    int64_t room = -1;  // no bin open yet
    int32_t b = -1;
    for (int64_t item = 0; item < n; ++item) {
        const int64_t need = len[item];
        const bool extends = need <= room && item > 0 && len[item - 1] == need;
        if (need > room) {
            b = p.open_bin();
            room = capacity;
        }
        // A segment holds items of one length: extend the last one if it is the same bin's.
        if (!extends) p.add_segment(b, p.fill[b], p.count[b], item);
        p.count[b]++;
        p.fill[b] += need;
        room -= need;
    }
    return p;
}

// Per item bin and offset, in item order (sequential writes); in the decreasing orders also
// records the item of each step (placement).
template <typename T>
void per_item(Packing& p, const T* len, int64_t capacity, T* bin, T* offset) {
    Segment* seg = p.segments.get();
    seg[p.num_segments].first = static_cast<int32_t>(p.n);  // end marker
    if (!p.key_start.empty()) {
        // Per key: the segment and the step of its next item. The segments of one length are
        // consecutive, so the reads walk one stream per distinct length.
        struct Cursor {
            int32_t segment;
            int32_t step;
        };
        std::vector<Cursor> next(capacity + 1);
        for (int64_t key = 0, run = 0; key <= capacity; ++key) {
            if (p.key_start[key + 1] > p.key_start[key]) {
                next[key] = {p.run_segment[run++], static_cast<int32_t>(p.key_start[key])};
            }
        }
        p.placement.reset(new int32_t[p.n]);
        int32_t* placement = p.placement.get();
        for (int64_t i = 0; i < p.n; ++i) {
            const int64_t need = len[i];
            Cursor& c = next[capacity - need];
            const Segment* s = seg + c.segment;
            bin[i] = s->bin;
            offset[i] = s->offset + (c.step - s->first) * need;
            placement[c.step] = static_cast<int32_t>(i);
            if (++c.step == s[1].first) ++c.segment;
        }
    } else {
        const int32_t* placement = p.placement.get();
        for (int64_t g = 0; g < p.num_segments; ++g) {
            for (int64_t k = seg[g].first, j = 0; k < seg[g + 1].first; ++k, ++j) {
                const int64_t i = placement ? placement[k] : k;
                bin[i] = seg[g].bin;
                offset[i] = seg[g].offset + j * len[i];
            }
        }
    }
}

// Items sorted by (bin, offset): a segment's items fill consecutive slots from
// bin_start[bin] + rank. bin_start gets num_bins + 1 entries.
template <typename T>
void row_order(const Packing& p, const T* len, int64_t capacity, T* bin_start, T* order,
               T* row_bin, T* row_offset, T* row_length) {
    bin_start[0] = 0;
    for (size_t b = 0; b < p.count.size(); ++b) bin_start[b + 1] = bin_start[b] + p.count[b];
    const Segment* seg = p.segments.get();
    const int32_t* placement = p.placement.get();
    int64_t g = 0;
    for_each_run(p, len, capacity, [&](int64_t need, int64_t count) {
        for (const int64_t end = seg[g].first + count; seg[g].first < end; ++g) {
            const int64_t slot = bin_start[seg[g].bin] + seg[g].rank - seg[g].first;
            const T bin = seg[g].bin;
            T at = seg[g].offset;
            for (int64_t k = seg[g].first; k < seg[g + 1].first; ++k, at += need) {
                order[slot + k] = placement ? placement[k] : k;
                row_bin[slot + k] = bin;
                row_offset[slot + k] = at;
                row_length[slot + k] = need;
            }
        }
    });
}

template <typename T>
using Algorithm = Packing (*)(const T*, int64_t, int64_t);

template <typename T, Algorithm<T> algorithm>
py::dict pack(const Lengths<T>& lengths, int64_t capacity, const char* name, int64_t max_capacity) {
    const T* len = checked_lengths(lengths, capacity, max_capacity, name);
    const int64_t n = lengths.shape(0);
    py::array_t<T> bin(n), offset(n), order(n), row_bin(n), row_offset(n), row_length(n);
    T* bin_ptr = bin.mutable_data();
    T* offset_ptr = offset.mutable_data();
    Packing p(0);
    {
        py::gil_scoped_release release;
        p = algorithm(len, n, capacity);
        per_item(p, len, capacity, bin_ptr, offset_ptr);
    }
    const auto num_bins = static_cast<py::ssize_t>(p.fill.size());
    py::array_t<T> fill(num_bins), bin_start(num_bins + 1);
    T* bin_start_ptr = bin_start.mutable_data();
    T* order_ptr = order.mutable_data();
    T* row_bin_ptr = row_bin.mutable_data();
    T* row_offset_ptr = row_offset.mutable_data();
    T* row_length_ptr = row_length.mutable_data();
    std::copy(p.fill.begin(), p.fill.end(), fill.mutable_data());
    {
        py::gil_scoped_release release;
        row_order(p, len, capacity, bin_start_ptr, order_ptr, row_bin_ptr, row_offset_ptr,
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
        " Returns a dict of arrays in the lengths' dtype: bin, offset (per item), bin_fill,"
        " bin_start (per bin), row_order, row_bin, row_offset, row_length (items sorted by"
        " (bin, offset)).";
    m.def(("best_fit_decreasing_" + suffix).c_str(),
          [](const Lengths<T>& lengths, int64_t capacity) {
              return pack<T, best_fit_decreasing<T>>(lengths, capacity, "best_fit_decreasing",
                                                     kMaxBestFitCapacity);
          },
          py::arg("lengths").noconvert(), py::arg("capacity"),
          (std::string("Best-fit-decreasing (tightest bin; on ties the one that took its last item"
                       " longest ago).") + returns).c_str());
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
}

