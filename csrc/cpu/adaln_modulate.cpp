// adaln_modulate on the CPU: y = LayerNorm(x) * (1 + scale[b]) + shift[b]
// (no affine, fp32 statistics). OpenMP over rows; the inner loops run on a
// float32 copy of the row so the compiler vectorises them for every dtype.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/float_convert.h"
#include "cpu/parallel.h"
#include "ops.h"

namespace medgen {
namespace cpu {
namespace {

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
template <>
inline void load_row<float>(const float* src, float* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

// Row kernels on float32 rows. Reductions keep kLanes independent partial sums:
// with a single accumulator the loop is bound by the add latency, not by loads.
// On x86-64 GCC builds an AVX2+FMA clone beside the baseline one and picks at
// load time by CPU features (x86-64-v3; "arch=haswell" would be picked only on a
// Haswell CPU model), so one wheel runs everywhere and uses wide vectors where present.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define MEDGEN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MEDGEN_CPU_CLONES
#endif

constexpr int64_t kLanes = 32;

// Two-pass mean / variance: stable when |mean| >> std.
MEDGEN_CPU_CLONES
void row_stats(const float* x, int64_t C, float eps, float* mean_out, float* rstd_out) {
  float acc[kLanes] = {0.f};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[c + j];
  for (; c < C; ++c) acc[0] += x[c];
  float sum = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  const float mean = sum / static_cast<float>(C);

  float sq[kLanes] = {0.f};
  c = 0;
  for (; c + kLanes <= C; c += kLanes)
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float d = x[c + j] - mean;
      sq[j] += d * d;
    }
  for (; c < C; ++c) {
    const float d = x[c] - mean;
    sq[0] += d * d;
  }
  float var = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) var += sq[j];
  *mean_out = mean;
  *rstd_out = 1.0f / std::sqrt(var / static_cast<float>(C) + eps);
}

// out = (x - mean) * rstd * scale1 + shift; out may alias x.
MEDGEN_CPU_CLONES
void row_modulate(const float* x, float* out, int64_t C, float mean, float rstd, const float* scale1,
                  const float* shift) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = (x[c] - mean) * rstd * scale1[c] + shift[c];
}

// One row of the backward. In: x (overwritten with xhat), dy (overwritten with dx).
// Accumulates dscale += dy * xhat and dshift += dy.
MEDGEN_CPU_CLONES
void row_backward(float* x, float* g, int64_t C, float mean, float rstd, const float* scale1, float* dscale,
                  float* dshift) {
  float acc_g[kLanes] = {0.f}, acc_gx[kLanes] = {0.f};
  int64_t c = 0;
  auto body = [&](int64_t i, int64_t lane) {
    const float xhat = (x[i] - mean) * rstd;
    const float d = g[i];
    dscale[i] += d * xhat;
    dshift[i] += d;
    x[i] = xhat;
    const float gi = d * scale1[i];
    g[i] = gi;
    acc_g[lane] += gi;
    acc_gx[lane] += gi * xhat;
  };
  for (; c + kLanes <= C; c += kLanes)
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) body(c + j, j);
  for (; c < C; ++c) body(c, 0);
  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) {
    sum_g += acc_g[j];
    sum_gx += acc_gx[j];
  }
  const float mg = sum_g / static_cast<float>(C), mgx = sum_gx / static_cast<float>(C);
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) g[i] = rstd * (g[i] - mg - x[i] * mgx);
}

template <typename T>
void forward_impl(const AdaLNModulateArgs& a) {
  const int64_t B = a.B, N = a.N, C = a.C;
  const T* x = reinterpret_cast<const T*>(a.x);
  const T* shift = reinterpret_cast<const T*>(a.shift);
  const T* scale = reinterpret_cast<const T*>(a.scale);
  T* y = reinterpret_cast<T*>(a.y);

  // 1 + scale and shift in float, once per sample instead of once per row.
  std::vector<float> mod(static_cast<size_t>(B * C * 2));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      mod[(b * 2) * C + c] = 1.0f + to_float(scale[b * a.scale_sb + c]);
      mod[(b * 2 + 1) * C + c] = to_float(shift[b * a.shift_sb + c]);
    }

#pragma omp parallel num_threads(threads_for(B * N * C, B * N))
  {
    std::vector<float> buf(static_cast<size_t>(C));
    float* row = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * N; ++r) {
      const int64_t b = r / N, n = r % N;
      const T* xr = x + b * a.x_sb + n * a.x_sn;
      T* yr = y + b * a.y_sb + n * a.y_sn;
      const float* s1 = &mod[(b * 2) * C];
      const float* sh = &mod[(b * 2 + 1) * C];
      float mean, rstd;
      if constexpr (std::is_same<T, float>::value) {
        row_stats(xr, C, a.eps, &mean, &rstd);  // float32 rows need no staging copy
        row_modulate(xr, yr, C, mean, rstd, s1, sh);
      } else {
        load_row(xr, row, C);
        row_stats(row, C, a.eps, &mean, &rstd);
        row_modulate(row, row, C, mean, rstd, s1, sh);
        store_row(row, yr, C);
      }
      if (a.mean) a.mean[r] = mean;
      if (a.rstd) a.rstd[r] = rstd;
    }
  }
}

template <typename T>
void backward_impl(const AdaLNModulateBackwardArgs& a) {
  const int64_t B = a.B, N = a.N, C = a.C, chunks = a.n_chunks;
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  const T* dy = reinterpret_cast<const T*>(a.dy);
  const T* x = reinterpret_cast<const T*>(a.x);
  const T* scale = reinterpret_cast<const T*>(a.scale);
  T* dx = reinterpret_cast<T*>(a.dx);

#pragma omp parallel num_threads(threads_for(2 * B * N * C, B * chunks))
  {
    std::vector<float> buf(static_cast<size_t>(C) * 3);
    float* xh = buf.data();
    float* g = xh + C;
    float* s1 = g + C;
#pragma omp for schedule(static)
    for (int64_t job = 0; job < B * chunks; ++job) {
      const int64_t b = job / chunks, k = job % chunks;
      float* dscale = a.dscale_partial + (b * chunks + k) * C;
      float* dshift = a.dshift_partial + (b * chunks + k) * C;
      std::fill(dscale, dscale + C, 0.f);
      std::fill(dshift, dshift + C, 0.f);
      for (int64_t c = 0; c < C; ++c) s1[c] = 1.0f + to_float(scale[b * a.scale_sb + c]);
      const int64_t n_end = std::min(N, (k + 1) * rows_per_chunk);
      for (int64_t n = k * rows_per_chunk; n < n_end; ++n) {
        const int64_t r = b * N + n;
        const float mean = a.mean[r], rstd = a.rstd[r];
        load_row(x + b * a.x_sb + n * a.x_sn, xh, C);
        load_row(dy + b * a.dy_sb + n * a.dy_sn, g, C);  // g holds dy for now
        row_backward(xh, g, C, mean, rstd, s1, dscale, dshift);
        T* dxr = dx + b * a.dx_sb + n * a.dx_sn;
        if constexpr (std::is_same<T, float>::value) {
          std::copy(g, g + C, dxr);
        } else {
          store_row(g, dxr, C);
        }
      }
    }
  }
}

}  // namespace

void adaln_modulate_forward(const AdaLNModulateArgs& a) {
  switch (a.dtype) {
    case DType::Float32: forward_impl<float>(a); break;
    case DType::Float16: forward_impl<half_t>(a); break;
    case DType::BFloat16: forward_impl<bfloat16_t>(a); break;
  }
}

void adaln_modulate_backward(const AdaLNModulateBackwardArgs& a) {
  switch (a.dtype) {
    case DType::Float32: backward_impl<float>(a); break;
    case DType::Float16: backward_impl<half_t>(a); break;
    case DType::BFloat16: backward_impl<bfloat16_t>(a); break;
  }
}

}  // namespace cpu
}  // namespace medgen
