// A tensor as the bindings see it: raw pointer, shape, strides (in elements),
// dtype and device. Python builds these from torch tensors, so the extension
// never links against PyTorch and one build serves every torch version.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace medgen {

// Int64 only for index outputs (vq_nearest); kernels' value tensors are the three float types.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Int64 = 3 };

inline bool is_float(DType d) { return d != DType::Int64; }

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
  }
  return "?";
}

inline DType dtype_from_name(const std::string& s) {
  if (s == "float32") return DType::Float32;
  if (s == "float16") return DType::Float16;
  if (s == "bfloat16") return DType::BFloat16;
  if (s == "int64") return DType::Int64;
  throw std::invalid_argument("unsupported dtype '" + s + "' (expected float32, float16, bfloat16 or int64)");
}

struct TensorDesc {
  std::uintptr_t ptr = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements, like torch.Tensor.stride()
  DType dtype = DType::Float32;
  int device = -1;  // -1: host memory; >= 0: CUDA device ordinal

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t i) const { return shape.at(i < 0 ? i + dim() : i); }
  int64_t stride(int64_t i) const { return strides.at(i < 0 ? i + dim() : i); }
  bool is_cuda() const { return device >= 0; }
  template <typename T> T* data() const { return reinterpret_cast<T*>(ptr); }
};

// Argument checks shared by every op; messages name the argument.
inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

inline void check_shape(const TensorDesc& t, const std::vector<int64_t>& shape, const char* name) {
  bool ok = t.shape == shape;
  if (!ok) {
    std::string got, want;
    for (auto s : t.shape) got += std::to_string(s) + ",";
    for (auto s : shape) want += std::to_string(s) + ",";
    throw std::invalid_argument(std::string(name) + ": shape (" + got + ") but expected (" + want + ")");
  }
}

inline void check_same_device(const TensorDesc& a, const TensorDesc& b, const char* name) {
  check(a.device == b.device, std::string(name) + ": on a different device than the input");
}

}  // namespace medgen
