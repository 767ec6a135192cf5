// Element conversions for the CPU kernels' hot loops, written so GCC
// vectorises them inside the AVX2 clones of the row functions (the portable
// helpers in common/float_convert.h branch per element and stay scalar).
// Same results as those helpers: round to nearest even, NaN stays NaN.
//   bfloat16: bit operations (vpslld / vpsrld plus a select for NaN).
//   float16: the compiler's _Float16 conversions (F16C vcvtph2ps / vcvtps2ph in
//   the AVX2 clones) where the compiler has _Float16, else the portable helpers.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/float_convert.h"

namespace medgen {
namespace cpu {

inline float ld(const float* p, int64_t i) { return p[i]; }
inline void st(float* p, int64_t i, float v) { p[i] = v; }

inline float ld(const bfloat16_t* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(p[i].bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void st(bfloat16_t* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  p[i].bits = static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);  // quiet NaN as in from_float
}

#if defined(__FLT16_MAX__)
inline float ld(const half_t* p, int64_t i) {
  _Float16 h;
  std::memcpy(&h, &p[i], 2);
  return static_cast<float>(h);
}

inline void st(half_t* p, int64_t i, float v) {
  const _Float16 h = static_cast<_Float16>(v);
  std::memcpy(&p[i], &h, 2);
}
#else
inline float ld(const half_t* p, int64_t i) { return to_float(p[i]); }
inline void st(half_t* p, int64_t i, float v) { p[i] = from_float<half_t>(v); }
#endif

}  // namespace cpu
}  // namespace medgen
