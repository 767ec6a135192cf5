// pybind11 module medgen_rt._C. Each op takes TensorDescs (pointer, shape,
// strides, dtype, device) for its inputs and preallocated outputs, validates
// them here, and dispatches to csrc/cpu or csrc/cuda by the device.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>

#include "common/tensor.h"
#include "cpu/parallel.h"
#include "ops.h"

namespace py = pybind11;
using namespace medgen;

namespace {

bool cuda_compiled() {
#ifdef MEDGEN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void require_device(const TensorDesc& t, const char* op) {
  if (t.is_cuda() && !cuda_compiled())
    throw std::runtime_error(std::string(op) +
                             ": tensor is on CUDA but medgen_rt._C was built without CUDA (nvcc not found at build time)");
}

void check_rows(const TensorDesc& t, int64_t B, int64_t N, int64_t C, DType dt, int device, const char* name) {
  check(t.dim() == 3, std::string(name) + ": expected a (B, N, C) tensor");
  check_shape(t, {B, N, C}, name);
  check(t.dtype == dt, std::string(name) + ": dtype " + dtype_name(t.dtype) + " differs from x's " + dtype_name(dt));
  check(t.stride(2) == 1, std::string(name) + ": the last dimension must be contiguous");
  check(t.device == device, std::string(name) + ": on a different device than x");
}

void check_mod(const TensorDesc& t, int64_t B, int64_t C, DType dt, int device, const char* name) {
  check_shape(t, {B, C}, name);
  check(t.dtype == dt, std::string(name) + ": dtype " + dtype_name(t.dtype) + " differs from x's " + dtype_name(dt));
  check(t.stride(1) == 1, std::string(name) + ": the last dimension must be contiguous");
  check(t.device == device, std::string(name) + ": on a different device than x");
}

float* stats_ptr(const py::object& obj, int64_t rows, int device, const char* name) {
  if (obj.is_none()) return nullptr;
  const auto& t = obj.cast<const TensorDesc&>();
  check(t.dtype == DType::Float32, std::string(name) + ": must be float32");
  check(t.dim() == 1 && t.size(0) == rows && t.stride(0) == 1, std::string(name) + ": must be a contiguous (B*N,) tensor");
  check(t.device == device, std::string(name) + ": on a different device than x");
  return t.data<float>();
}

void adaln_modulate_forward(const TensorDesc& x, const TensorDesc& shift, const TensorDesc& scale, const TensorDesc& y,
                            const py::object& mean, const py::object& rstd, float eps, std::uintptr_t stream) {
  require_device(x, "adaln_modulate");
  check(x.dim() == 3, "x: expected a (B, N, C) tensor");
  check(is_float(x.dtype), "x: must be float32, float16 or bfloat16");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check(C > 0, "x: C must be positive");
  check_rows(x, B, N, C, x.dtype, x.device, "x");
  check_rows(y, B, N, C, x.dtype, x.device, "y");
  check_mod(shift, B, C, x.dtype, x.device, "shift");
  check_mod(scale, B, C, x.dtype, x.device, "scale");
  AdaLNModulateArgs a{x.dtype, B, N, C,
                      x.data<void>(), x.stride(0), x.stride(1),
                      shift.data<void>(), shift.stride(0),
                      scale.data<void>(), scale.stride(0),
                      y.data<void>(), y.stride(0), y.stride(1),
                      stats_ptr(mean, B * N, x.device, "mean"), stats_ptr(rstd, B * N, x.device, "rstd"),
                      eps, x.device, stream};
  if (B * N == 0) return;
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (x.is_cuda()) return cuda::adaln_modulate_forward(a);
#endif
  cpu::adaln_modulate_forward(a);
}

void adaln_modulate_backward(const TensorDesc& dy, const TensorDesc& x, const TensorDesc& scale, const TensorDesc& mean,
                             const TensorDesc& rstd, const TensorDesc& dx, const TensorDesc& dscale_partial,
                             const TensorDesc& dshift_partial, std::uintptr_t stream) {
  require_device(x, "adaln_modulate backward");
  check(x.dim() == 3, "x: expected a (B, N, C) tensor");
  check(is_float(x.dtype), "x: must be float32, float16 or bfloat16");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_rows(x, B, N, C, x.dtype, x.device, "x");
  check_rows(dy, B, N, C, x.dtype, x.device, "dy");
  check_rows(dx, B, N, C, x.dtype, x.device, "dx");
  check_mod(scale, B, C, x.dtype, x.device, "scale");
  check(dscale_partial.dim() == 3 && dscale_partial.size(0) == B && dscale_partial.size(2) == C,
        "dscale_partial: expected (B, n_chunks, C)");
  const int64_t chunks = dscale_partial.size(1);
  check(chunks >= 1, "dscale_partial: n_chunks must be >= 1");
  for (const auto* t : {&dscale_partial, &dshift_partial}) {
    check_shape(*t, {B, chunks, C}, "d*_partial");
    check(t->dtype == DType::Float32, "d*_partial: must be float32");
    check(t->stride(0) == chunks * C && t->stride(1) == C && t->stride(2) == 1, "d*_partial: must be contiguous");
    check(t->device == x.device, "d*_partial: on a different device than x");
  }
  AdaLNModulateBackwardArgs a{x.dtype, B, N, C, chunks,
                              dy.data<void>(), dy.stride(0), dy.stride(1),
                              x.data<void>(), x.stride(0), x.stride(1),
                              scale.data<void>(), scale.stride(0),
                              stats_ptr(py::cast(mean), B * N, x.device, "mean"),
                              stats_ptr(py::cast(rstd), B * N, x.device, "rstd"),
                              dx.data<void>(), dx.stride(0), dx.stride(1),
                              dscale_partial.data<float>(), dshift_partial.data<float>(),
                              x.device, stream};
  check(a.mean && a.rstd, "mean/rstd: required for the backward");
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (x.is_cuda()) return cuda::adaln_modulate_backward(a);
#endif
  cpu::adaln_modulate_backward(a);
}

// ---- gated_residual -------------------------------------------------------------

void gated_residual_forward(const TensorDesc& x, const TensorDesc& gate, const TensorDesc& y, const TensorDesc& out,
                            std::uintptr_t stream) {
  require_device(x, "gated_residual");
  check(x.dim() == 3, "x: expected a (B, N, C) tensor");
  check(is_float(x.dtype), "x: must be float32, float16 or bfloat16");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check_rows(x, B, N, C, x.dtype, x.device, "x");
  check_rows(y, B, N, C, x.dtype, x.device, "y");
  check_rows(out, B, N, C, x.dtype, x.device, "out");
  check_mod(gate, B, C, x.dtype, x.device, "gate");
  GatedResidualArgs a{x.dtype, B, N, C,
                      x.data<void>(), x.stride(0), x.stride(1),
                      gate.data<void>(), gate.stride(0),
                      y.data<void>(), y.stride(0), y.stride(1),
                      out.data<void>(), out.stride(0), out.stride(1),
                      x.device, stream};
  if (B * N * C == 0) return;
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (x.is_cuda()) return cuda::gated_residual_forward(a);
#endif
  cpu::gated_residual_forward(a);
}

void gated_residual_backward(const TensorDesc& dout, const TensorDesc& gate, const TensorDesc& y,
                             const py::object& dy_obj, const py::object& dgate_obj, std::uintptr_t stream) {
  require_device(dout, "gated_residual backward");
  check(dout.dim() == 3, "dout: expected a (B, N, C) tensor");
  check(is_float(dout.dtype), "dout: must be float32, float16 or bfloat16");
  const int64_t B = dout.size(0), N = dout.size(1), C = dout.size(2);
  check_rows(dout, B, N, C, dout.dtype, dout.device, "dout");
  check_rows(y, B, N, C, dout.dtype, dout.device, "y");
  check_mod(gate, B, C, dout.dtype, dout.device, "gate");
  void* dy = nullptr;
  int64_t dy_sb = 0, dy_sn = 0;
  if (!dy_obj.is_none()) {
    const auto& t = dy_obj.cast<const TensorDesc&>();
    check_rows(t, B, N, C, dout.dtype, dout.device, "dy");
    dy = t.data<void>();
    dy_sb = t.stride(0);
    dy_sn = t.stride(1);
  }
  float* dgate = nullptr;
  int64_t chunks = 1;
  if (!dgate_obj.is_none()) {
    const auto& t = dgate_obj.cast<const TensorDesc&>();
    check(t.dim() == 3 && t.size(0) == B && t.size(2) == C, "dgate_partial: expected (B, n_chunks, C)");
    chunks = t.size(1);
    check(chunks >= 1, "dgate_partial: n_chunks must be >= 1");
    check(t.dtype == DType::Float32, "dgate_partial: must be float32");
    check(B * C == 0 || (t.stride(0) == chunks * C && t.stride(1) == C && t.stride(2) == 1),
          "dgate_partial: must be contiguous");  // empty tensors carry arbitrary strides
    check(t.device == dout.device, "dgate_partial: on a different device than dout");
    dgate = t.data<float>();
  }
  if (B * C == 0 || (!dy && !dgate)) return;
  GatedResidualBackwardArgs a{dout.dtype, B, N, C, chunks,
                              dout.data<void>(), dout.stride(0), dout.stride(1),
                              gate.data<void>(), gate.stride(0),
                              y.data<void>(), y.stride(0), y.stride(1),
                              dy, dy_sb, dy_sn, dgate, dout.device, stream};
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (dout.is_cuda()) return cuda::gated_residual_backward(a);
#endif
  cpu::gated_residual_backward(a);
}

// ---- vq_nearest -------------------------------------------------------------------

void vq_nearest(const TensorDesc& z, const TensorDesc& cb_t, const TensorDesc& cb_sq, const TensorDesc& indices,
                std::uintptr_t stream) {
  require_device(z, "vq_nearest");
  check(z.dim() == 2, "z: expected an (N, D) tensor");
  check(is_float(z.dtype), "z: must be float32, float16 or bfloat16");
  const int64_t N = z.size(0), D = z.size(1);
  check(D > 0, "z: D must be positive");
  check(cb_t.dim() == 2 && cb_t.size(0) == D, "cb_t: expected the (D, K) transposed codebook");
  const int64_t K = cb_t.size(1);
  check(K > 0, "cb_t: the codebook is empty");
  check(K < (int64_t{1} << 31) - 8, "cb_t: at most 2^31 - 9 codebook entries");
  // Strides of size-1 dimensions are free in torch; the kernels never step along those.
  check(cb_t.dtype == DType::Float32 && (D == 1 || cb_t.stride(0) == K) && (K == 1 || cb_t.stride(1) == 1),
        "cb_t: must be a contiguous float32 (D, K) tensor");
  check_shape(cb_sq, {K}, "cb_sq");
  check(cb_sq.dtype == DType::Float32 && (K == 1 || cb_sq.stride(0) == 1),
        "cb_sq: must be a contiguous float32 (K,) tensor");
  check_shape(indices, {N}, "indices");
  check(indices.dtype == DType::Int64 && (N <= 1 || indices.stride(0) == 1),
        "indices: must be a contiguous int64 (N,) tensor");
  for (const auto* t : {&cb_t, &cb_sq, &indices}) check_same_device(z, *t, "cb_t/cb_sq/indices");
  VQNearestArgs a{z.dtype, N, K, D, z.data<void>(), z.stride(0), z.stride(1),
                  cb_t.data<float>(), cb_sq.data<float>(), indices.data<int64_t>(), z.device, stream};
  if (N == 0) return;
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (z.is_cuda()) return cuda::vq_nearest(a);
#endif
  cpu::vq_nearest(a);
}

// ---- tile_blend ---------------------------------------------------------------------

// dst += weight * src over one box; src and weight optional, weight may broadcast
// (zero strides). Size-1 dimensions are dropped and neighbours that are
// contiguous in every operand merged, so kernels see few, long dimensions.
void tile_blend_accumulate(const TensorDesc& dst, const py::object& src_obj, const py::object& w_obj,
                           std::uintptr_t stream) {
  require_device(dst, "tile_blend");
  check(dst.dtype == DType::Float32, "dst: must be float32");
  const TensorDesc* src = src_obj.is_none() ? nullptr : &src_obj.cast<const TensorDesc&>();
  const TensorDesc* w = w_obj.is_none() ? nullptr : &w_obj.cast<const TensorDesc&>();
  if (src) {
    check_shape(*src, dst.shape, "src");
    check(is_float(src->dtype), "src: must be float32, float16 or bfloat16");
    check_same_device(dst, *src, "src");
  }
  if (w) {
    check_shape(*w, dst.shape, "weight");
    check(w->dtype == DType::Float32, "weight: must be float32");
    check_same_device(dst, *w, "weight");
  }
  TileBlendArgs a{};
  a.src_dtype = src ? src->dtype : DType::Float32;
  a.dst = dst.data<float>();
  a.src = src ? src->data<void>() : nullptr;
  a.w = w ? w->data<float>() : nullptr;
  a.device = dst.device;
  a.stream = stream;
  int nd = 0;
  for (int64_t i = 0; i < dst.dim(); ++i) {
    const int64_t n = dst.size(i);
    if (n == 0) return;  // empty box: nothing to add
    if (n == 1) continue;
    const int64_t ds = dst.stride(i), ss = src ? src->stride(i) : 0, ws = w ? w->stride(i) : 0;
    if (nd > 0 && a.dst_st[nd - 1] == ds * n && a.src_st[nd - 1] == ss * n && a.w_st[nd - 1] == ws * n) {
      a.shape[nd - 1] *= n;  // merge with the previous dimension
      a.dst_st[nd - 1] = ds;
      a.src_st[nd - 1] = ss;
      a.w_st[nd - 1] = ws;
      continue;
    }
    check(nd < kMaxTileBlendDims, "tile_blend: too many non-mergeable dimensions (at most 8)");
    a.shape[nd] = n;
    a.dst_st[nd] = ds;
    a.src_st[nd] = ss;
    a.w_st[nd] = ws;
    ++nd;
  }
  if (nd == 0) {  // a single element
    a.shape[0] = 1;
    nd = 1;
  }
  a.ndim = nd;
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (dst.is_cuda()) return cuda::tile_blend_accumulate(a);
#endif
  cpu::tile_blend_accumulate(a);
}

// Row-major with no gaps (size-1 dimensions may carry any stride, as torch's are).
bool is_dense(const TensorDesc& t) {
  int64_t expect = 1;
  for (int64_t i = t.dim() - 1; i >= 0; --i) {
    if (t.size(i) != 1 && t.stride(i) != expect) return false;
    expect *= t.size(i);
  }
  return true;
}

// out (B, C, *S) /= weight_sum (*S) where weight_sum > 0, both dense float32.
void tile_normalize(const TensorDesc& out, const TensorDesc& weight_sum, std::uintptr_t stream) {
  require_device(out, "tile_normalize");
  check(out.dtype == DType::Float32 && weight_sum.dtype == DType::Float32,
        "tile_normalize: out and weight_sum must be float32");
  check(out.dim() >= 2, "tile_normalize: out must be (B, C, *S)");
  check_shape(weight_sum, std::vector<int64_t>(out.shape.begin() + 2, out.shape.end()), "weight_sum");
  check_same_device(out, weight_sum, "weight_sum");
  check(is_dense(out) && is_dense(weight_sum), "tile_normalize: out and weight_sum must be contiguous");
  TileNormalizeArgs a{};
  a.out = out.data<float>();
  a.w = weight_sum.data<float>();
  a.planes = out.size(0) * out.size(1);
  a.voxels = 1;
  for (auto n : weight_sum.shape) a.voxels *= n;
  a.device = out.device;
  a.stream = stream;
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (out.is_cuda()) return cuda::tile_normalize(a);
#endif
  cpu::tile_normalize(a);
}

// ---- patch_embed / unpatchify -------------------------------------------------------

// Checks the patch sizes against the spatial extents and pads both to kMaxPatchDims
// axes in front (grid 1, patch 1); returns the number of spatial axes.
int pad_patch(const std::vector<int64_t>& patch, const std::vector<int64_t>& spatial, int64_t* grid_out,
              int64_t* patch_out, const char* op) {
  const int nd = static_cast<int>(patch.size());
  check(nd >= 1 && nd <= kMaxPatchDims, std::string(op) + ": takes 1 to 4 spatial axes");
  check(spatial.size() == patch.size(), std::string(op) + ": patch and spatial axes differ in number");
  const int pad = kMaxPatchDims - nd;
  for (int d = 0; d < kMaxPatchDims; ++d) {
    grid_out[d] = 1;
    patch_out[d] = 1;
  }
  for (int d = 0; d < nd; ++d) {
    check(patch[d] > 0 && spatial[d] % patch[d] == 0,
          std::string(op) + ": spatial size " + std::to_string(spatial[d]) + " is not a multiple of the patch " +
              std::to_string(patch[d]));
    patch_out[pad + d] = patch[d];
    grid_out[pad + d] = spatial[d] / patch[d];
  }
  return nd;
}

void patch_embed_forward(const TensorDesc& x, const TensorDesc& weight, const py::object& bias_obj,
                         const py::object& pos_obj, const TensorDesc& out, const std::vector<int64_t>& patch,
                         std::uintptr_t stream) {
  require_device(x, "patch_embed");
  check(is_float(x.dtype), "x: must be float32, float16 or bfloat16");
  check(x.dim() >= 3, "x: expected (B, C, *spatial)");
  PatchEmbedArgs a{};
  a.dtype = x.dtype;
  a.B = x.size(0);
  a.C = x.size(1);
  const std::vector<int64_t> spatial(x.shape.begin() + 2, x.shape.end());
  const int nd = pad_patch(patch, spatial, a.grid, a.patch, "patch_embed");
  const int pad = kMaxPatchDims - nd;
  a.x = x.data<void>();
  a.x_sb = x.stride(0);
  a.x_sc = x.stride(1);
  for (int d = 0; d < kMaxPatchDims; ++d) a.x_ss[d] = d < pad ? 0 : x.stride(2 + d - pad);
  a.N = 1;
  int64_t volume = 1;
  for (int d = 0; d < kMaxPatchDims; ++d) {
    a.N *= a.grid[d];
    volume *= a.patch[d];
  }
  a.K = a.C * volume;
  check(weight.dim() == 2 && weight.size(1) == a.K, "weight: expected (hidden, C * prod(patch))");
  a.hidden = weight.size(0);
  check(weight.dtype == x.dtype, std::string("weight: dtype ") + dtype_name(weight.dtype) + " differs from x's " +
                                     dtype_name(x.dtype));
  check_same_device(x, weight, "weight");
  a.weight = weight.data<void>();
  a.w_sh = weight.stride(0);
  a.w_sk = weight.stride(1);
  if (!bias_obj.is_none()) {
    const auto& bias = bias_obj.cast<const TensorDesc&>();
    check_shape(bias, {a.hidden}, "bias");
    check(bias.dtype == x.dtype, "bias: dtype differs from x's");
    check_same_device(x, bias, "bias");
    a.bias = bias.data<void>();
    a.bias_s = bias.stride(0);
  }
  if (!pos_obj.is_none()) {
    const auto& pos = pos_obj.cast<const TensorDesc&>();
    check_shape(pos, {a.N, a.hidden}, "pos_embed");
    check(pos.dtype == x.dtype, "pos_embed: dtype differs from x's");
    check(a.hidden == 1 || pos.stride(1) == 1, "pos_embed: the hidden dimension must be contiguous");
    check_same_device(x, pos, "pos_embed");
    a.pos = pos.data<void>();
    a.pos_sn = pos.stride(0);
  }
  check_shape(out, {a.B, a.N, a.hidden}, "out");
  check(out.dtype == x.dtype, "out: dtype differs from x's");
  check(a.hidden == 1 || out.stride(2) == 1, "out: the hidden dimension must be contiguous");
  check_same_device(x, out, "out");
  a.out = out.data<void>();
  a.out_sb = out.stride(0);
  a.out_sn = out.stride(1);
  a.device = x.device;
  a.stream = stream;
  if (a.B * a.N * a.hidden == 0) return;
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (x.is_cuda()) return cuda::patch_embed_forward(a);
#endif
  cpu::patch_embed_forward(a);
}

void unpatchify(const TensorDesc& tokens, const TensorDesc& out, const std::vector<int64_t>& patch,
                std::uintptr_t stream) {
  require_device(tokens, "unpatchify");
  check(is_float(tokens.dtype), "tokens: must be float32, float16 or bfloat16");
  check(out.dim() >= 3, "out: expected (B, C, *spatial)");
  UnpatchifyArgs a{};
  a.dtype = tokens.dtype;
  a.B = out.size(0);
  a.C = out.size(1);
  const std::vector<int64_t> spatial(out.shape.begin() + 2, out.shape.end());
  const int nd = pad_patch(patch, spatial, a.grid, a.patch, "unpatchify");
  const int pad = kMaxPatchDims - nd;
  int64_t n = 1, volume = 1;
  for (int d = 0; d < kMaxPatchDims; ++d) {
    n *= a.grid[d];
    volume *= a.patch[d];
  }
  check_shape(tokens, {a.B, n, volume * a.C}, "tokens");
  check(out.dtype == tokens.dtype, "out: dtype differs from the tokens'");
  check_same_device(tokens, out, "out");
  a.tokens = tokens.data<void>();
  a.t_sb = tokens.stride(0);
  a.t_sn = tokens.stride(1);
  a.t_sf = tokens.stride(2);
  a.out = out.data<void>();
  a.o_sb = out.stride(0);
  a.o_sc = out.stride(1);
  for (int d = 0; d < kMaxPatchDims; ++d) a.o_ss[d] = d < pad ? 0 : out.stride(2 + d - pad);
  a.device = tokens.device;
  a.stream = stream;
  if (a.B * a.C * n * volume == 0) return;
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (tokens.is_cuda()) return cuda::unpatchify(a);
#endif
  cpu::unpatchify(a);
}

// ---- attention ----------------------------------------------------------------------

const float* attention_table(const py::object& obj, int64_t rows, int64_t D, int device, const char* name) {
  if (obj.is_none()) return nullptr;
  const auto& t = obj.cast<const TensorDesc&>();
  check(t.dtype == DType::Float32, std::string(name) + ": must be float32");
  check_shape(t, rows < 0 ? std::vector<int64_t>{D} : std::vector<int64_t>{rows, D}, name);
  const bool dense = rows < 0 ? (D <= 1 || t.stride(0) == 1)
                              : ((rows <= 1 || t.stride(0) == D) && (D <= 1 || t.stride(1) == 1));
  check(dense, std::string(name) + ": must be contiguous");
  check(t.device == device, std::string(name) + ": on a different device than q");
  return t.data<float>();
}

void attention_forward(const TensorDesc& q, const TensorDesc& k, const TensorDesc& v, const TensorDesc& out,
                       const py::object& cos, const py::object& sin, const py::object& q_weight,
                       const py::object& q_bias, const py::object& q_eps, const py::object& k_weight,
                       const py::object& k_bias, const py::object& k_eps, std::uintptr_t stream) {
  require_device(q, "attention");
  check(q.dim() == 4, "q: expected a (B, H, N, D) tensor");
  check(is_float(q.dtype), "q: must be float32, float16 or bfloat16");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  check(D >= 1 && D <= kMaxAttentionHeadDim, "attention: head dim must be 1 to 128");
  for (const auto* t : {&k, &v, &out}) {
    check_shape(*t, {B, H, N, D}, "k/v/out");
    check(t->dtype == q.dtype, std::string("k/v/out: dtype ") + dtype_name(t->dtype) + " differs from q's " +
                                   dtype_name(q.dtype));
    check_same_device(q, *t, "k/v/out");
  }
  check(D == 1 || out.stride(3) == 1, "out: the last dimension must be contiguous");
  AttentionArgs a{};
  a.dtype = q.dtype;
  a.B = B; a.H = H; a.N = N; a.D = D;
  a.q = q.data<void>(); a.q_sb = q.stride(0); a.q_sh = q.stride(1); a.q_sn = q.stride(2); a.q_sd = q.stride(3);
  a.k = k.data<void>(); a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.k_sn = k.stride(2); a.k_sd = k.stride(3);
  a.v = v.data<void>(); a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_sn = v.stride(2); a.v_sd = v.stride(3);
  a.out = out.data<void>(); a.out_sb = out.stride(0); a.out_sh = out.stride(1); a.out_sn = out.stride(2);
  a.cos = attention_table(cos, N, D, q.device, "cos");
  a.sin = attention_table(sin, N, D, q.device, "sin");
  check((a.cos == nullptr) == (a.sin == nullptr), "cos/sin: give both RoPE tables or neither");
  check(a.cos == nullptr || D % 2 == 0, "attention: RoPE needs an even head dim");
  a.q_norm = q_eps.is_none() ? 0 : 1;
  a.k_norm = k_eps.is_none() ? 0 : 1;
  a.q_eps = a.q_norm ? q_eps.cast<float>() : 0.f;
  a.k_eps = a.k_norm ? k_eps.cast<float>() : 0.f;
  check((!a.q_norm || a.q_eps > 0.f) && (!a.k_norm || a.k_eps > 0.f), "attention: norm eps must be positive");
  a.q_w = attention_table(q_weight, -1, D, q.device, "q_weight");
  a.q_b = attention_table(q_bias, -1, D, q.device, "q_bias");
  a.k_w = attention_table(k_weight, -1, D, q.device, "k_weight");
  a.k_b = attention_table(k_bias, -1, D, q.device, "k_bias");
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  a.device = q.device;
  a.stream = stream;
  if (B * H * N == 0) return;
  py::gil_scoped_release release;
#ifdef MEDGEN_WITH_CUDA
  if (q.is_cuda()) return cuda::attention_forward(a);
#endif
  cpu::attention_forward(a);
}

py::dict build_info() {
  py::dict d;
  d["version"] = MEDGEN_VERSION_INFO;
  d["cpu"] = true;
#ifdef MEDGEN_WITH_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cpu_threads"] = cpu::num_threads();
  d["cuda"] = cuda_compiled();
#ifdef MEDGEN_WITH_CUDA
  d["cuda_archs"] = std::string(MEDGEN_CUDA_ARCHS);
  d["cuda_runtime_version"] = cuda::runtime_version();
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  d["ops"] = py::make_tuple("adaln_modulate", "gated_residual", "vq_nearest", "tile_blend", "tile_normalize",
                            "patch_embed", "unpatchify", "attention");
  return d;
}

py::dict cuda_devices() {
  py::dict d;
  py::list names;
#ifdef MEDGEN_WITH_CUDA
  std::string error;
  const int n = cuda::device_count(&error);
  for (int i = 0; i < n; ++i) names.append(cuda::device_name(i));
  d["driver_version"] = cuda::driver_version();
  d["error"] = error.empty() ? py::object(py::none()) : py::object(py::str(error));
#else
  d["driver_version"] = 0;
  d["error"] = py::str("built without CUDA");
#endif
  d["devices"] = names;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "medgen_rt native kernels (CPU always, CUDA when built with nvcc); no PyTorch linkage";

  py::class_<TensorDesc>(m, "TensorDesc")
      .def(py::init([](std::uintptr_t ptr, std::vector<int64_t> shape, std::vector<int64_t> strides,
                       const std::string& dtype, int device) {
             check(shape.size() == strides.size(), "TensorDesc: shape and strides differ in length");
             TensorDesc t;
             t.ptr = ptr;
             t.shape = std::move(shape);
             t.strides = std::move(strides);
             t.dtype = dtype_from_name(dtype);
             t.device = device;
             return t;
           }),
           py::arg("ptr"), py::arg("shape"), py::arg("strides"), py::arg("dtype"), py::arg("device") = -1)
      .def_readonly("ptr", &TensorDesc::ptr)
      .def_readonly("shape", &TensorDesc::shape)
      .def_readonly("strides", &TensorDesc::strides)
      .def_readonly("device", &TensorDesc::device)
      .def_property_readonly("dtype", [](const TensorDesc& t) { return dtype_name(t.dtype); })
      .def("__repr__", [](const TensorDesc& t) {
        std::string s = "TensorDesc(shape=(";
        for (auto v : t.shape) s += std::to_string(v) + ",";
        return s + "), dtype=" + dtype_name(t.dtype) + ", device=" + std::to_string(t.device) + ")";
      });

  m.def("build_info", &build_info, "What this build contains: cpu, openmp, cuda (+ archs), ops");
  m.def("set_num_threads", &cpu::set_num_threads, py::arg("n"),
        "Threads the CPU kernels may use (the bridge passes torch.get_num_threads()); small work uses one");
  m.def("cuda_devices", &cuda_devices, "CUDA devices visible to the native runtime (empty without a GPU)");
  m.def("adaln_modulate_forward", &adaln_modulate_forward, py::arg("x"), py::arg("shift"), py::arg("scale"),
        py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("eps"), py::arg("stream") = 0,
        "y = LayerNorm(x) * (1 + scale[b]) + shift[b]; writes y and (optionally) per-row mean/rstd");
  m.def("adaln_modulate_backward", &adaln_modulate_backward, py::arg("dy"), py::arg("x"), py::arg("scale"),
        py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dscale_partial"), py::arg("dshift_partial"),
        py::arg("stream") = 0,
        "dx, and per-chunk partial sums of dscale/dshift over rows");
  m.def("gated_residual_forward", &gated_residual_forward, py::arg("x"), py::arg("gate"), py::arg("y"), py::arg("out"),
        py::arg("stream") = 0, "out = x + gate[b] * y");
  m.def("gated_residual_backward", &gated_residual_backward, py::arg("dout"), py::arg("gate"), py::arg("y"),
        py::arg("dy"), py::arg("dgate_partial"), py::arg("stream") = 0,
        "dy = gate * dout (dy may be None); per-chunk partial sums of dout * y over rows (may be None)");
  m.def("vq_nearest", &vq_nearest, py::arg("z"), py::arg("cb_t"), py::arg("cb_sq"), py::arg("indices"),
        py::arg("stream") = 0, "indices[n] = argmin_k |c_k|^2 - 2 z_n.c_k (float32, ties to the lowest k)");
  m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("cos"), py::arg("sin"), py::arg("q_weight"), py::arg("q_bias"), py::arg("q_eps"), py::arg("k_weight"),
        py::arg("k_bias"), py::arg("k_eps"), py::arg("stream") = 0,
        "out = softmax(q' k'^T / sqrt(D)) v, q' and k' after LayerNorm (eps None: none) and RoPE (cos None: none)");
  m.def("tile_blend_accumulate", &tile_blend_accumulate, py::arg("dst"), py::arg("src"), py::arg("weight"),
        py::arg("stream") = 0, "dst += weight * src in place (src, weight optional; weight may broadcast)");
  m.def("tile_normalize", &tile_normalize, py::arg("out"), py::arg("weight_sum"), py::arg("stream") = 0,
        "out /= weight_sum in place where weight_sum > 0 (weight_sum broadcast over batch and channels)");
  m.def("patch_embed_forward", &patch_embed_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("pos"),
        py::arg("out"), py::arg("patch"), py::arg("stream") = 0,
        "out = patches(x) @ weight^T + bias + pos (bias, pos may be None), patches gathered from x's strides");
  m.def("unpatchify", &unpatchify, py::arg("tokens"), py::arg("out"), py::arg("patch"), py::arg("stream") = 0,
        "out (B, C, *S) <- tokens (B, N, prod(patch) * C) laid out (p1, .., pn, C)");
}
