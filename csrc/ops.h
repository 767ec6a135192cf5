// Resolved kernel arguments, shared by the CPU and CUDA implementations.
// bindings.cpp validates the TensorDescs and fills these; the kernels trust them.
// Strides are in elements; the channel (last) dimension is always contiguous.
#pragma once

#include <cstdint>

#include "common/tensor.h"

namespace medgen {

struct AdaLNModulateArgs {
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

struct AdaLNModulateBackwardArgs {
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
constexpr int kMaxTileBlendDims = 8;
struct TileBlendArgs {
  DType src_dtype;
  int ndim;
  int64_t shape[kMaxTileBlendDims];
  float* dst; int64_t dst_st[kMaxTileBlendDims];
  const void* src; int64_t src_st[kMaxTileBlendDims];  // may be null
  const float* w; int64_t w_st[kMaxTileBlendDims];     // may be null
  int device; std::uintptr_t stream;
};

// tile_normalize: out[p, i] /= w[i] where w[i] > 0 (uncovered voxels keep their value),
// for every plane p (batch x channels) of a dense (planes, voxels) float32 output and a
// dense (voxels,) float32 weight sum.
struct TileNormalizeArgs {
  float* out;
  const float* w;
  int64_t planes, voxels;
  int device; std::uintptr_t stream;
};

// patch_embed: out[b, n, :] = round(patches[b, n, :] @ weight^T + bias) + pos[n, :], the
// patch matrix gathered straight from x (any strides). Token n runs row-major over the
// patch grid, patch entry k over (c, q1, .., q4). Fewer than kMaxPatchDims spatial axes
// come padded in front with axes of grid 1, patch 1, stride 0. Accumulation in float32;
// the sum with the bias is rounded to the dtype before pos is added, as the reference.
constexpr int kMaxPatchDims = 4;
struct PatchEmbedArgs {
  DType dtype;                                // x, weight, bias, pos and out
  int64_t B, C, hidden, K, N;                 // K = C * prod(patch), N = prod(grid)
  int64_t grid[kMaxPatchDims], patch[kMaxPatchDims];
  const void* x; int64_t x_sb, x_sc, x_ss[kMaxPatchDims];  // (B, C, *S), any strides
  const void* weight; int64_t w_sh, w_sk;     // (hidden, K), any strides
  const void* bias; int64_t bias_s;           // (hidden,) or null
  const void* pos; int64_t pos_sn;            // (N, hidden) with unit channel stride, or null
  void* out; int64_t out_sb, out_sn;          // (B, N, hidden) with unit channel stride
  int device; std::uintptr_t stream;
};

// unpatchify: out[b, c, g1*p1+q1, ..] = tokens[b, n(g), f(q, c)], features laid out (p1, .., p4, C).
// Axes padded in front as for PatchEmbedArgs.
struct UnpatchifyArgs {
  DType dtype;
  int64_t B, C;                               // C: output channels
  int64_t grid[kMaxPatchDims], patch[kMaxPatchDims];
  const void* tokens; int64_t t_sb, t_sn, t_sf;          // (B, N, prod(p) * C), any strides
  void* out; int64_t o_sb, o_sc, o_ss[kMaxPatchDims];    // (B, C, *S), any strides
  int device; std::uintptr_t stream;
};

// attention: softmax(q' k'^T / sqrt(D)) v per (b, h), q' and k' after optional
// LayerNorm over D (statistics in float32; weight/bias float32 or null) and optional
// rotate-half RoPE with (N, D) float32 contiguous cos/sin tables, each rounded to the
// input dtype where the reference holds it in that dtype; float32 arithmetic.
// q, k, v (B, H, N, D) any strides; out (B, H, N, D) with a unit stride along D.
constexpr int64_t kMaxAttentionHeadDim = 128;
struct AttentionArgs {
  DType dtype;                                // q, k, v and out
  int64_t B, H, N, D;
  const void* q; int64_t q_sb, q_sh, q_sn, q_sd;
  const void* k; int64_t k_sb, k_sh, k_sn, k_sd;
  const void* v; int64_t v_sb, v_sh, v_sn, v_sd;
  void* out; int64_t out_sb, out_sh, out_sn;
  const float* cos; const float* sin;         // both null: no RoPE
  int q_norm; const float* q_w; const float* q_b; float q_eps;  // q_norm 0: none
  int k_norm; const float* k_w; const float* k_b; float k_eps;
  float scale;                                // softmax scale, 1/sqrt(D)
  int device; std::uintptr_t stream;
};

namespace cpu {
void adaln_modulate_forward(const AdaLNModulateArgs& a);
void adaln_modulate_backward(const AdaLNModulateBackwardArgs& a);
void gated_residual_forward(const GatedResidualArgs& a);
void gated_residual_backward(const GatedResidualBackwardArgs& a);
void vq_nearest(const VQNearestArgs& a);
void tile_blend_accumulate(const TileBlendArgs& a);
void tile_normalize(const TileNormalizeArgs& a);
void attention_forward(const AttentionArgs& a);
void patch_embed_forward(const PatchEmbedArgs& a);
void unpatchify(const UnpatchifyArgs& a);
}  // namespace cpu

#ifdef MEDGEN_WITH_CUDA
namespace cuda {
void adaln_modulate_forward(const AdaLNModulateArgs& a);
void adaln_modulate_backward(const AdaLNModulateBackwardArgs& a);
void gated_residual_forward(const GatedResidualArgs& a);
void gated_residual_backward(const GatedResidualBackwardArgs& a);
void vq_nearest(const VQNearestArgs& a);
void tile_blend_accumulate(const TileBlendArgs& a);
void tile_normalize(const TileNormalizeArgs& a);
void attention_forward(const AttentionArgs& a);
void patch_embed_forward(const PatchEmbedArgs& a);
void unpatchify(const UnpatchifyArgs& a);
int device_count(std::string* error);
int runtime_version();
int driver_version();
std::string device_name(int device);
}  // namespace cuda
#endif

}  // namespace medgen
