// How one element is stored and read, for both loops of the step (step.cpp's portable one and
// adamw_q8_avx512.h's): dtypes and storage kinds, the calls' arguments (Segment, Hyper), rounding
// to bf16 (nearest even and stochastic), the counter-based noise, and the 8-bit moment codes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>

namespace {

enum Kind { F32_PARAM = 0, F32_MASTER = 1, REMAINDER = 2, KAHAN = 3, STOCHASTIC = 4 };
enum DType { F32 = 0, BF16 = 1, F16 = 2, Q8 = 3 };  // Q8: 8-bit moments, block-wise (AdamW)

inline float from_bits(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

inline float bf16_to_f32(uint16_t h) { return from_bits(uint32_t(h) << 16); }
// Round to nearest even, as c10::BFloat16 (NaN becomes 0x7FC0).
inline uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u = to_bits(f);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
inline float f16_to_f32(uint16_t h) { return float(__builtin_bit_cast(_Float16, h)); }
inline uint16_t f32_to_f16(float f) { return __builtin_bit_cast(uint16_t, _Float16(f)); }

template <int D> inline float load(const void* p, int64_t i) {
  if (D == F32) return static_cast<const float*>(p)[i];
  if (D == BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// Counter-based noise: uniform 16-bit lanes per (seed, step counter, element), from a 32-bit
// multiply-xorshift hash (Wellons' lowbias32), which vectorizes at full width. Stochastic
// rounding only needs each 16-bit lane uniform.
inline uint64_t mix(uint64_t x) {  // splitmix64's finalizer, for the per-call key
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352DU;
  x ^= x >> 15;
  x *= 0x846CA68BU;
  return x ^ (x >> 16);
}

// Stochastic rounding to bf16: add uniform integer noise in [-2**15, 2**15) to the FP32 bits and
// split (ties away from zero): up with probability (low 16 bits) / 2**16, unbiased.
inline uint16_t round_stochastic(float f, uint16_t lane) {
  int32_t b = int32_t(to_bits(f)) + int32_t(int16_t(lane));
  int16_t lo = int16_t(b);
  return uint16_t(uint32_t(b - int32_t(lo)) >> 16);
}

struct Segment {
  void* w;        // the parameter (F32_PARAM) or its 16-bit weight
  void* s;        // storage: FP32 master, int16 remainder, bf16 compensation, or null
  const void* g;  // gradient
  void* m;        // first moment or momentum buffer (may be null for SGD without momentum)
  void* v;        // second moment (AdamW)
  int64_t n;
  int64_t index;  // where the segment starts in the optimizer's numbering of elements (noise)
  float a, b;     // AdamW: -step size, sqrt(bias correction 2). SGD: 1 when the momentum buffer is new
  float* ms;      // Q8: the block scales of m and v
  float* vs;
};

struct Hyper {
  float decay, c1, beta2, c2, eps;      // AdamW (decay: 1 - lr * weight_decay)
  float lr, wd, momentum, dampening;    // SGD
  float factor, clamp;                  // gradient unscale/clip factor, clip value
  int32_t has_decay, maximize, has_factor, has_clamp, nesterov, has_momentum;
  uint64_t seed, counter;
  int32_t threads;
};

// The arrays of one segment, as restrict pointers: the loops then read nothing but them (a store
// through a float* could otherwise alias the hyper-parameters, and nothing would vectorize).
struct Arrays {
  float* __restrict__ f32;      // F32_PARAM: the parameter; F32_MASTER: the master
  uint16_t* __restrict__ w;     // the 16-bit weight
  uint16_t* __restrict__ c;     // KAHAN: the compensation
  int16_t* __restrict__ r;      // REMAINDER: the remainder
  const void* __restrict__ g;
  void* __restrict__ m;
  void* __restrict__ v;
};

template <int K>
inline Arrays arrays(const Segment& s) {
  Arrays a{nullptr, nullptr, nullptr, nullptr, s.g, s.m, s.v};
  if (K == F32_PARAM) a.f32 = static_cast<float*>(s.w);
  else a.w = static_cast<uint16_t*>(s.w);
  if (K == F32_MASTER) a.f32 = static_cast<float*>(s.s);
  if (K == KAHAN) a.c = static_cast<uint16_t*>(s.s);
  if (K == REMAINDER) a.r = static_cast<int16_t*>(s.s);
  return a;
}

template <int K>
inline float decode(const Arrays& a, int64_t i) {
  if constexpr (K == F32_PARAM || K == F32_MASTER) return a.f32[i];
  else if constexpr (K == REMAINDER) return from_bits((uint32_t(a.w[i]) << 16) + uint32_t(int32_t(a.r[i])));
  else if constexpr (K == KAHAN) return bf16_to_f32(a.w[i]) + bf16_to_f32(a.c[i]);
  else return bf16_to_f32(a.w[i]);
}

template <int K, int W>
inline void encode(const Arrays& a, int64_t i, float p, uint16_t lane) {
  if constexpr (K == F32_PARAM) {
    a.f32[i] = p;
  } else if constexpr (K == F32_MASTER) {
    a.f32[i] = p;
    a.w[i] = W == F16 ? f32_to_f16(p) : f32_to_bf16(p);
  } else if constexpr (K == REMAINDER) {  // low 16 bits as signed; the rest, exact, is the bf16 weight (ties away)
    int32_t b = int32_t(to_bits(p));
    int16_t lo = int16_t(b);
    a.r[i] = lo;
    a.w[i] = uint16_t(uint32_t(b - int32_t(lo)) >> 16);
  } else if constexpr (K == KAHAN) {
    uint16_t w = f32_to_bf16(p);
    a.w[i] = w;
    a.c[i] = f32_to_bf16(p - bf16_to_f32(w));
  } else {
    a.w[i] = round_stochastic(p, lane);
  }
}

template <int M>
inline float load_moment(const void* p, int64_t i) {
  if constexpr (M == F32) return static_cast<const float*>(p)[i];
  else return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}
template <int M>
inline void store_moment(void* p, int64_t i, float x, uint16_t lane) {
  if constexpr (M == F32) static_cast<float*>(p)[i] = x;
  else static_cast<uint16_t*>(p)[i] = round_stochastic(x, lane);  // a bf16 v * 0.999 never changes otherwise
}

// The gradient as torch's eager path prepares it: times the unscale/clip factor, clamped
// (clamp_min then clamp_max; NaN stays NaN), negated under maximize. Branch-free, so the loops
// vectorize: without a factor it multiplies by 1, without a clamp it clamps at infinity, and
// maximize multiplies by -1, all exact.
struct GradPrep {
  float factor, clamp, sign;
  GradPrep(const Hyper& h)
      : factor(h.has_factor ? h.factor : 1.0f), clamp(h.has_clamp ? h.clamp : INFINITY), sign(h.maximize ? -1.0f : 1.0f) {}
  inline float operator()(float g) const {
    g = g * factor;
    g = g < -clamp ? -clamp : g;
    g = g > clamp ? clamp : g;
    return g * sign;
  }
};

// Two 32-bit words of noise for an element: the weight's lane, and the moments' lanes (the second
// word only for bf16 moments). ``key`` mixes the seed and the step counter, once per call.
struct Noise { uint32_t a, b; };
template <int K, int M>
inline Noise noise(uint64_t key, int64_t index) {
  Noise n{0, 0};
  const uint32_t i = uint32_t(index) * 0x9E3779B9U;
  if constexpr (K == STOCHASTIC || M != F32) n.a = hash32(uint32_t(key) ^ i);
  if constexpr (M != F32) n.b = hash32(uint32_t(key >> 32) ^ i);
  return n;
}

// The 8-bit step's weight lanes (stochastic rounding): one hash for two elements, its low 16 bits
// for element i and its high 16 for element i + 16 of each 32 (counted from the segment's start),
// so that a vector of 16 elements and the next share 16 hashes. ``seg_key`` mixes the call's key
// with the segment's first element, which is distinct per tensor and per shard.
inline uint32_t segment_key(uint64_t key, int64_t index) { return uint32_t(mix(key ^ uint64_t(index))); }
inline uint16_t q8_lane(uint32_t seg_key, int64_t i) {
  const uint32_t word = uint32_t(((i >> 5) << 4) | (i & 15));
  return uint16_t(hash32(seg_key ^ word * 0x9E3779B9U) >> (i & 16));
}

// 8-bit moments (lightning_mp/optim/quant.py, whose torch functions this follows op for op): per
// block of QBLOCK elements an FP32 scale, the block's largest magnitude, and per element a
// minifloat code of the element over it (3 mantissa bits; exponent bias 15 for m, signed, and 31
// for v), rounded to nearest even.
constexpr int64_t QBLOCK = 256;
constexpr int QM = 3;
// Codes from 1 << QM up are normal: their bits, shifted into an FP32's exponent and mantissa
// fields and rebiased, are their value. Below are 0 and the subnormal codes, a multiple of the
// smallest step. A block whose codes (or, to encode, values) are all normal, the common case,
// takes the normal formula alone; any other block computes both and selects, branch-free so that
// the loops vectorize. (Decoding a subnormal code as an FP32 subnormal times a power of two would
// need no select, but it slows on subnormal operands and gives 0 under flush-to-zero modes.)
template <int BIAS, bool NORMAL> inline float q8_decode(int32_t c) {  // c >= 0
  const float normal = from_bits((uint32_t(c) << (23 - QM)) + (uint32_t(127 - BIAS) << 23));
  if constexpr (NORMAL) return normal;
  const float sub = float(c) * from_bits(uint32_t(127 + 1 - BIAS - QM) << 23);
  const uint32_t is_normal = uint32_t(-int32_t(c >= (1 << QM)));  // all ones or zero: a select the loop vectorizes
  return from_bits((to_bits(sub) & ~is_normal) | (to_bits(normal) & is_normal));
}
template <int BIAS, bool NORMAL> inline int q8_encode(float u) {  // u in [0, 1]
  const uint32_t b = to_bits(u);  // round to QM mantissa bits, ties to even, then rebias
  const int normal = int((b + (((1u << (22 - QM)) - 1) - (uint32_t(127 - BIAS) << 23)) + ((b >> (23 - QM)) & 1)) >> (23 - QM));
  if constexpr (NORMAL) return normal;
  const int sub = int(std::nearbyint(u * from_bits(uint32_t(127 + BIAS - 1 + QM) << 23)));
  return u < from_bits(uint32_t(127 + 1 - BIAS) << 23) ? sub : normal;
}

// A block's decisions, the same in both loops. Whether its codes are all normal (decoding takes
// the normal formula alone):
inline bool codes_normal(const int8_t* mc, const uint8_t* vc, int64_t n) {
  uint8_t below = 0;  // any code under 1 << QM
  for (int64_t j = 0; j < n; ++j) below |= uint8_t(std::abs(int32_t(mc[j])) < (1 << QM)) | uint8_t(vc[j] < (1 << QM));
  return !below;
}
// One over a block's scale, its largest magnitude (1 for a block of zeros):
inline float inverse_scale(float max) { return 1.0f / (max > 0.0f ? max : 1.0f); }
// Whether every new value over its scale is normal (encoding takes the normal formula alone), from
// the smallest magnitudes, by the monotony of a rounded product:
inline bool values_normal(float mmin, float minv, float vmin, float vinv) {
  return mmin * minv >= from_bits(uint32_t(127 + 1 - 15) << 23) && vmin * vinv >= from_bits(uint32_t(127 + 1 - 31) << 23);
}

}  // namespace
