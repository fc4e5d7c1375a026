// Helpers shared by the CPU kernels: per-ISA function clones and a vectorisable exp.
//
// The extension is built with portable flags (no -march=native), so the hot loops are
// compiled several times on x86-64 (AVX-512, AVX2+FMA, baseline SSE2) and the loader
// picks the best clone for the running CPU (GCC/Clang function multi-versioning). Other
// architectures get one build of the same plain loops, vectorised for their baseline.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// GCC vectorises the loops over exp_f32/sigmoid only without trapping math: with it,
// jump threading turns the clamps into branches and if-conversion will not flatten them
// (on AVX2 and SSE2; AVX-512 masks them), so those loops run scalar, 3-8x slower.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__NO_TRAPPING_MATH__)
#error "dalle3_fast CPU kernels must be compiled with -fno-trapping-math (see setup.py)"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define D3F_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define D3F_CLONES
#endif

// Loop bodies are force-inlined into each clone so they are vectorised for its ISA.
#if defined(__GNUC__) || defined(__clang__)
#define D3F_INLINE inline __attribute__((always_inline))
#else
#define D3F_INLINE inline
#endif

namespace d3f {

// exp(x) for float, accurate to about 2 ulp on [-87, 88], written so loops over it
// vectorise (no calls, no branches): Cody-Waite range reduction and the Cephes expf
// polynomial, 2^n built from the exponent bits. Inputs are clamped, so -inf -> 0.
static D3F_INLINE float exp_f32(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

static D3F_INLINE double exp_any(double x) { return std::exp(x); }
static D3F_INLINE float exp_any(float x) { return exp_f32(x); }

static D3F_INLINE double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// From e = exp(-|z|) in (0, 1]: one division by 1 + e in (1, 2] and a select. The
// plain 1 / (1 + exp(-z)) compiles to two divisions per vector (GCC keeps the clamped
// exp as a separate path) and ran 2x slower on AVX2.
static D3F_INLINE float sigmoid(float z) {
  const float e = exp_f32(-std::fabs(z));
  const float s = 1.0f / (1.0f + e);
  return z >= 0.0f ? s : e * s;
}

}  // namespace d3f
