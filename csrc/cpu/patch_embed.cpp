// patch_embed and unpatchify on the CPU.
//
// patch_embed: tokens = patches(x) @ weight^T + bias + pos, one pass, tokens
// written once. The weight is packed once per call into float32 panels of kNR
// hidden columns, (K, kNR) each. OpenMP runs over blocks of tokens; a thread
// gathers its block's patch rows straight from x (any strides, any of the three
// dtypes) into a small packed float32 buffer, groups of kMR rows laid out
// (K, kMR), and multiplies each group by every panel in turn with a kMR x kNR
// register-blocked micro-kernel (6 x 16 floats: 12 AVX2 accumulators in the
// x86-64-v3 clone); the packed weight stays in L2. Group-major order walks the
// output rows and the positional-embedding rows front to back (panel-major
// order, 16 columns of many rows at a time, was ~1.5x slower at hidden 768
// with pos). The epilogue adds bias and positional embedding, rounding as the
// reference does: linear in x's dtype first, then + pos.
//
// unpatchify: a strided copy; OpenMP over output lines (b, s1, s2, s3), the
// last spatial axis innermost so the writes are sequential.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
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

// See gated_residual.cpp: an AVX2+FMA+F16C clone beside the baseline, picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define MEDGEN_PE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MEDGEN_PE_CLONES
#endif

constexpr int kMR = 6;    // token rows per micro-tile
constexpr int kNR = 16;   // hidden columns per micro-tile (two 8-float vectors)
constexpr int64_t kBlockBytes = 16384;  // packed patch rows of one token block: half an L1

// acc (kMR x kNR) = a (K x kMR, packed) @ w (K x kNR, packed panel). Fixed trip
// counts, so the compiler keeps acc in registers and vectorises along j.
MEDGEN_PE_CLONES void micro_kernel(const float* __restrict a, const float* __restrict w, int64_t K,
                                   float* __restrict acc) {
  float c[kMR][kNR];
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) c[i][j] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * kNR;
    const float* ak = a + k * kMR;
#pragma GCC unroll 6
    for (int i = 0; i < kMR; ++i) {
      const float ai = ak[i];
#pragma omp simd
      for (int j = 0; j < kNR; ++j) c[i][j] += ai * wk[j];
    }
  }
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i * kNR + j] = c[i][j];
}

// v rounded to T and back, as storing and reloading it would (vectorises like st/ld).
template <typename T>
inline float round_to(float v) {
  T t;
  st(&t, 0, v);
  return ld(&t, 0);
}
#if defined(__FLT16_MAX__)
template <>
inline float round_to<half_t>(float v) {
  return static_cast<float>(static_cast<_Float16>(v));
}
#endif

// One output row segment: out[j] = round(acc[j] + bias[j]) (+ pos[j], rounded again), j < n.
template <typename T>
MEDGEN_PE_CLONES void epilogue_row(const float* acc, const float* bias, const T* pos, T* out, int n) {
  if (pos) {
#pragma omp simd
    for (int j = 0; j < n; ++j) st(out, j, round_to<T>(acc[j] + bias[j]) + ld(pos, j));
  } else {
#pragma omp simd
    for (int j = 0; j < n; ++j) st(out, j, acc[j] + bias[j]);
  }
}

// Gathers tokens [m0, m0 + rows) into groups of kMR rows, each laid out (K, kMR);
// rows past the end are zero.
template <typename T>
void gather_block(const PatchEmbedArgs& a, const int64_t* col_off, int64_t m0, int64_t rows, float* buf,
                  int64_t* row_off) {
  const T* x = static_cast<const T*>(a.x);
  const int64_t K = a.K, groups = (rows + kMR - 1) / kMR;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r, b = m / a.N;
    int64_t t = m % a.N, off = b * a.x_sb;
    for (int d = kMaxPatchDims - 1; d >= 0; --d) {
      const int64_t g = t % a.grid[d];
      t /= a.grid[d];
      off += g * a.patch[d] * a.x_ss[d];
    }
    row_off[r] = off;
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* dst = buf + g * K * kMR;
    const int64_t valid = std::min<int64_t>(kMR, rows - g * kMR);
    for (int i = 0; i < kMR; ++i) {
      if (i >= valid) {
        for (int64_t k = 0; k < K; ++k) dst[k * kMR + i] = 0.f;
        continue;
      }
      const T* src = x + row_off[g * kMR + i];
      for (int64_t k = 0; k < K; ++k) dst[k * kMR + i] = ld(src, col_off[k]);
    }
  }
}

template <typename T>
void patch_embed_impl(const PatchEmbedArgs& a) {
  const int64_t K = a.K, H = a.hidden, M = a.B * a.N;
  const int64_t panels = (H + kNR - 1) / kNR;
  const T* weight = static_cast<const T*>(a.weight);

  // Weight panels: wp[p][k][j] = weight[p * kNR + j, k], zero past hidden.
  // Uninitialised (every entry is written below): no memset of a buffer the size of the weight.
  std::unique_ptr<float[]> wp(new float[static_cast<size_t>(panels * K * kNR)]);
#pragma omp parallel for schedule(static) num_threads(threads_for(panels * K * kNR, panels))
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t k = 0; k < K; ++k)
      for (int j = 0; j < kNR; ++j) {
        const int64_t h = p * kNR + j;
        wp[(p * K + k) * kNR + j] = h < H ? ld(weight, h * a.w_sh + k * a.w_sk) : 0.f;
      }
  }
  std::vector<float> bias(static_cast<size_t>(panels * kNR), 0.f);
  if (a.bias) {
    const T* bp = static_cast<const T*>(a.bias);
    for (int64_t h = 0; h < H; ++h) bias[h] = ld(bp, h * a.bias_s);
  }
  // Offset in x of patch entry k = (c, q1, .., q4), q4 fastest.
  std::vector<int64_t> col_off(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    int64_t q = k, off = 0;
    for (int d = kMaxPatchDims - 1; d >= 0; --d) {
      off += (q % a.patch[d]) * a.x_ss[d];
      q /= a.patch[d];
    }
    col_off[k] = off + q * a.x_sc;
  }

  // Token block: a multiple of kMR rows whose packed patches fill about kBlockBytes.
  const int64_t row_bytes = std::max<int64_t>(K, 1) * static_cast<int64_t>(sizeof(float));
  const int64_t block = std::max<int64_t>(kMR, std::min<int64_t>(16 * kMR, kBlockBytes / row_bytes / kMR * kMR));
  const int64_t n_blocks = (M + block - 1) / block;
  T* out = static_cast<T*>(a.out);
  const T* pos = static_cast<const T*>(a.pos);
  if (a.out_sn == H && a.out_sb == a.N * H) advise_huge_pages(out, M * H * static_cast<int64_t>(sizeof(T)));

  // Dynamic, one block at a time: on a shared machine a descheduled thread
  // should not hold half of the tokens (profiled under load with static
  // halves: a third of the samples were a thread waiting in the barrier).
#pragma omp parallel num_threads(threads_for(M * H * K, n_blocks, kGrainMacs))
  {
    std::unique_ptr<float[]> buf(new float[static_cast<size_t>(block * K)]);
    std::vector<int64_t> row_off(static_cast<size_t>(block));
    std::vector<T*> out_row(static_cast<size_t>(block));
    std::vector<const T*> pos_row(static_cast<size_t>(block));
    alignas(64) float acc[kMR * kNR];
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t m0 = blk * block, rows = std::min(block, M - m0);
      gather_block<T>(a, col_off.data(), m0, rows, buf.get(), row_off.data());
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = (m0 + r) / a.N, n = (m0 + r) % a.N;
        out_row[r] = out + b * a.out_sb + n * a.out_sn;
        pos_row[r] = pos ? pos + n * a.pos_sn : nullptr;
      }
      const int64_t groups = (rows + kMR - 1) / kMR;
      for (int64_t g = 0; g < groups; ++g) {
        const int valid = static_cast<int>(std::min<int64_t>(kMR, rows - g * kMR));
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t h0 = p * kNR;
          const int cols = static_cast<int>(std::min<int64_t>(kNR, H - h0));
          micro_kernel(buf.get() + g * K * kMR, wp.get() + p * K * kNR, K, acc);
          for (int i = 0; i < valid; ++i) {
            const int64_t r = g * kMR + i;
            epilogue_row<T>(acc + i * kNR, bias.data() + h0, pos ? pos_row[r] + h0 : nullptr, out_row[r] + h0,
                            cols);
          }
        }
      }
    }
  }
}

// ---- unpatchify ----------------------------------------------------------------------

// Elements move as raw bits: no conversion, so any of the three dtypes by its size.
// Parallel over (b, s1, s2, s3); per such line all channels: the reads are the
// line's tokens' features, P4 * C consecutive entries per token, and the
// writes C runs along the last spatial axis.
template <typename E>
void unpatchify_impl(const UnpatchifyArgs& a) {
  const E* tokens = static_cast<const E*>(a.tokens);
  E* out = static_cast<E*>(a.out);
  const int64_t* G = a.grid;
  const int64_t* P = a.patch;
  const int64_t S1 = G[0] * P[0], S2 = G[1] * P[1], S3 = G[2] * P[2];
  const int64_t lines = a.B * S1 * S2 * S3;
  const int64_t step_q = a.C * a.t_sf, os = a.o_ss[3];
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads_for(lines * a.C * G[3] * P[3], lines))
  for (int64_t line = 0; line < lines; ++line) {
    int64_t r = line;
    const int64_t s3 = r % S3;
    r /= S3;
    const int64_t s2 = r % S2;
    r /= S2;
    const int64_t s1 = r % S1;
    const int64_t b = r / S1;
    const int64_t token = ((s1 / P[0] * G[1] + s2 / P[1]) * G[2] + s3 / P[2]) * G[3];
    const int64_t feature = ((s1 % P[0] * P[1] + s2 % P[1]) * P[2] + s3 % P[2]) * P[3];
    const E* src_line = tokens + b * a.t_sb + token * a.t_sn + feature * a.C * a.t_sf;
    E* dst_line = out + b * a.o_sb + s1 * a.o_ss[0] + s2 * a.o_ss[1] + s3 * a.o_ss[2];
    for (int64_t c = 0; c < a.C; ++c) {
      const E* src = src_line + c * a.t_sf;
      E* dst = dst_line + c * a.o_sc;
      for (int64_t g4 = 0; g4 < G[3]; ++g4) {
        const E* s = src + g4 * a.t_sn;
        E* d = dst + g4 * P[3] * os;
        for (int64_t q4 = 0; q4 < P[3]; ++q4) d[q4 * os] = s[q4 * step_q];
      }
    }
  }
}

}  // namespace

void patch_embed_forward(const PatchEmbedArgs& a) {
  switch (a.dtype) {
    case DType::Float32: patch_embed_impl<float>(a); break;
    case DType::Float16: patch_embed_impl<half_t>(a); break;
    case DType::BFloat16: patch_embed_impl<bfloat16_t>(a); break;
    default: throw std::invalid_argument("patch_embed: unsupported dtype");
  }
}

void unpatchify(const UnpatchifyArgs& a) {
  switch (a.dtype) {
    case DType::Float32: unpatchify_impl<uint32_t>(a); break;
    case DType::Float16:
    case DType::BFloat16: unpatchify_impl<uint16_t>(a); break;
    default: throw std::invalid_argument("unpatchify: unsupported dtype");
  }
}

}  // namespace cpu
}  // namespace medgen
