// patch_embed and unpatchify on CUDA: simple, straightforward kernels (the
// Triton backend is the fast one on GPUs).
//
// patch_embed: one block of 256 threads per tile of kBM tokens x kBN hidden
// columns. Per step of kBK patch entries the block gathers the tile's patch rows
// from x (any strides) and the weight slice into shared memory as float32; each
// thread accumulates a 4 x 4 sub-tile in float32 registers. The epilogue adds the
// bias, rounds to the dtype as the reference's linear does, then adds pos.
//
// unpatchify: one thread per output element (grid-stride), an index map.
#include "common.cuh"
#include "ops.h"

namespace medgen {
namespace cuda {
namespace {

constexpr int kBM = 64;       // tokens per block
constexpr int kBN = 64;       // hidden columns per block
constexpr int kBK = 16;       // patch entries per shared-memory step
constexpr int kTM = 4;        // rows per thread
constexpr int kTN = 4;        // columns per thread
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256

// Offset in x of patch entry k = (c, q1, .., q4), q4 fastest.
__device__ __forceinline__ int64_t patch_col_offset(const PatchEmbedArgs& a, int64_t k) {
  int64_t off = 0;
#pragma unroll
  for (int d = kMaxPatchDims - 1; d >= 0; --d) {
    off += (k % a.patch[d]) * a.x_ss[d];
    k /= a.patch[d];
  }
  return off + k * a.x_sc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) patch_embed_kernel(PatchEmbedArgs a) {
  __shared__ float As[kBK][kBM];
  __shared__ float Ws[kBK][kBN + 1];  // +1: the k-fastest stores hit distinct banks
  __shared__ int64_t row_off[kBM];  // offset of the token's patch origin in x; -1 past the end
  const int tid = threadIdx.x;
  const int64_t M = a.B * a.N;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t h0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);

  if (tid < kBM) {
    const int64_t m = m0 + tid;
    int64_t off = -1;
    if (m < M) {
      const int64_t b = m / a.N;
      int64_t t = m % a.N;
      off = b * a.x_sb;
      for (int d = kMaxPatchDims - 1; d >= 0; --d) {
        off += (t % a.grid[d]) * a.patch[d] * a.x_ss[d];
        t /= a.grid[d];
      }
    }
    row_off[tid] = off;
  }
  __syncthreads();

  const int ty = tid / (kBN / kTN), tx = tid % (kBN / kTN);
  float acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < a.K; k0 += kBK) {
    for (int e = tid; e < kBK * kBM; e += kThreads) {
      const int kk = e / kBM, mm = e % kBM;
      const int64_t k = k0 + kk;
      float v = 0.f;
      if (k < a.K && row_off[mm] >= 0) v = to_f(x[row_off[mm] + patch_col_offset(a, k)]);
      As[kk][mm] = v;
    }
    for (int e = tid; e < kBK * kBN; e += kThreads) {
      const int nn = e / kBK, kk = e % kBK;  // k fastest: consecutive threads read along a weight row
      const int64_t k = k0 + kk, h = h0 + nn;
      Ws[kk][nn] = (k < a.K && h < a.hidden) ? to_f(w[h * a.w_sh + k * a.w_sk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float ar[kTM], wr[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) ar[i] = As[kk][ty * kTM + i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) wr[j] = Ws[kk][tx * kTN + j];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(ar[i], wr[j], acc[i][j]);
    }
    __syncthreads();
  }

  const T* bias = static_cast<const T*>(a.bias);
  const T* pos = static_cast<const T*>(a.pos);
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t m = m0 + ty * kTM + i;
    if (m >= M) continue;
    const int64_t b = m / a.N, n = m % a.N;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t h = h0 + tx * kTN + j;
      if (h >= a.hidden) continue;
      float v = acc[i][j];
      if (bias) v += to_f(bias[h * a.bias_s]);
      T r = from_f<T>(v);
      if (pos) r = from_f<T>(to_f(r) + to_f(pos[n * a.pos_sn + h]));
      out[b * a.out_sb + n * a.out_sn + h] = r;
    }
  }
}

// One thread per output element (b, c, s1, .., s4), s4 fastest; elements move as raw bits.
template <typename E>
__global__ void unpatchify_kernel(UnpatchifyArgs a, int64_t total) {
  const E* tokens = static_cast<const E*>(a.tokens);
  E* out = static_cast<E*>(a.out);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = i, token = 0, feature = 0, dst = 0;
    // Walk the spatial axes from the last: s_d = g_d * p_d + q_d.
    int64_t token_stride = 1, feature_stride = 1;
#pragma unroll
    for (int d = kMaxPatchDims - 1; d >= 0; --d) {
      const int64_t S = a.grid[d] * a.patch[d];
      const int64_t s = r % S;
      r /= S;
      token += (s / a.patch[d]) * token_stride;
      feature += (s % a.patch[d]) * feature_stride;
      token_stride *= a.grid[d];
      feature_stride *= a.patch[d];
      dst += s * a.o_ss[d];
    }
    const int64_t c = r % a.C, b = r / a.C;
    dst += b * a.o_sb + c * a.o_sc;
    out[dst] = tokens[b * a.t_sb + token * a.t_sn + (feature * a.C + c) * a.t_sf];
  }
}

template <typename T>
void launch_patch_embed(const PatchEmbedArgs& a) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int64_t m_tiles = (a.B * a.N + kBM - 1) / kBM;
  const int64_t h_tiles = (a.hidden + kBN - 1) / kBN;
  if (m_tiles > 2147483647LL || h_tiles > 65535)
    throw std::invalid_argument("patch_embed: too many tokens or hidden columns for one launch");
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(h_tiles));
  patch_embed_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  check_cuda(cudaGetLastError(), "patch_embed launch");
}

template <typename E>
void launch_unpatchify(const UnpatchifyArgs& a) {
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  int64_t total = a.B * a.C;
  for (int d = 0; d < kMaxPatchDims; ++d) total *= a.grid[d] * a.patch[d];
  constexpr int kUnpThreads = 256;
  const int64_t blocks = (total + kUnpThreads - 1) / kUnpThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
  unpatchify_kernel<E><<<grid, kUnpThreads, 0, stream>>>(a, total);
  check_cuda(cudaGetLastError(), "unpatchify launch");
}

}  // namespace

void patch_embed_forward(const PatchEmbedArgs& a) {
  DeviceGuard guard(a.device);
  switch (a.dtype) {
    case DType::Float32: launch_patch_embed<float>(a); break;
    case DType::Float16: launch_patch_embed<__half>(a); break;
    case DType::BFloat16: launch_patch_embed<__nv_bfloat16>(a); break;
    default: throw std::invalid_argument("patch_embed: unsupported dtype");
  }
}

void unpatchify(const UnpatchifyArgs& a) {
  DeviceGuard guard(a.device);
  switch (a.dtype) {
    case DType::Float32: launch_unpatchify<uint32_t>(a); break;
    case DType::Float16:
    case DType::BFloat16: launch_unpatchify<uint16_t>(a); break;
    default: throw std::invalid_argument("unpatchify: unsupported dtype");
  }
}

}  // namespace cuda
}  // namespace medgen
