// tile_blend on CUDA: dst += w * src over a strided box, in place, one thread
// per element (grid-stride). The bindings coalesce dimensions, so the index
// decomposition is short; consecutive threads walk the last (usually
// contiguous) dimension, so accesses are coalesced.
#include "common.cuh"
#include "ops.h"

namespace medgen {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void tile_blend_accumulate_kernel(TileBlendArgs a, int64_t total) {
  const T* src = static_cast<const T*>(a.src);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rem = i, d_off = 0, s_off = 0, w_off = 0;
    for (int k = a.ndim - 1; k >= 0; --k) {
      const int64_t idx = rem % a.shape[k];
      rem /= a.shape[k];
      d_off += idx * a.dst_st[k];
      s_off += idx * a.src_st[k];
      w_off += idx * a.w_st[k];
    }
    const float v = src ? to_f(src[s_off]) : 1.0f;
    a.dst[d_off] += a.w ? a.w[w_off] * v : v;
  }
}

template <typename T>
void launch(const TileBlendArgs& a) {
  int64_t total = 1;
  for (int k = 0; k < a.ndim; ++k) total *= a.shape[k];
  if (total == 0) return;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  tile_blend_accumulate_kernel<T><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, total);
  check_cuda(cudaGetLastError(), "tile_blend launch");
}

__global__ void tile_normalize_kernel(TileNormalizeArgs a, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float w = a.w[i % a.voxels];
    if (w > 0.f) a.out[i] /= w;
  }
}

}  // namespace

void tile_normalize(const TileNormalizeArgs& a) {
  const int64_t total = a.planes * a.voxels;
  if (total == 0) return;
  DeviceGuard guard(a.device);
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  tile_normalize_kernel<<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(a.stream)>>>(a, total);
  check_cuda(cudaGetLastError(), "tile_normalize launch");
}

void tile_blend_accumulate(const TileBlendArgs& a) {
  DeviceGuard guard(a.device);
  switch (a.src_dtype) {
    case DType::Float32: launch<float>(a); break;
    case DType::Float16: launch<__half>(a); break;
    case DType::BFloat16: launch<__nv_bfloat16>(a); break;
    default: throw std::invalid_argument("tile_blend: the tile must be a float tensor");
  }
}

}  // namespace cuda
}  // namespace medgen
