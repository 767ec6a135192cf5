// attention on the CPU: flash-style forward (online softmax, never an N x N
// matrix) with optional qk-norm (LayerNorm over d) and rotate-half RoPE applied
// to q and k inside the op, all arithmetic in float32.
//
// Per (b, h) the keys are transformed once (norm, RoPE, rounded to the input
// dtype where the reference rounds) into a float32 scratch packed as strips of
// 16 keys, d-major inside a strip (strip[c][0..15]), so S = Q K^T is a broadcast
// of one q element times two 8-float vectors of keys; the values go to a float32
// scratch with the head dim padded to a multiple of 8. Then each job, one block
// of kBM queries of one (b, h), loads and transforms its queries (pre-scaled by
// log2(e) / sqrt(d), so the softmax is a power of two), and walks the keys in
// blocks of kBN: S by a 6 x 16 register-blocked micro-kernel, the running max
// and sum rescaled (online softmax, exp2 by a polynomial), O += P V by a 4 x 24
// register-blocked micro-kernel. OpenMP over jobs; the heads go in chunks so the
// scratch stays bounded.
//
// The hot loops are written with GCC vector extensions (8 floats) and compiled
// twice, an AVX2+FMA clone and a baseline one, picked at load time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>

#include "common/float_convert.h"
#include "cpu/parallel.h"
#include "ops.h"

namespace medgen {
namespace cpu {
namespace {

// See gated_residual.cpp: x86-64-v3 is tested as a feature level (AVX2, FMA, F16C).
// (A build may predefine MEDGEN_ATT_CLONES empty, e.g. to test the baseline code alone.)
#ifndef MEDGEN_ATT_CLONES
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define MEDGEN_ATT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MEDGEN_ATT_CLONES
#endif
#endif
#define MEDGEN_ATT_INLINE inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
// Unaligned, aliasing view of 8 floats for loads and stores.
typedef float vfu __attribute__((vector_size(32), aligned(4), may_alias));

constexpr int kLanes = 8;
constexpr int kStrip = 16;   // keys per packed strip: two vectors
// Queries per job (a multiple of kSR and kPR). Each job streams its head's whole packed
// K and V (8 MiB at N = 16384, d = 64), so the block sets the reuse of every key: with 48
// rows DiT-S/2's attention took 2.3 to 3.6 s from call to call on this 2-core VM (L3
// bandwidth shared with the neighbours), with 192 a steady 2.4-2.55 s (SDPA: 2.7-3.0 s).
constexpr int kBM = 192;
constexpr int kBN = 256;     // keys per block of the online softmax (a multiple of kStrip)
constexpr int kSR = 6;       // rows of the S micro-kernel
constexpr int kPR = 4;       // rows of the P V micro-kernel
constexpr int kPV = 3;       // vectors (of 8 output columns) of the P V micro-kernel
constexpr int kRowQuantum = 12;  // query blocks are multiples of kSR and kPR rows
static_assert(kBM % kRowQuantum == 0 && kRowQuantum % kSR == 0 && kRowQuantum % kPR == 0, "row blocking");
static_assert(kBN % kStrip == 0, "key blocks are whole strips");
constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kScratchBytes = int64_t{64} << 20;  // per chunk of heads (at least one head)

MEDGEN_ATT_INLINE void loadv(vf& v, const float* p) { v = *reinterpret_cast<const vfu*>(p); }
MEDGEN_ATT_INLINE void storev(float* p, const vf& v) { *reinterpret_cast<vfu*>(p) = v; }

// 2^x for x <= 0 (larger x are not needed: scores minus their running max).
// x = n + f, n = round(x), f in [-0.5, 0.5]; 2^f by the Cephes exp2f polynomial
// (relative error ~2e-7), 2^n through the exponent bits. Inputs below -126.5 are
// clamped there (2^-126.5: nothing beside the row maximum's 1).
MEDGEN_ATT_INLINE void exp2_inplace(vf& x) {
  const vf lo = vf{} - 126.5f;
  x = x < lo ? lo : x;
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x + magic;
  const vf n = t - magic;
  const vf f = x - n;
  vf p = vf{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  // t's low mantissa bits hold n + 2^22 (+ 0x4B400000 as a float's bits).
  const vi e = (((vi)t - 0x4B400000) + 127) << 23;
  x = p * (vf)e;
}

MEDGEN_ATT_INLINE float hmax(const vf& v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

MEDGEN_ATT_INLINE float hsum(const vf& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// s[r][0..15] = q[r] . strip keys, for MR rows of q (ld D) against one packed strip.
template <int MR>
MEDGEN_ATT_INLINE void s_tile(const float* __restrict q, int D, const float* __restrict strip,
                              float* __restrict s, int lds) {
  vf acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = vf{};
  for (int c = 0; c < D; ++c) {
    vf k0, k1;
    loadv(k0, strip + c * kStrip);
    loadv(k1, strip + c * kStrip + kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float a = q[r * D + c];
      acc[r][0] += a * k0;
      acc[r][1] += a * k1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    storev(s + r * lds, acc[r][0]);
    storev(s + r * lds + kLanes, acc[r][1]);
  }
}

// o[r][0..8 NV) = alpha[r] * o[r] + sum_j p[r][j] v[j], for MR rows and NV vectors of columns.
template <int MR, int NV>
MEDGEN_ATT_INLINE void pv_tile(const float* __restrict p, int ldp, const float* __restrict v, int ldv, int J,
                               float* __restrict o, int ldo, const float* __restrict alpha) {
  vf acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) {
      loadv(acc[r][t], o + r * ldo + t * kLanes);
      acc[r][t] *= alpha[r];
    }
  }
  for (int j = 0; j < J; ++j) {
    vf vv[NV];
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) loadv(vv[t], v + j * ldv + t * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float a = p[r * ldp + j];
#pragma GCC unroll 4
      for (int t = 0; t < NV; ++t) acc[r][t] += a * vv[t];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int t = 0; t < NV; ++t) storev(o + r * ldo + t * kLanes, acc[r][t]);
  }
}

// Online-softmax step for one row of scores (ncols a multiple of 16, padded columns
// already -inf): p = 2^(s - m_new) in place; returns alpha = 2^(m_old - m_new).
MEDGEN_ATT_INLINE float softmax_row(float* __restrict s, int ncols, float& m, float& l) {
  vf mx = vf{} + m;
  for (int j = 0; j < ncols; j += kLanes) {
    vf x;
    loadv(x, s + j);
    mx = x > mx ? x : mx;
  }
  const float m_new = hmax(mx);
  const float alpha = std::exp2(m - m_new);  // 0 on the first block (m = -inf)
  vf sum = vf{};
  for (int j = 0; j < ncols; j += kLanes) {
    vf x;
    loadv(x, s + j);
    x -= m_new;
    exp2_inplace(x);
    storev(s + j, x);
    sum += x;
  }
  l = l * alpha + hsum(sum);
  m = m_new;
  return alpha;
}

// One job: bm (a multiple of kRowQuantum, at most kBM) transformed, pre-scaled queries
// (rows beyond the valid ones are zero) against all N keys of one head. o (bm x dp)
// and l (bm) out, unnormalised.
MEDGEN_ATT_CLONES void attend_block(const float* qs, int bm, int D, int dp, const float* kp, const float* vs,
                                    int64_t N, float* s, float* o, float* m, float* l, float* alpha) {
  for (int i = 0; i < bm * dp; ++i) o[i] = 0.f;
  for (int i = 0; i < bm; ++i) {
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.f;
  }
  const int nvec = dp / kLanes;
  for (int64_t k0 = 0; k0 < N; k0 += kBN) {
    const int nvalid = static_cast<int>(std::min<int64_t>(kBN, N - k0));
    const int nstrips = (nvalid + kStrip - 1) / kStrip;
    const int ncols = nstrips * kStrip;
    const float* kblock = kp + (k0 / kStrip) * D * kStrip;
    for (int st = 0; st < nstrips; ++st) {
      const float* strip = kblock + st * D * kStrip;
      for (int r0 = 0; r0 < bm; r0 += kSR) s_tile<kSR>(qs + r0 * D, D, strip, s + r0 * kBN + st * kStrip, kBN);
    }
    if (ncols != nvalid) {
      for (int i = 0; i < bm; ++i)
        for (int j = nvalid; j < ncols; ++j) s[i * kBN + j] = -std::numeric_limits<float>::infinity();
    }
    for (int i = 0; i < bm; ++i) alpha[i] = softmax_row(s + i * kBN, ncols, m[i], l[i]);
    const float* vblock = vs + k0 * dp;
    for (int r0 = 0; r0 < bm; r0 += kPR) {
      const float* p = s + r0 * kBN;
      float* orow = o + r0 * dp;
      int t = 0;
      for (; t + kPV <= nvec; t += kPV)
        pv_tile<kPR, kPV>(p, kBN, vblock + t * kLanes, dp, nvalid, orow + t * kLanes, dp, alpha + r0);
      if (nvec - t == 2) pv_tile<kPR, 2>(p, kBN, vblock + t * kLanes, dp, nvalid, orow + t * kLanes, dp, alpha + r0);
      if (nvec - t == 1) pv_tile<kPR, 1>(p, kBN, vblock + t * kLanes, dp, nvalid, orow + t * kLanes, dp, alpha + r0);
    }
  }
}

// ---- loading and transforming rows ------------------------------------------------

// float32 -> the input dtype -> float32: where the reference holds an intermediate in T.
template <typename T> inline float round_to(float x) { return to_float(from_float<T>(x)); }
template <> inline float round_to<float>(float x) { return x; }

struct RowTransform {
  const float* w;     // LayerNorm weight (D,) or null
  const float* b;     // LayerNorm bias (D,) or null
  float eps;
  bool norm;
  const float* cos;   // (N, D) tables or null
  const float* sin;
};

// x (D elements, stride sd) -> y float32: LayerNorm (statistics in float32), RoPE,
// each rounded to T as the reference does, then times `scale`.
template <typename T>
void transform_row(const T* x, int64_t sd, int D, const RowTransform& tf, int64_t n, float scale, float* y,
                   float* tmp) {
  for (int c = 0; c < D; ++c) y[c] = to_float(x[c * sd]);
  if (tf.norm) {
    float sum = 0.f;
    for (int c = 0; c < D; ++c) sum += y[c];
    const float mean = sum / static_cast<float>(D);
    float var = 0.f;
    for (int c = 0; c < D; ++c) var += (y[c] - mean) * (y[c] - mean);
    const float rstd = 1.f / std::sqrt(var / static_cast<float>(D) + tf.eps);
    for (int c = 0; c < D; ++c) {
      float v = (y[c] - mean) * rstd;
      if (tf.w) v *= tf.w[c];
      if (tf.b) v += tf.b[c];
      y[c] = round_to<T>(v);
    }
  }
  if (tf.cos) {
    const int h = D / 2;
    const float* cs = tf.cos + n * D;
    const float* sn = tf.sin + n * D;
    for (int c = 0; c < D; ++c) tmp[c] = y[c];
    for (int c = 0; c < h; ++c) y[c] = round_to<T>(tmp[c] * cs[c] - tmp[c + h] * sn[c]);
    for (int c = h; c < D; ++c) y[c] = round_to<T>(tmp[c] * cs[c] + tmp[c - h] * sn[c]);
  }
  if (scale != 1.f)
    for (int c = 0; c < D; ++c) y[c] *= scale;
}

struct AlignedFloats {
  float* p = nullptr;
  explicit AlignedFloats(int64_t n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float) + 63) / 64 * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~AlignedFloats() { std::free(p); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

template <typename T>
void attention_impl(const AttentionArgs& a) {
  const int64_t B = a.B, H = a.H, N = a.N;
  const int D = static_cast<int>(a.D);
  const int dp = (D + kLanes - 1) / kLanes * kLanes;
  const int64_t nstrips = (N + kStrip - 1) / kStrip;
  const int64_t npad = nstrips * kStrip;
  const int64_t kp_floats = nstrips * D * kStrip;  // packed keys of one head
  const int64_t vs_floats = npad * dp;             // padded values of one head
  const int64_t head_floats = kp_floats + vs_floats;
  const int64_t heads = B * H;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(heads, kScratchBytes / (head_floats * 4)));
  // As few blocks as kBM allows, of equal size rounded up to whole micro-kernel rows
  // (N = 64: two blocks of 36, not 48 + 16 padded to 48).
  const int64_t nblk = (N + kBM - 1) / kBM;
  const int bm = static_cast<int>(((N + nblk - 1) / nblk + kRowQuantum - 1) / kRowQuantum * kRowQuantum);
  const int64_t qblocks = (N + bm - 1) / bm;
  const RowTransform qtf{a.q_w, a.q_b, a.q_eps, a.q_norm != 0, a.cos, a.sin};
  const RowTransform ktf{a.k_w, a.k_b, a.k_eps, a.k_norm != 0, a.cos, a.sin};
  const float qscale = a.scale * kLog2e;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);

  // Per-thread work areas (64-byte aligned pieces), allocated here so nothing inside
  // the parallel region can throw.
  auto round16 = [](int64_t n) { return (n + 15) / 16 * 16; };
  const int64_t w_row = round16(2 * D), w_qs = round16(kBM * D), w_s = round16(kBM * kBN);
  const int64_t w_o = round16(kBM * dp), w_stats = round16(3 * kBM);
  const int64_t w_thread = w_row + w_qs + w_s + w_o + w_stats;
  // Keys and values are packed once per head (N rows), then every query block scans them.
  const int threads = threads_for(heads * N * (N + 1) * D, heads * qblocks, kGrainMacs);
  AlignedFloats work(threads * w_thread);
  AlignedFloats scratch(chunk * head_floats);
  for (int64_t h0 = 0; h0 < heads; h0 += chunk) {
    const int64_t nh = std::min(chunk, heads - h0);
#pragma omp parallel num_threads(threads)
    {
      float* const mine = work.p + thread_index() * w_thread;
      float* const row = mine;  // 2 D: one transformed row and its RoPE temporary
      float* const qs = row + w_row;
      float* const s = qs + w_qs;
      float* const o = s + w_s;
      float* const stats = o + w_o;  // m, l, alpha
      // 1. keys (transformed, packed in strips) and values (padded) of the chunk's heads.
#pragma omp for schedule(static)
      for (int64_t job = 0; job < nh * nstrips; ++job) {
        const int64_t hh = job / nstrips, st = job % nstrips;
        const int64_t bh = h0 + hh, b = bh / H, h = bh % H;
        float* kp = scratch.p + hh * head_floats + st * D * kStrip;
        float* vs = scratch.p + hh * head_floats + kp_floats + st * kStrip * dp;
        for (int jj = 0; jj < kStrip; ++jj) {
          const int64_t n = st * kStrip + jj;
          float* vrow = vs + jj * dp;
          if (n >= N) {
            for (int c = 0; c < D; ++c) kp[c * kStrip + jj] = 0.f;
            for (int c = 0; c < dp; ++c) vrow[c] = 0.f;
            continue;
          }
          transform_row<T>(k + b * a.k_sb + h * a.k_sh + n * a.k_sn, a.k_sd, D, ktf, n, 1.f, row, row + D);
          for (int c = 0; c < D; ++c) kp[c * kStrip + jj] = row[c];
          const T* vsrc = v + b * a.v_sb + h * a.v_sh + n * a.v_sn;
          for (int c = 0; c < D; ++c) vrow[c] = to_float(vsrc[c * a.v_sd]);
          for (int c = D; c < dp; ++c) vrow[c] = 0.f;
        }
      }
      // 2. query blocks (implicit barrier above: the scratch is complete).
#pragma omp for schedule(dynamic, 1)
      for (int64_t job = 0; job < nh * qblocks; ++job) {
        const int64_t hh = job / qblocks, qb = job % qblocks;
        const int64_t bh = h0 + hh, b = bh / H, h = bh % H;
        const int64_t n0 = qb * bm;
        const int rows = static_cast<int>(std::min<int64_t>(bm, N - n0));
        for (int i = 0; i < rows; ++i)
          transform_row<T>(q + b * a.q_sb + h * a.q_sh + (n0 + i) * a.q_sn, a.q_sd, D, qtf, n0 + i, qscale,
                           qs + i * D, row);
        for (int i = rows * D; i < bm * D; ++i) qs[i] = 0.f;
        const float* kp = scratch.p + hh * head_floats;
        attend_block(qs, bm, D, dp, kp, kp + kp_floats, N, s, o, stats, stats + kBM, stats + 2 * kBM);
        for (int i = 0; i < rows; ++i) {
          const float inv = 1.f / stats[kBM + i];
          const float* orow = o + i * dp;
          T* dst = out + b * a.out_sb + h * a.out_sh + (n0 + i) * a.out_sn;
          for (int c = 0; c < D; ++c) dst[c] = from_float<T>(orow[c] * inv);
        }
      }
    }
  }
}

}  // namespace

void attention_forward(const AttentionArgs& a) {
  if (a.B * a.H * a.N == 0 || a.D == 0) return;
  if (a.D > kMaxAttentionHeadDim) throw std::invalid_argument("attention: head dim above 128");
  switch (a.dtype) {
    case DType::Float32: attention_impl<float>(a); break;
    case DType::Float16: attention_impl<half_t>(a); break;
    case DType::BFloat16: attention_impl<bfloat16_t>(a); break;
    default: throw std::invalid_argument("attention: unsupported dtype");
  }
}

}  // namespace cpu
}  // namespace medgen
