// attention on CUDA: a plain flash-style forward (online softmax in float32,
// never an N x N buffer), with optional qk-norm and RoPE applied to q and k
// inside the kernel, the same arithmetic as the CPU kernel (csrc/cpu/attention.cpp).
//
// One CTA of 4 warps per (block of kBM = 32 queries, b * H + h). Each warp owns 8
// query rows for the whole kernel; a lane owns the head-dim columns
// lane + 32 t (t < NT = ceil(D / 32)), so qk-norm statistics are warp sums and the
// output accumulator of a row is NT registers per lane. Per block of BN keys: the
// warps load and transform the keys (norm, RoPE) and values into shared memory,
// S = Q K^T is computed from shared memory (one score per thread at a time), each
// warp runs the online-softmax step on its rows (one key per lane) and then adds
// P V to its accumulators. Queries are pre-scaled by log2(e) / sqrt(D), so the
// softmax is exp2f. No tensor cores: simple and exact in float32.
#include <math_constants.h>

#include "common.cuh"
#include "ops.h"

namespace medgen {
namespace cuda {
namespace {

constexpr int kBM = 32;       // queries per CTA
constexpr int kWarps = 4;     // kBM / kWarps = 8 rows per warp
constexpr int kRowsPerWarp = kBM / kWarps;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// float32 -> T -> float32: where the reference holds an intermediate in the input dtype.
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_f(from_f<T>(x)); }

struct Transform {
  int norm;
  const float* w;
  const float* b;
  float eps;
  const float* cos;  // (N, D) or null
  const float* sin;
};

// One row, held by a warp as x[t] = element lane + 32 t (0 beyond D): LayerNorm, then
// RoPE (its partner elements go through the row's shared-memory slot `srow`), each
// rounded to T; the result times `scale` is written to srow[0, 32 NT) (0 beyond D).
// Called by all 32 lanes of a warp together.
template <typename T, int NT>
__device__ __forceinline__ void transform_row(float (&x)[NT], float* srow, int D, int64_t n, const Transform& tf,
                                              float scale) {
  const int lane = threadIdx.x & 31;
  if (tf.norm) {
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) sum += x[t];  // zeros beyond D
    const float mean = warp_sum(sum) / static_cast<float>(D);
    float var = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c = lane + 32 * t;
      const float dv = c < D ? x[t] - mean : 0.f;
      var += dv * dv;
    }
    const float rstd = 1.f / sqrtf(warp_sum(var) / static_cast<float>(D) + tf.eps);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c = lane + 32 * t;
      if (c < D) {
        float v = (x[t] - mean) * rstd;
        if (tf.w) v *= tf.w[c];
        if (tf.b) v += tf.b[c];
        x[t] = round_to<T>(v);
      }
    }
  }
  if (tf.cos) {
    const int h = D / 2;
    const float* cs = tf.cos + n * D;
    const float* sn = tf.sin + n * D;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c = lane + 32 * t;
      if (c < D) srow[c] = x[t];
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c = lane + 32 * t;
      if (c < D) {
        const float partner = c < h ? -srow[c + h] : srow[c - h];
        x[t] = round_to<T>(x[t] * cs[c] + partner * sn[c]);
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int c = lane + 32 * t;
    srow[c] = c < D ? x[t] * scale : 0.f;
  }
}

template <typename T, int NT>
__device__ __forceinline__ void load_row(float (&x)[NT], const T* src, int64_t sd, int D) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int c = lane + 32 * t;
    x[t] = c < D ? to_f(src[c * sd]) : 0.f;
  }
}

// BN keys per block: 32, or 16 for NT = 4 so the static shared memory stays under 48 KiB.
template <typename T, int NT, int BN>
__global__ void __launch_bounds__(kThreads) attention_kernel(AttentionArgs a) {
  constexpr int DP = 32 * NT;
  __shared__ float qs[kBM * DP];
  __shared__ float ks[BN * (DP + 1)];  // +1: the score loop reads rows of ks across lanes
  __shared__ float vs[BN * DP];
  __shared__ float ss[kBM * (BN + 1)];

  const int D = static_cast<int>(a.D);
  const int64_t N = a.N;
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + h * a.q_sh;
  const T* k = static_cast<const T*>(a.k) + b * a.k_sb + h * a.k_sh;
  const T* v = static_cast<const T*>(a.v) + b * a.v_sb + h * a.v_sh;
  const Transform qtf{a.q_norm, a.q_w, a.q_b, a.q_eps, a.cos, a.sin};
  const Transform ktf{a.k_norm, a.k_w, a.k_b, a.k_eps, a.cos, a.sin};

  // Queries of this warp's rows, transformed and scaled; rows past N are zero.
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = warp * kRowsPerWarp + r;
    const int64_t n = n0 + i;
    float* srow = qs + i * DP;
    if (n < N) {
      float x[NT];
      load_row<T, NT>(x, q + n * a.q_sn, a.q_sd, D);
      transform_row<T, NT>(x, srow, D, n, qtf, a.scale * kLog2e);
    } else {
#pragma unroll
      for (int t = 0; t < NT; ++t) srow[lane + 32 * t] = 0.f;
    }
  }

  float o[kRowsPerWarp][NT];
  float m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -CUDART_INF_F;
    l[r] = 0.f;
#pragma unroll
    for (int t = 0; t < NT; ++t) o[r][t] = 0.f;
  }

  for (int64_t k0 = 0; k0 < N; k0 += BN) {
    __syncthreads();  // the previous block's ks, vs, ss are no longer read (and qs is complete)
    for (int j = warp; j < BN; j += kWarps) {
      const int64_t n = k0 + j;
      float* krow = ks + j * (DP + 1);
      float* vrow = vs + j * DP;
      if (n < N) {
        float x[NT];
        load_row<T, NT>(x, k + n * a.k_sn, a.k_sd, D);
        transform_row<T, NT>(x, krow, D, n, ktf, 1.f);
        load_row<T, NT>(x, v + n * a.v_sn, a.v_sd, D);
#pragma unroll
        for (int t = 0; t < NT; ++t) vrow[lane + 32 * t] = x[t];
      } else {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          krow[lane + 32 * t] = 0.f;
          vrow[lane + 32 * t] = 0.f;
        }
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kBM * BN; e += kThreads) {
      const int i = e / BN, j = e % BN;
      const float* qrow = qs + i * DP;
      const float* krow = ks + j * (DP + 1);
      float acc = 0.f;
      for (int c = 0; c < D; ++c) acc = fmaf(qrow[c], krow[c], acc);
      ss[i * (BN + 1) + j] = k0 + j < N ? acc : -CUDART_INF_F;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = warp * kRowsPerWarp + r;
      float* srow = ss + i * (BN + 1);
      const float s = lane < BN ? srow[lane] : -CUDART_INF_F;
      const float m_new = fmaxf(m[r], warp_max(s));  // finite: key k0 is always valid
      const float p = exp2f(s - m_new);              // 0 for masked keys
      const float alpha = exp2f(m[r] - m_new);       // 0 on the first block
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = m_new;
      if (lane < BN) srow[lane] = p;
#pragma unroll
      for (int t = 0; t < NT; ++t) o[r][t] *= alpha;
    }
    __syncwarp();  // this warp's probabilities are in ss
    for (int j = 0; j < BN; ++j) {
      float vv[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) vv[t] = vs[j * DP + lane + 32 * t];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float p = ss[(warp * kRowsPerWarp + r) * (BN + 1) + j];
#pragma unroll
        for (int t = 0; t < NT; ++t) o[r][t] = fmaf(p, vv[t], o[r][t]);
      }
    }
  }

  T* out = static_cast<T*>(a.out) + b * a.out_sb + h * a.out_sh;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = n0 + warp * kRowsPerWarp + r;
    if (n >= N) continue;
    const float inv = 1.f / l[r];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c = lane + 32 * t;
      if (c < D) out[n * a.out_sn + c] = from_f<T>(o[r][t] * inv);
    }
  }
}

template <typename T>
void launch(const AttentionArgs& a) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int64_t qblocks = (a.N + kBM - 1) / kBM;
  const int64_t heads = a.B * a.H;
  if (heads > 65535) throw std::invalid_argument("attention (CUDA): at most 65535 batch x heads");
  if (qblocks > 0x7fffffff) throw std::invalid_argument("attention (CUDA): sequence too long");
  const dim3 grid(static_cast<unsigned>(qblocks), static_cast<unsigned>(heads));
  const int nt = static_cast<int>((a.D + 31) / 32);
  switch (nt) {
    case 1: attention_kernel<T, 1, 32><<<grid, kThreads, 0, stream>>>(a); break;
    case 2: attention_kernel<T, 2, 32><<<grid, kThreads, 0, stream>>>(a); break;
    case 3: attention_kernel<T, 3, 32><<<grid, kThreads, 0, stream>>>(a); break;
    case 4: attention_kernel<T, 4, 16><<<grid, kThreads, 0, stream>>>(a); break;
    default: throw std::invalid_argument("attention (CUDA): head dim above 128");
  }
  check_cuda(cudaGetLastError(), "attention forward launch");
}

}  // namespace

void attention_forward(const AttentionArgs& a) {
  if (a.B * a.H * a.N == 0) return;
  DeviceGuard guard(a.device);
  switch (a.dtype) {
    case DType::Float32: launch<float>(a); break;
    case DType::Float16: launch<__half>(a); break;
    case DType::BFloat16: launch<__nv_bfloat16>(a); break;
    default: throw std::invalid_argument("attention: unsupported dtype");
  }
}

}  // namespace cuda
}  // namespace medgen
