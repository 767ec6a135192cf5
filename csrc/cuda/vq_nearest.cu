// vq_nearest on CUDA: one thread per row of z, the codebook streamed through
// shared memory in tiles (every thread of a block reads the same entry at the
// same time: a broadcast, no bank conflicts). Distances as on the CPU:
// acc = z.c by FMA in order d = 0..D-1, d_k = fma(-2, acc, |c_k|^2), torch's
// min semantics (first NaN wins, else the first minimum).
#include <cmath>

#include "common.cuh"
#include "ops.h"

namespace medgen {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 128;
constexpr int kSmemBytes = 32 * 1024;
constexpr int kMaxGenericD = 256;

// DT > 0: D known at compile time, the z row in registers; DT == 0: any D up to kMaxGenericD.
template <typename T, int DT>
__global__ void vq_nearest_kernel(VQNearestArgs a, int tile) {
  extern __shared__ float smem[];
  const int64_t D = DT > 0 ? DT : a.D;
  float* s_cb = smem;              // (D, tile)
  float* s_sq = smem + D * tile;   // (tile,)
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x;
  const bool active = n < a.N;

  // With DT > 0 the loops below have a constant trip count, unroll, and zr stays in registers.
  float zr[DT > 0 ? DT : kMaxGenericD];
  if (active) {
    const T* zrow = static_cast<const T*>(a.z) + n * a.z_sn;
#pragma unroll
    for (int64_t d = 0; d < D; ++d) zr[d] = to_f(zrow[d * a.z_sd]);
  }

  float best = INFINITY;
  int64_t best_k = 0;
  for (int64_t k0 = 0; k0 < a.K; k0 += tile) {
    const int64_t len = min(static_cast<int64_t>(tile), a.K - k0);
    __syncthreads();  // the previous tile is no longer read
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = threadIdx.x; j < len; j += blockDim.x) s_cb[d * tile + j] = a.cb_t[d * a.K + k0 + j];
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) s_sq[j] = a.cb_sq[k0 + j];
    __syncthreads();
    if (!active) continue;
    for (int64_t j = 0; j < len; ++j) {
      float acc = 0.f;
#pragma unroll
      for (int64_t d = 0; d < D; ++d) acc = fmaf(zr[d], s_cb[d * tile + j], acc);
      const float dist = fmaf(-2.f, acc, s_sq[j]);
      // Strict less keeps the lowest index on ties; a NaN replaces any number and
      // is never replaced, as torch's min does.
      if (dist < best || (isnan(dist) && !isnan(best))) {
        best = dist;
        best_k = k0 + j;
      }
    }
  }
  if (active) a.indices[n] = best_k;
}

template <typename T, int DT>
void launch(const VQNearestArgs& a) {
  const int64_t per_entry = static_cast<int64_t>(sizeof(float)) * (a.D + 1);
  int tile = static_cast<int>(kSmemBytes / per_entry / 32 * 32);
  if (tile < 32) tile = 32;
  const size_t smem = static_cast<size_t>(per_entry) * tile;
  const dim3 grid(static_cast<unsigned>((a.N + kRowsPerBlock - 1) / kRowsPerBlock));
  vq_nearest_kernel<T, DT><<<grid, kRowsPerBlock, smem, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, tile);
  check_cuda(cudaGetLastError(), "vq_nearest launch");
}

template <typename T>
void dispatch_d(const VQNearestArgs& a) {
  switch (a.D) {
    case 4: return launch<T, 4>(a);
    case 8: return launch<T, 8>(a);
    case 16: return launch<T, 16>(a);
    default: return launch<T, 0>(a);
  }
}

}  // namespace

void vq_nearest(const VQNearestArgs& a) {
  if (a.D > kMaxGenericD)
    throw std::invalid_argument("vq_nearest (CUDA): D=" + std::to_string(a.D) + " exceeds the supported 256");
  if (a.N == 0) return;
  DeviceGuard guard(a.device);
  switch (a.z_dtype) {
    case DType::Float32: dispatch_d<float>(a); break;
    case DType::Float16: dispatch_d<__half>(a); break;
    case DType::BFloat16: dispatch_d<__nv_bfloat16>(a); break;
    default: throw std::invalid_argument("vq_nearest: z must be a float tensor");
  }
}

}  // namespace cuda
}  // namespace medgen
