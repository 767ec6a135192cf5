// Resolved kernel arguments, shared by the CPU and CUDA implementations.
// bindings.cpp validates the TensorDescs and fills these; the kernels trust them.
// Strides are in elements; the channel (last) dimension is always contiguous.
#pragma once

#include <cstdint>

#include "common/tensor.h"

namespace medgen {

struct AdaLNArgs {
  DType dtype;
  int64_t B, N, C;
  const void* x; int64_t x_sb, x_sn;          // (B, N, C)
  const void* shift; int64_t shift_sb;        // (B, C)
  const void* scale; int64_t scale_sb;        // (B, C)
  void* y; int64_t y_sb, y_sn;                // (B, N, C), same dtype as x
  float* mean; float* rstd;                   // (B*N,) float32, may be null (inference)
  float eps;
  int device; std::uintptr_t stream;
};

struct AdaLNBackwardArgs {
  DType dtype;
  int64_t B, N, C, n_chunks;
  const void* dy; int64_t dy_sb, dy_sn;       // (B, N, C)
  const void* x; int64_t x_sb, x_sn;          // (B, N, C)
  const void* scale; int64_t scale_sb;        // (B, C)
  const float* mean; const float* rstd;       // (B*N,) saved by the forward
  void* dx; int64_t dx_sb, dx_sn;             // (B, N, C)
  // Per-chunk partial sums over rows, (B, n_chunks, C) float32 contiguous;
  // the caller sums over the chunk axis (a tiny reduction).
  float* dscale_partial; float* dshift_partial;
  int device; std::uintptr_t stream;
};

// gated_residual: out = x + gate[b] * y; all (B, N, C) / (B, C) in one dtype.
struct GatedResidualArgs {
  DType dtype;
  int64_t B, N, C;
  const void* x; int64_t x_sb, x_sn;          // (B, N, C)
  const void* gate; int64_t gate_sb;          // (B, C)
  const void* y; int64_t y_sb, y_sn;          // (B, N, C)
  void* out; int64_t out_sb, out_sn;          // (B, N, C)
  int device; std::uintptr_t stream;
};

// Backward: dy = gate * dout (skipped when dy is null) and per-chunk partial sums
// dgate_partial[b, k, c] = sum over the chunk's rows of dout * y (skipped when null).
// dx = dout needs no kernel.
struct GatedResidualBackwardArgs {
  DType dtype;
  int64_t B, N, C, n_chunks;
  const void* dout; int64_t dout_sb, dout_sn; // (B, N, C)
  const void* gate; int64_t gate_sb;          // (B, C)
  const void* y; int64_t y_sb, y_sn;          // (B, N, C)
  void* dy; int64_t dy_sb, dy_sn;             // (B, N, C) or null
  float* dgate_partial;                       // (B, n_chunks, C) float32 contiguous, or null
  int device; std::uintptr_t stream;
};

// vq_nearest: index of the nearest codebook row for every row of z, by
// d_k = |c_k|^2 - 2 z.c_k in float32 with z.c_k accumulated in order d = 0..D-1
// (fused multiply-add where the hardware has it), ties to the lowest k.
struct VQNearestArgs {
  DType z_dtype;
  int64_t N, K, D;
  const void* z; int64_t z_sn, z_sd;          // (N, D), any strides
  const float* cb_t;                          // (D, K) float32 contiguous: the codebook transposed
  const float* cb_sq;                         // (K,) float32: |c_k|^2 as the caller computed it
  int64_t* indices;                           // (N,) int64 out
  int device; std::uintptr_t stream;
};

// tile_blend building block: dst += w * src elementwise over a strided
// nd-box, w and src optional (1 when null). dst float32; src any float dtype;
// w float32 (broadcast through zero strides). bindings.cpp coalesces the dims.
constexpr int kMaxBlendDims = 8;
struct BlendArgs {
  DType src_dtype;
  int ndim;
  int64_t shape[kMaxBlendDims];
  float* dst; int64_t dst_st[kMaxBlendDims];
  const void* src; int64_t src_st[kMaxBlendDims];  // may be null
  const float* w; int64_t w_st[kMaxBlendDims];     // may be null
  int device; std::uintptr_t stream;
};

namespace cpu {
void adaln_modulate_forward(const AdaLNArgs& a);
void adaln_modulate_backward(const AdaLNBackwardArgs& a);
void gated_residual_forward(const GatedResidualArgs& a);
void gated_residual_backward(const GatedResidualBackwardArgs& a);
void vq_nearest(const VQNearestArgs& a);
void blend_accumulate(const BlendArgs& a);
int max_threads();
}  // namespace cpu

#ifdef MEDGEN_WITH_CUDA
namespace cuda {
void adaln_modulate_forward(const AdaLNArgs& a);
void adaln_modulate_backward(const AdaLNBackwardArgs& a);
void gated_residual_forward(const GatedResidualArgs& a);
void gated_residual_backward(const GatedResidualBackwardArgs& a);
void vq_nearest(const VQNearestArgs& a);
void blend_accumulate(const BlendArgs& a);
int device_count(std::string* error);
int runtime_version();
int driver_version();
std::string device_name(int device);
}  // namespace cuda
#endif

}  // namespace medgen
