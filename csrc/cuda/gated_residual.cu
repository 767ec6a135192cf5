// gated_residual on CUDA: out = x + gate[b] * y.
// Forward: elementwise with 16-byte packs when every row start is aligned.
// Backward: one block per (sample, chunk of rows); each thread owns channels
// and walks the chunk's rows, so reads are coalesced along C and the dgate
// partial sums need neither atomics nor shared memory.
#include "common.cuh"
#include "ops.h"

namespace medgen {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void gated_residual_forward_kernel(GatedResidualArgs a) {
  using P = Pack<T, VEC>;
  const int64_t packs = a.C / VEC;
  const int64_t total = a.B * a.N * packs;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / packs, p = i % packs;
    const int64_t b = row / a.N, n = row % a.N;
    const P xv = reinterpret_cast<const P*>(static_cast<const T*>(a.x) + b * a.x_sb + n * a.x_sn)[p];
    const P yv = reinterpret_cast<const P*>(static_cast<const T*>(a.y) + b * a.y_sb + n * a.y_sn)[p];
    const P gv = reinterpret_cast<const P*>(static_cast<const T*>(a.gate) + b * a.gate_sb)[p];
    P out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_f<T>(to_f(xv.v[j]) + to_f(gv.v[j]) * to_f(yv.v[j]));
    reinterpret_cast<P*>(static_cast<T*>(a.out) + b * a.out_sb + n * a.out_sn)[p] = out;
  }
}

template <typename T>
__global__ void gated_residual_backward_kernel(GatedResidualBackwardArgs a) {
  const int64_t b = blockIdx.y, k = blockIdx.x;
  const int64_t rows_per_chunk = (a.N + a.n_chunks - 1) / a.n_chunks;
  const int64_t n_begin = k * rows_per_chunk;
  const int64_t n_end = min(a.N, n_begin + rows_per_chunk);
  const T* gate = static_cast<const T*>(a.gate) + b * a.gate_sb;
  for (int64_t c = threadIdx.x; c < a.C; c += blockDim.x) {
    const float g = to_f(gate[c]);
    float acc = 0.f;
    for (int64_t n = n_begin; n < n_end; ++n) {
      const float d = to_f(static_cast<const T*>(a.dout)[b * a.dout_sb + n * a.dout_sn + c]);
      if (a.dy) static_cast<T*>(a.dy)[b * a.dy_sb + n * a.dy_sn + c] = from_f<T>(g * d);
      if (a.dgate_partial) acc += d * to_f(static_cast<const T*>(a.y)[b * a.y_sb + n * a.y_sn + c]);
    }
    if (a.dgate_partial) a.dgate_partial[(b * a.n_chunks + k) * a.C + c] = acc;
  }
}

template <typename T>
bool can_use_pack(const GatedResidualArgs& a, int vec) {
  auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return a.C % vec == 0 && a.x_sb % vec == 0 && a.x_sn % vec == 0 && a.y_sb % vec == 0 && a.y_sn % vec == 0 &&
         a.out_sb % vec == 0 && a.out_sn % vec == 0 && a.gate_sb % vec == 0 && aligned(a.x) && aligned(a.y) &&
         aligned(a.out) && aligned(a.gate);
}

unsigned grid_for(int64_t work) {
  // Grid-stride loops: enough blocks to fill any current GPU, capped.
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

template <typename T>
void launch_forward(const GatedResidualArgs& a) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  constexpr int kVec = 16 / sizeof(T);
  if (can_use_pack<T>(a, kVec)) {
    gated_residual_forward_kernel<T, kVec><<<grid_for(a.B * a.N * (a.C / kVec)), kThreads, 0, stream>>>(a);
  } else {
    gated_residual_forward_kernel<T, 1><<<grid_for(a.B * a.N * a.C), kThreads, 0, stream>>>(a);
  }
  check_cuda(cudaGetLastError(), "gated_residual forward launch");
}

template <typename T>
void launch_backward(const GatedResidualBackwardArgs& a) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int threads = a.C >= kThreads ? kThreads : static_cast<int>((a.C + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(a.n_chunks), static_cast<unsigned>(a.B));
  gated_residual_backward_kernel<T><<<grid, threads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "gated_residual backward launch");
}

}  // namespace

void gated_residual_forward(const GatedResidualArgs& a) {
  DeviceGuard guard(a.device);
  switch (a.dtype) {
    case DType::Float32: launch_forward<float>(a); break;
    case DType::Float16: launch_forward<__half>(a); break;
    case DType::BFloat16: launch_forward<__nv_bfloat16>(a); break;
    default: throw std::invalid_argument("gated_residual: unsupported dtype");
  }
}

void gated_residual_backward(const GatedResidualBackwardArgs& a) {
  DeviceGuard guard(a.device);
  switch (a.dtype) {
    case DType::Float32: launch_backward<float>(a); break;
    case DType::Float16: launch_backward<__half>(a); break;
    case DType::BFloat16: launch_backward<__nv_bfloat16>(a); break;
    default: throw std::invalid_argument("gated_residual backward: unsupported dtype");
  }
}

}  // namespace cuda
}  // namespace medgen
