// pybind11 module medgen_rt._C. Each op takes TensorDescs (pointer, shape,
// strides, dtype, device) for its inputs and preallocated outputs, validates
// them here, and dispatches to csrc/cpu or csrc/cuda by the device.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common/tensor.h"
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

void adaln_forward(const TensorDesc& x, const TensorDesc& shift, const TensorDesc& scale, const TensorDesc& y,
                   const py::object& mean, const py::object& rstd, float eps, std::uintptr_t stream) {
  require_device(x, "adaln_modulate");
  check(x.dim() == 3, "x: expected a (B, N, C) tensor");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  check(C > 0, "x: C must be positive");
  check_rows(x, B, N, C, x.dtype, x.device, "x");
  check_rows(y, B, N, C, x.dtype, x.device, "y");
  check_mod(shift, B, C, x.dtype, x.device, "shift");
  check_mod(scale, B, C, x.dtype, x.device, "scale");
  AdaLNArgs a{x.dtype, B, N, C,
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

void adaln_backward(const TensorDesc& dy, const TensorDesc& x, const TensorDesc& scale, const TensorDesc& mean,
                    const TensorDesc& rstd, const TensorDesc& dx, const TensorDesc& dscale_partial,
                    const TensorDesc& dshift_partial, std::uintptr_t stream) {
  require_device(x, "adaln_modulate backward");
  check(x.dim() == 3, "x: expected a (B, N, C) tensor");
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
  AdaLNBackwardArgs a{x.dtype, B, N, C, chunks,
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

py::dict build_info() {
  py::dict d;
  d["version"] = MEDGEN_VERSION_INFO;
  d["cpu"] = true;
#ifdef MEDGEN_WITH_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cpu_threads"] = cpu::max_threads();
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
  d["ops"] = py::make_tuple("adaln_modulate");
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
  m.def("cuda_devices", &cuda_devices, "CUDA devices visible to the native runtime (empty without a GPU)");
  m.def("adaln_modulate_forward", &adaln_forward, py::arg("x"), py::arg("shift"), py::arg("scale"), py::arg("y"),
        py::arg("mean"), py::arg("rstd"), py::arg("eps"), py::arg("stream") = 0,
        "y = LayerNorm(x) * (1 + scale[b]) + shift[b]; writes y and (optionally) per-row mean/rstd");
  m.def("adaln_modulate_backward", &adaln_backward, py::arg("dy"), py::arg("x"), py::arg("scale"), py::arg("mean"),
        py::arg("rstd"), py::arg("dx"), py::arg("dscale_partial"), py::arg("dshift_partial"), py::arg("stream") = 0,
        "dx, and per-chunk partial sums of dscale/dshift over rows");
}
