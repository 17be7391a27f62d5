// Counts of native objects alive, per kind: a test reads them to prove that requests leave nothing
// behind (a reference cycle once kept every batched request's state alive).
#ifndef FGR_NATIVE_LIVE_COUNTS_H_
#define FGR_NATIVE_LIVE_COUNTS_H_

#include <atomic>
#include <cstdint>

namespace fgr {

enum class Live { kTask, kCall, kTensor, kCount };

std::atomic<int64_t>& LiveCount(Live kind);

// Counts itself alive from construction to destruction.
template <Live kKind>
struct Counted {
  Counted() { LiveCount(kKind).fetch_add(1); }
  Counted(const Counted&) : Counted() {}
  ~Counted() { LiveCount(kKind).fetch_sub(1); }
};

}  // namespace fgr

#endif  // FGR_NATIVE_LIVE_COUNTS_H_
