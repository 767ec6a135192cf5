// gated_residual on the CPU: out = x + gate[b] * y (DiT's adaLN-Zero residual).
// One pass over memory: read x and y, write out. OpenMP over rows; the gate
// row is converted to float32 once per sample so the inner loop vectorises.
// Backward: dy = gate * dout, and dgate = sum over rows of dout * y as
// per-chunk partials (the caller sums the small chunk axis).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/float_convert.h"
#include "cpu/fast_convert.h"
#include "cpu/huge_pages.h"
#include "cpu/parallel.h"
#include "ops.h"

namespace medgen {
namespace cpu {
namespace {

// An AVX2+FMA+F16C clone beside the baseline one, picked at load time by CPU
// features. ("arch=haswell" would be picked only on Haswell itself: GCC's
// resolver tests the CPU model for arch= names, so AMD and newer Intel CPUs
// would run the baseline clone; x86-64-v3 is tested as a feature level.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define MEDGEN_GR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MEDGEN_GR_CLONES
#endif

// Row kernels: 16-bit elements convert on the fly through cpu/fast_convert.h,
// which the AVX2 clones vectorise, so no staging buffers are needed.
template <typename T>
MEDGEN_GR_CLONES void row_forward(const T* x, const float* g, const T* y, T* out, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) st(out, c, ld(x, c) + g[c] * ld(y, c));
}

// dy = g * d; dgate partial += d * y in double, so long chunks keep float32 accuracy.
template <typename T>
MEDGEN_GR_CLONES void row_backward(const T* d, const float* g, const T* y, T* dy, double* acc, int64_t C) {
  if (dy) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) st(dy, c, g[c] * ld(d, c));
  }
  if (acc) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<double>(ld(d, c)) * static_cast<double>(ld(y, c));
  }
}

template <typename T>
std::vector<float> gate_as_float(const T* gate, int64_t gate_sb, int64_t B, int64_t C) {
  std::vector<float> g(static_cast<size_t>(B * C));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) g[b * C + c] = to_float(gate[b * gate_sb + c]);
  return g;
}

template <typename T>
void forward_impl(const GatedResidualArgs& a) {
  const int64_t N = a.N, C = a.C;
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  T* out = static_cast<T*>(a.out);
  const std::vector<float> gate = gate_as_float(static_cast<const T*>(a.gate), a.gate_sb, a.B, C);
  // Only when out is one dense block (B, N, C); views into larger buffers are left alone.
  if (a.out_sn == C && a.out_sb == N * C) advise_huge_pages(a.out, a.B * N * C * static_cast<int64_t>(sizeof(T)));

  // Static contiguous halves, as torch's own CPU kernels split rows: the data a
  // thread touches is the data its core touched in the previous op, still in its
  // cache (on a 2-vCPU VM this is ~2x faster than dynamic chunks when x and y
  // fit in the L3s).
#pragma omp parallel for schedule(static) num_threads(threads_for(a.B * N * C, a.B * N))
  for (int64_t r = 0; r < a.B * N; ++r) {
    const int64_t b = r / N, n = r % N;
    row_forward(x + b * a.x_sb + n * a.x_sn, gate.data() + b * C, y + b * a.y_sb + n * a.y_sn,
                out + b * a.out_sb + n * a.out_sn, C);
  }
}

template <typename T>
void backward_impl(const GatedResidualBackwardArgs& a) {
  const int64_t N = a.N, C = a.C, chunks = a.n_chunks;
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  const T* dout = static_cast<const T*>(a.dout);
  const T* y = static_cast<const T*>(a.y);
  T* dy = static_cast<T*>(a.dy);
  const std::vector<float> gate = gate_as_float(static_cast<const T*>(a.gate), a.gate_sb, a.B, C);
  const bool want_dy = dy != nullptr, want_dgate = a.dgate_partial != nullptr;

#pragma omp parallel num_threads(threads_for(a.B * N * C, a.B * chunks))
  {
    std::vector<double> acc(want_dgate ? static_cast<size_t>(C) : 0);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < a.B * chunks; ++job) {
      const int64_t b = job / chunks, k = job % chunks;
      const float* g = gate.data() + b * C;
      std::fill(acc.begin(), acc.end(), 0.0);
      const int64_t n_end = std::min(N, (k + 1) * rows_per_chunk);
      for (int64_t n = k * rows_per_chunk; n < n_end; ++n)
        row_backward(dout + b * a.dout_sb + n * a.dout_sn, g, y + b * a.y_sb + n * a.y_sn,
                     want_dy ? dy + b * a.dy_sb + n * a.dy_sn : nullptr, want_dgate ? acc.data() : nullptr, C);
      if (want_dgate) {
        float* part = a.dgate_partial + (b * chunks + k) * C;
        for (int64_t c = 0; c < C; ++c) part[c] = static_cast<float>(acc[c]);
      }
    }
  }
}

}  // namespace

void gated_residual_forward(const GatedResidualArgs& a) {
  switch (a.dtype) {
    case DType::Float32: forward_impl<float>(a); break;
    case DType::Float16: forward_impl<half_t>(a); break;
    case DType::BFloat16: forward_impl<bfloat16_t>(a); break;
    default: throw std::invalid_argument("gated_residual: unsupported dtype");
  }
}

void gated_residual_backward(const GatedResidualBackwardArgs& a) {
  switch (a.dtype) {
    case DType::Float32: backward_impl<float>(a); break;
    case DType::Float16: backward_impl<half_t>(a); break;
    case DType::BFloat16: backward_impl<bfloat16_t>(a); break;
    default: throw std::invalid_argument("gated_residual backward: unsupported dtype");
  }
}

}  // namespace cpu
}  // namespace medgen
