// adaln_modulate on CUDA: y = LayerNorm(x) * (1 + scale[b]) + shift[b].
// Forward: one warp per row with 16-byte vector loads; the row is read three
// times (mean, variance, output) but after the first pass it sits in L1/L2,
// so DRAM traffic is one read of x and one write of y.
// Backward: one block per (sample, chunk of rows); per-column sums for dscale
// and dshift accumulate in shared memory and are written as per-chunk partials.
#include <algorithm>

#include "common.cuh"
#include "ops.h"

namespace medgen {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kBackwardThreads = 256;

template <typename T, int VEC>
__global__ void adaln_modulate_forward_kernel(AdaLNModulateArgs a) {
  using P = Pack<T, VEC>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.B * a.N) return;
  const int64_t b = row / a.N, n = row % a.N;
  const P* xr = reinterpret_cast<const P*>(static_cast<const T*>(a.x) + b * a.x_sb + n * a.x_sn);
  const P* sc = reinterpret_cast<const P*>(static_cast<const T*>(a.scale) + b * a.scale_sb);
  const P* sh = reinterpret_cast<const P*>(static_cast<const T*>(a.shift) + b * a.shift_sb);
  P* yr = reinterpret_cast<P*>(static_cast<T*>(a.y) + b * a.y_sb + n * a.y_sn);
  const int64_t n_packs = a.C / VEC;
  const float inv_c = 1.0f / static_cast<float>(a.C);

  float sum = 0.f;
  for (int64_t i = lane; i < n_packs; i += 32) {
    const P p = xr[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += to_f(p.v[j]);
  }
  const float mean = warp_sum(sum) * inv_c;

  float sq = 0.f;
  for (int64_t i = lane; i < n_packs; i += 32) {
    const P p = xr[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = to_f(p.v[j]) - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(warp_sum(sq) * inv_c + a.eps);
  if (lane == 0) {
    if (a.mean) a.mean[row] = mean;
    if (a.rstd) a.rstd[row] = rstd;
  }

  for (int64_t i = lane; i < n_packs; i += 32) {
    const P p = xr[i], s = sc[i], t = sh[i];
    P out;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      out.v[j] = from_f<T>((to_f(p.v[j]) - mean) * rstd * (1.0f + to_f(s.v[j])) + to_f(t.v[j]));
    yr[i] = out;
  }
}

template <typename T>
__global__ void adaln_modulate_backward_kernel(AdaLNModulateBackwardArgs a) {
  extern __shared__ float smem[];
  const int64_t C = a.C;
  float* s_dscale = smem;
  float* s_dshift = smem + C;
  const int64_t b = blockIdx.y, k = blockIdx.x;
  for (int64_t c = threadIdx.x; c < 2 * C; c += blockDim.x) smem[c] = 0.f;
  __syncthreads();

  const int64_t rows_per_chunk = (a.N + a.n_chunks - 1) / a.n_chunks;
  const int64_t n_begin = k * rows_per_chunk;
  const int64_t n_end = min(a.N, n_begin + rows_per_chunk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  const T* sc = static_cast<const T*>(a.scale) + b * a.scale_sb;
  const float inv_c = 1.0f / static_cast<float>(C);

  for (int64_t n = n_begin + warp; n < n_end; n += n_warps) {
    const int64_t r = b * a.N + n;
    const float mean = a.mean[r], rstd = a.rstd[r];
    const T* xr = static_cast<const T*>(a.x) + b * a.x_sb + n * a.x_sn;
    const T* dyr = static_cast<const T*>(a.dy) + b * a.dy_sb + n * a.dy_sn;
    float sum_g = 0.f, sum_gx = 0.f;
    for (int64_t c = lane; c < C; c += 32) {
      const float xhat = (to_f(xr[c]) - mean) * rstd;
      const float d = to_f(dyr[c]);
      const float g = d * (1.0f + to_f(sc[c]));
      sum_g += g;
      sum_gx += g * xhat;
      atomicAdd(&s_dscale[c], d * xhat);
      atomicAdd(&s_dshift[c], d);
    }
    const float mg = warp_sum(sum_g) * inv_c, mgx = warp_sum(sum_gx) * inv_c;
    T* dxr = static_cast<T*>(a.dx) + b * a.dx_sb + n * a.dx_sn;
    for (int64_t c = lane; c < C; c += 32) {
      const float xhat = (to_f(xr[c]) - mean) * rstd;
      const float g = to_f(dyr[c]) * (1.0f + to_f(sc[c]));
      dxr[c] = from_f<T>(rstd * (g - mg - xhat * mgx));
    }
  }
  __syncthreads();
  float* out_scale = a.dscale_partial + (b * a.n_chunks + k) * C;
  float* out_shift = a.dshift_partial + (b * a.n_chunks + k) * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    out_scale[c] = s_dscale[c];
    out_shift[c] = s_dshift[c];
  }
}

// 16-byte packs when every row start is 16-byte aligned, else scalar access.
template <typename T>
bool can_use_pack(const AdaLNModulateArgs& a, int vec) {
  auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return a.C % vec == 0 && a.x_sb % vec == 0 && a.x_sn % vec == 0 && a.y_sb % vec == 0 &&
         a.y_sn % vec == 0 && a.scale_sb % vec == 0 && a.shift_sb % vec == 0 && aligned(a.x) &&
         aligned(a.y) && aligned(a.scale) && aligned(a.shift);
}

template <typename T>
void launch_forward(const AdaLNModulateArgs& a) {
  const int64_t rows = a.B * a.N;
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(32 * kWarpsPerBlock);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  constexpr int kVec = 16 / sizeof(T);
  if (can_use_pack<T>(a, kVec)) {
    adaln_modulate_forward_kernel<T, kVec><<<grid, block, 0, stream>>>(a);
  } else {
    adaln_modulate_forward_kernel<T, 1><<<grid, block, 0, stream>>>(a);
  }
  check_cuda(cudaGetLastError(), "adaln_modulate forward launch");
}

template <typename T>
void launch_backward(const AdaLNModulateBackwardArgs& a) {
  const size_t smem = static_cast<size_t>(2 * a.C) * sizeof(float);
  if (smem > 48 * 1024)
    throw std::invalid_argument("adaln_modulate backward (CUDA): C=" + std::to_string(a.C) +
                                " exceeds the supported 6144 channels");
  const dim3 grid(static_cast<unsigned>(a.n_chunks), static_cast<unsigned>(a.B));
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  adaln_modulate_backward_kernel<T><<<grid, kBackwardThreads, smem, stream>>>(a);
  check_cuda(cudaGetLastError(), "adaln_modulate backward launch");
}

}  // namespace

void adaln_modulate_forward(const AdaLNModulateArgs& a) {
  DeviceGuard guard(a.device);
  switch (a.dtype) {
    case DType::Float32: launch_forward<float>(a); break;
    case DType::Float16: launch_forward<__half>(a); break;
    case DType::BFloat16: launch_forward<__nv_bfloat16>(a); break;
  }
}

void adaln_modulate_backward(const AdaLNModulateBackwardArgs& a) {
  DeviceGuard guard(a.device);
  switch (a.dtype) {
    case DType::Float32: launch_backward<float>(a); break;
    case DType::Float16: launch_backward<__half>(a); break;
    case DType::BFloat16: launch_backward<__nv_bfloat16>(a); break;
  }
}

}  // namespace cuda
}  // namespace medgen
