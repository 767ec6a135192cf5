// adaln_modulate on the CPU: y = LayerNorm(x) * (1 + scale[b]) + shift[b]
// (no affine, fp32 statistics). OpenMP over rows; the inner loops run on a
// float32 copy of the row so the compiler vectorises them for every dtype.
#include <algorithm>
#include <cmath>
#include <vector>

#ifdef MEDGEN_WITH_OPENMP
#include <omp.h>
#endif

#include "common/float_convert.h"
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

// Two-pass mean / variance over a float row: stable when |mean| >> std.
inline void row_stats(const float* x, int64_t C, float eps, float* mean_out, float* rstd_out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += x[c];
  const float mean = sum / static_cast<float>(C);
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < C; ++c) {
    const float d = x[c] - mean;
    sq += d * d;
  }
  *mean_out = mean;
  *rstd_out = 1.0f / std::sqrt(sq / static_cast<float>(C) + eps);
}

template <typename T>
void forward_impl(const AdaLNArgs& a) {
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

#pragma omp parallel
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
      load_row(xr, row, C);
      float mean, rstd;
      row_stats(row, C, a.eps, &mean, &rstd);
      if (a.mean) a.mean[r] = mean;
      if (a.rstd) a.rstd[r] = rstd;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) row[c] = (row[c] - mean) * rstd * s1[c] + sh[c];
      if constexpr (std::is_same<T, float>::value) {
        std::copy(row, row + C, yr);
      } else {
        store_row(row, yr, C);
      }
    }
  }
}

template <typename T>
void backward_impl(const AdaLNBackwardArgs& a) {
  const int64_t B = a.B, N = a.N, C = a.C, chunks = a.n_chunks;
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  const T* dy = reinterpret_cast<const T*>(a.dy);
  const T* x = reinterpret_cast<const T*>(a.x);
  const T* scale = reinterpret_cast<const T*>(a.scale);
  T* dx = reinterpret_cast<T*>(a.dx);

#pragma omp parallel
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
        float sum_g = 0.f, sum_gx = 0.f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
        for (int64_t c = 0; c < C; ++c) {
          const float xhat = (xh[c] - mean) * rstd;
          const float d = g[c];
          dscale[c] += d * xhat;
          dshift[c] += d;
          xh[c] = xhat;
          g[c] = d * s1[c];
          sum_g += g[c];
          sum_gx += g[c] * xhat;
        }
        const float mg = sum_g / static_cast<float>(C), mgx = sum_gx / static_cast<float>(C);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) g[c] = rstd * (g[c] - mg - xh[c] * mgx);
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

void adaln_modulate_forward(const AdaLNArgs& a) {
  switch (a.dtype) {
    case DType::Float32: forward_impl<float>(a); break;
    case DType::Float16: forward_impl<half_t>(a); break;
    case DType::BFloat16: forward_impl<bfloat16_t>(a); break;
  }
}

void adaln_modulate_backward(const AdaLNBackwardArgs& a) {
  switch (a.dtype) {
    case DType::Float32: backward_impl<float>(a); break;
    case DType::Float16: backward_impl<half_t>(a); break;
    case DType::BFloat16: backward_impl<bfloat16_t>(a); break;
  }
}

int max_threads() {
#ifdef MEDGEN_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace medgen
