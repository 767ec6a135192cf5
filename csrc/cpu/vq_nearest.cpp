// vq_nearest on the CPU: for each row z_n the k minimising
// d_k = |c_k|^2 - 2 z_n.c_k, ties to the lowest k; never more than one
// distance per (row, 8 codebook entries) alive at a time.
//
// Same numbers as the reference: MKL's sgemm, for the chunk sizes the reference
// uses, accumulates z.c sequentially over d with fused multiply-adds from 0 and
// then adds alpha * acc + beta * C (alpha = -2 is exact, so one rounding). We
// accumulate in the same order with FMA and add |c|^2 computed by the caller
// with torch, so the distances, and with them the argmins, agree bit for bit.
//
// Layout: the codebook comes transposed, (D, K), so 8 consecutive entries of
// one dimension are one 256-bit load; the codebook is walked in tiles that
// stay in L1 while a block of rows is scanned against them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MEDGEN_VQ_X86 1
#endif

#include "common/float_convert.h"
#include "cpu/parallel.h"
#include "ops.h"

namespace medgen {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 64;       // rows scanned against one codebook tile
constexpr int64_t kTileBytes = 16384;   // codebook tile: half of a 32 KiB L1

template <typename T>
void load_z(const VQNearestArgs& a, int64_t n, float* zf) {
  const T* z = static_cast<const T*>(a.z) + n * a.z_sn;
  for (int64_t d = 0; d < a.D; ++d) zf[d] = to_float(z[d * a.z_sd]);
}

void load_z_any(const VQNearestArgs& a, int64_t n, float* zf) {
  switch (a.z_dtype) {
    case DType::Float32: load_z<float>(a, n, zf); break;
    case DType::Float16: load_z<half_t>(a, n, zf); break;
    case DType::BFloat16: load_z<bfloat16_t>(a, n, zf); break;
    default: throw std::invalid_argument("vq_nearest: z must be a float tensor");
  }
}

// ---- portable scalar path ---------------------------------------------------
// Multiply-add as the hardware's BLAS does it: fused where the target has FMA.
inline float madd(float a, float b, float c) {
#if defined(FP_FAST_FMAF)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Exact reference semantics for one row, NaN included: torch's min returns the
// first NaN when a row has one, else the first minimum.
template <typename MAdd>
int64_t scan_row_exact(const VQNearestArgs& a, const float* zf, MAdd madd_fn) {
  float best = std::numeric_limits<float>::infinity();
  int64_t best_k = 0;
  for (int64_t k = 0; k < a.K; ++k) {
    float acc = 0.f;
    for (int64_t d = 0; d < a.D; ++d) acc = madd_fn(zf[d], a.cb_t[d * a.K + k], acc);
    const float dist = madd_fn(-2.f, acc, a.cb_sq[k]);
    if (std::isnan(dist)) return k;
    if (dist < best) {
      best = dist;
      best_k = k;
    }
  }
  return best_k;
}

void vq_scalar(const VQNearestArgs& a) {
#pragma omp parallel num_threads(threads_for(a.N * a.K * a.D, a.N, kGrainMacs))
  {
    std::vector<float> zf(static_cast<size_t>(a.D));
#pragma omp for schedule(dynamic, 16)
    for (int64_t n = 0; n < a.N; ++n) {
      load_z_any(a, n, zf.data());
      a.indices[n] = scan_row_exact(a, zf.data(), madd);
    }
  }
}

#ifdef MEDGEN_VQ_X86
// ---- AVX2 + FMA path ----------------------------------------------------------

__attribute__((target("avx2,fma"))) inline float fma1(float a, float b, float c) {
  return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

// Per-row running state across codebook tiles: per lane the best distance, its
// index, and whether any distance was NaN (then the row is redone exactly).
struct alignas(32) LaneState {
  float best[8];
  int32_t idx[8];
  int32_t nan[8];
};

// Scans entries [k0, k1) (k1 - k0 a multiple of 8) for one row. DT > 0 fixes D
// at compile time so the broadcast z values live in registers.
template <int DT>
__attribute__((target("avx2,fma"))) void scan_tile(const VQNearestArgs& a, const float* zf, int64_t k0, int64_t k1,
                                                    LaneState* st) {
  const int64_t D = DT > 0 ? DT : a.D, K = a.K;
  __m256 zb[DT > 0 ? DT : 1];
  if (DT > 0)
    for (int d = 0; d < DT; ++d) zb[d] = _mm256_set1_ps(zf[d]);
  const __m256 minus2 = _mm256_set1_ps(-2.f);
  __m256 best = _mm256_load_ps(st->best);
  __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(st->idx));
  __m256 nan = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(st->nan)));
  __m256i cur = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(k0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i step = _mm256_set1_epi32(8);
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 acc = _mm256_setzero_ps();
    if (DT > 0) {
      for (int d = 0; d < DT; ++d) acc = _mm256_fmadd_ps(zb[d], _mm256_loadu_ps(a.cb_t + d * K + k), acc);
    } else {
      for (int64_t d = 0; d < D; ++d)
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(zf + d), _mm256_loadu_ps(a.cb_t + d * K + k), acc);
    }
    const __m256 dist = _mm256_fmadd_ps(minus2, acc, _mm256_loadu_ps(a.cb_sq + k));
    // Strict less: an equal distance later in the lane keeps the earlier index.
    const __m256 lt = _mm256_cmp_ps(dist, best, _CMP_LT_OQ);
    best = _mm256_blendv_ps(best, dist, lt);
    idx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(idx), _mm256_castsi256_ps(cur), lt));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(dist, dist, _CMP_UNORD_Q));
    cur = _mm256_add_epi32(cur, step);
  }
  _mm256_store_ps(st->best, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(st->idx), idx);
  _mm256_store_si256(reinterpret_cast<__m256i*>(st->nan), _mm256_castps_si256(nan));
}

template <int DT>
__attribute__((target("avx2,fma"))) void vq_avx2(const VQNearestArgs& a) {
  const int64_t K = a.K, D = a.D;
  const int64_t k_vec = K / 8 * 8;  // entries the vector loop covers; the rest is a scalar tail
  const int64_t tile = std::max<int64_t>(8, kTileBytes / static_cast<int64_t>(sizeof(float) * (D + 1)) / 8 * 8);
  const int64_t n_blocks = (a.N + kRowBlock - 1) / kRowBlock;
  auto fma_scalar = [](float x, float y, float z) { return fma1(x, y, z); };

#pragma omp parallel num_threads(threads_for(a.N * K * D, n_blocks, kGrainMacs))
  {
    std::vector<float> zbuf(static_cast<size_t>(kRowBlock * D));
    std::vector<LaneState> state(kRowBlock);
    // Dynamic: blocks are uniform, but on a shared machine a descheduled thread
    // should not hold half of the rows.
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t n0 = blk * kRowBlock, rows = std::min(kRowBlock, a.N - n0);
      for (int64_t r = 0; r < rows; ++r) {
        load_z_any(a, n0 + r, zbuf.data() + r * D);
        LaneState& s = state[r];
        for (int j = 0; j < 8; ++j) {
          // Lane j starts at index j with +inf: if no distance beats +inf (all
          // +inf), the lowest index wins, as in torch.
          s.best[j] = std::numeric_limits<float>::infinity();
          s.idx[j] = j;
          s.nan[j] = 0;
        }
      }
      for (int64_t k0 = 0; k0 < k_vec; k0 += tile) {
        const int64_t k1 = std::min(k_vec, k0 + tile);
        for (int64_t r = 0; r < rows; ++r) scan_tile<DT>(a, zbuf.data() + r * D, k0, k1, &state[r]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const LaneState& s = state[r];
        const float* zf = zbuf.data() + r * D;
        bool saw_nan = false;
        float best = std::numeric_limits<float>::infinity();
        int64_t best_k = 0;
        if (k_vec > 0) {
          best = s.best[0];
          best_k = s.idx[0];
          for (int j = 0; j < 8; ++j) {
            saw_nan |= s.nan[j] != 0;
            // Lowest index among the lanes holding the minimum.
            if (s.best[j] < best || (s.best[j] == best && s.idx[j] < best_k)) {
              best = s.best[j];
              best_k = s.idx[j];
            }
          }
        }
        for (int64_t k = k_vec; k < K && !saw_nan; ++k) {
          float acc = 0.f;
          for (int64_t d = 0; d < D; ++d) acc = fma1(zf[d], a.cb_t[d * K + k], acc);
          const float dist = fma1(-2.f, acc, a.cb_sq[k]);
          if (std::isnan(dist)) saw_nan = true;
          else if (dist < best) {
            best = dist;
            best_k = k;
          }
        }
        a.indices[n0 + r] = saw_nan ? scan_row_exact(a, zf, fma_scalar) : best_k;
      }
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif  // MEDGEN_VQ_X86

}  // namespace

void vq_nearest(const VQNearestArgs& a) {
#ifdef MEDGEN_VQ_X86
  if (cpu_has_avx2_fma()) {
    switch (a.D) {
      case 4: return vq_avx2<4>(a);
      case 8: return vq_avx2<8>(a);
      case 16: return vq_avx2<16>(a);
      default: return vq_avx2<0>(a);
    }
  }
#endif
  vq_scalar(a);
}

}  // namespace cpu
}  // namespace medgen
