// tile_blend on the CPU: dst += w * src over a strided box, in place, with no
// temporaries (the reference converts the tile and multiplies by the weight
// into fresh buffers first). The bindings coalesce dimensions, so the last one
// is usually long and contiguous; OpenMP splits the outer positions.
#include <algorithm>
#include <type_traits>

#include "common/float_convert.h"
#include "cpu/fast_convert.h"
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
#define MEDGEN_TB_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MEDGEN_TB_CLONES
#endif

// Contiguous inner runs, the common case: vectorised.
template <typename T>
MEDGEN_TB_CLONES void run_contiguous(float* dst, const T* src, const float* w, int64_t n) {
  if (src && w) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] += w[i] * ld(src, i);
  } else if (src) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] += ld(src, i);
  } else if (w) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] += w[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] += 1.0f;
  }
}

template <typename T>
void run_strided(float* dst, int64_t ds, const T* src, int64_t ss, const float* w, int64_t ws, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = src ? ld(src, i * ss) : 1.0f;
    dst[i * ds] += w ? w[i * ws] * v : v;
  }
}

template <typename T>
void tile_blend_impl(const TileBlendArgs& a) {
  const int nd = a.ndim;
  const int64_t inner = a.shape[nd - 1];
  int64_t outer = 1;
  for (int i = 0; i < nd - 1; ++i) outer *= a.shape[i];
  const T* src = static_cast<const T*>(a.src);
  const int64_t ds = a.dst_st[nd - 1], ss = src ? a.src_st[nd - 1] : 0, ws = a.w ? a.w_st[nd - 1] : 0;
  const bool contiguous = ds == 1 && (!src || ss == 1) && (!a.w || ws == 1);
#pragma omp parallel for schedule(static) num_threads(threads_for(outer * inner, outer))
  for (int64_t o = 0; o < outer; ++o) {
    // Offsets of this outer position (row-major over the outer dims).
    int64_t rem = o, d_off = 0, s_off = 0, w_off = 0;
    for (int i = nd - 2; i >= 0; --i) {
      const int64_t idx = rem % a.shape[i];
      rem /= a.shape[i];
      d_off += idx * a.dst_st[i];
      s_off += idx * a.src_st[i];
      w_off += idx * a.w_st[i];
    }
    float* d = a.dst + d_off;
    const T* s = src ? src + s_off : nullptr;
    const float* w = a.w ? a.w + w_off : nullptr;
    if (contiguous) run_contiguous<T>(d, s, w, inner);
    else run_strided<T>(d, ds, s, ss, w, ws, inner);
  }
}

MEDGEN_TB_CLONES void normalize_run(float* out, const float* w, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] > 0.f ? out[i] / w[i] : out[i];
}

}  // namespace

// One pass, in place, no temporaries (the reference builds a mask and a divisor volume
// first). Voxel ranges split across threads; each walks every plane over its range, so
// the weights it reads stay in its cache.
void tile_normalize(const TileNormalizeArgs& a) {
  constexpr int64_t kRange = 1 << 14;
  const int64_t ranges = (a.voxels + kRange - 1) / kRange;
#pragma omp parallel for schedule(static) num_threads(threads_for(a.planes * a.voxels, ranges))
  for (int64_t r = 0; r < ranges; ++r) {
    const int64_t i0 = r * kRange, n = std::min(kRange, a.voxels - i0);
    for (int64_t p = 0; p < a.planes; ++p) normalize_run(a.out + p * a.voxels + i0, a.w + i0, n);
  }
}

void tile_blend_accumulate(const TileBlendArgs& a) {
  switch (a.src_dtype) {
    case DType::Float32: tile_blend_impl<float>(a); break;
    case DType::Float16: tile_blend_impl<half_t>(a); break;
    case DType::BFloat16: tile_blend_impl<bfloat16_t>(a); break;
    default: throw std::invalid_argument("tile_blend: the tile must be a float tensor");
  }
}

}  // namespace cpu
}  // namespace medgen
