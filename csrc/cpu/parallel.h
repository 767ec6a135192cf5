// How many OpenMP threads a CPU kernel's parallel region gets.
//
// Every region passes num_threads(threads_for(work, items[, grain])): small work
// runs on the calling thread alone, as at::parallel_for's grain size does. Waking
// the team costs microseconds, and on a machine where another process holds a core
// a descheduled team member stalls the whole region until it is scheduled again.
// The team is at most torch's thread count (torch.get_num_threads()), which the
// Python bridge hands over with set_num_threads before a call when it changed: the
// extension does not link against libtorch, so it cannot ask at::get_num_threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#ifdef MEDGEN_WITH_OPENMP
#include <omp.h>
#endif

namespace medgen {
namespace cpu {

// Elementwise work: elements per thread worth waking one (at::internal::GRAIN_SIZE).
constexpr int64_t kGrainElements = 32768;
// Multiply-add work (attention, GEMM, codebook search): about 0.1 ms per thread.
constexpr int64_t kGrainMacs = int64_t{1} << 18;

// 0 until the bridge sets it: then OpenMP's own default.
inline std::atomic<int> g_num_threads{0};

inline void set_num_threads(int n) { g_num_threads.store(std::max(n, 1), std::memory_order_relaxed); }

inline int num_threads() {
#ifdef MEDGEN_WITH_OPENMP
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
#else
  return 1;
#endif
}

// Threads for a region doing `work` units (grain units per thread at least) spread
// over `items` independent loop iterations: 1 below one grain, never more than
// num_threads() nor than `items`.
inline int threads_for(int64_t work, int64_t items, int64_t grain = kGrainElements) {
  const int64_t by_work = work / std::max<int64_t>(grain, 1);
  const int64_t n = std::min<int64_t>({by_work, items, static_cast<int64_t>(num_threads())});
  return static_cast<int>(std::max<int64_t>(n, 1));
}

// This thread's index inside a region (0 without OpenMP).
inline int thread_index() {
#ifdef MEDGEN_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace cpu
}  // namespace medgen
