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

namespace cpu {
void adaln_modulate_forward(const AdaLNArgs& a);
void adaln_modulate_backward(const AdaLNBackwardArgs& a);
int max_threads();
}  // namespace cpu

#ifdef MEDGEN_WITH_CUDA
namespace cuda {
void adaln_modulate_forward(const AdaLNArgs& a);
void adaln_modulate_backward(const AdaLNBackwardArgs& a);
int device_count(std::string* error);
int runtime_version();
int driver_version();
std::string device_name(int device);
}  // namespace cuda
#endif

}  // namespace medgen
