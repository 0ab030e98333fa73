// AdamW with 8-bit moments, written with AVX-512 intrinsics (F, BW and VL): step.cpp's
// adamw_q8_range op for op, bit for bit (tests/test_fused.py compares the two builds), 32 elements
// a step. Why by hand: GCC vectorizes the portable loop at the width of its narrowest type, the
// 8-bit codes, so 64 elements an iteration, whose live values spill out of the 32 registers; here
// the 32 elements are two registers of 16 floats, a block's tail is a masked load and store, and
// the gradient's unscale/clip is left out where there is none (multiplying by 1 and clamping at
// infinity are exact, so the results are the same).
//
// The two registers hold the even and the odd elements of the 32 (a Pair): a register of 32
// 16-bit values splits into them in one operation each (its low halves shifted up, its high halves
// masked) and joins back in two, where keeping the elements in order would take a widening or
// narrowing shuffle per register; every operation of the step is elementwise, so the order
// within the pair is free, and the noise lanes are permuted to match.
#pragma once

#include <immintrin.h>
#include <initializer_list>  // (the gradient's transform loops over the pair)

#include "formats.h"

namespace {
namespace avx512 {

using F = __m512;
using I = __m512i;
using M = __mmask16;
inline F f(I x) { return _mm512_castsi512_ps(x); }
inline I u(F x) { return _mm512_castps_si512(x); }
inline I c32(uint32_t x) { return _mm512_set1_epi32(int32_t(x)); }
inline I sext16(I x) { return _mm512_srai_epi32(_mm512_slli_epi32(x, 16), 16); }

struct Pair { F e, o; };  // elements 0, 2, ..., 30 and 1, 3, ..., 31 of 32
struct IPair { I e, o; };
struct Tail {             // the lanes of [j, n): of the 32 in order, of the even and of the odd
  __mmask32 all;
  M e, o;
};
inline M lanes(int64_t left) { return left >= 16 ? M(0xFFFF) : M((1u << left) - 1); }
inline Tail tail(int64_t left) {
  return {left >= 32 ? __mmask32(~0u) : __mmask32((1u << left) - 1), lanes((left + 1) / 2), lanes(left / 2)};
}
// A block's 32-element chunks: the whole ones with every lane set (the masks then fold away, and
// the loads and stores are plain ones: x0.93 in cache), then the last, partial one, masked
template <class Body> inline __attribute__((always_inline)) void chunks(int64_t n, Body&& body) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) body(j, Tail{__mmask32(~0u), M(0xFFFF), M(0xFFFF)});
  if (j < n) body(j, tail(n - j));
}
// 32 values of 16 bits: the even ones are the low halves of the 32-bit lanes, the odd ones the high
inline I load16(const uint16_t* p, const Tail& t) { return _mm512_maskz_loadu_epi16(t.all, p); }
inline Pair bf16(const uint16_t* p, const Tail& t) {
  const I x = load16(p, t);
  return {f(_mm512_slli_epi32(x, 16)), f(_mm512_and_si512(x, c32(0xFFFF0000u)))};
}
// ... and back: `lo` values in the low halves of e and o, or `hi` values in the high halves
inline void store16_lo(uint16_t* p, const Tail& t, I e, I o) {
  _mm512_mask_storeu_epi16(p, t.all, _mm512_ternarylogic_epi32(c32(0xFFFF0000u), _mm512_slli_epi32(o, 16), e, 0xCA));
}
inline void store16_hi(uint16_t* p, const Tail& t, I e, I o) {
  _mm512_mask_storeu_epi16(p, t.all, _mm512_ternarylogic_epi32(c32(0xFFFF0000u), o, _mm512_srli_epi32(e, 16), 0xCA));
}
// 32-bit values in order: 16 and 16, deinterleaved into the pair (two shuffles each way)
inline I evens() { return _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30); }
inline I odds() { return _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31); }
inline Pair split(F a, F b) { return {_mm512_permutex2var_ps(a, evens(), b), _mm512_permutex2var_ps(a, odds(), b)}; }
inline Pair f32(const float* p, const Tail& t) {
  return split(_mm512_maskz_loadu_ps(M(t.all), p), _mm512_maskz_loadu_ps(M(t.all >> 16), p + 16));
}
inline void store_f32(float* p, const Tail& t, Pair x) {
  const I lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const I hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_mask_storeu_ps(p, M(t.all), _mm512_permutex2var_ps(x.e, lo, x.o));
  _mm512_mask_storeu_ps(p + 16, M(t.all >> 16), _mm512_permutex2var_ps(x.e, hi, x.o));
}
inline I bf16_rne(F x) {  // as f32_to_bf16, in the low 16 bits of each lane
  const I b = u(x);
  const I r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, c32(0x7FFF)), _mm512_and_si512(_mm512_srli_epi32(b, 16), c32(1))), 16);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, c32(0x7FC0));
}
inline I f16_rne(F x) {  // as f32_to_f16, in the low 16 bits of each lane
  return _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline I hash32(I x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, c32(0x7FEB352DU));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, c32(0x846CA68BU));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
template <int G> inline Pair load_g(const void* g, int64_t i, const Tail& t) {
  if constexpr (G == F32) return f32(static_cast<const float*>(g) + i, t);
  else if constexpr (G == BF16) return bf16(static_cast<const uint16_t*>(g) + i, t);
  else {
    const uint16_t* p = static_cast<const uint16_t*>(g) + i;
    return split(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(M(t.all), p)), _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(M(t.all >> 16), p + 16)));
  }
}
template <int K> inline Pair decode(const Arrays& a, int64_t i, const Tail& t) {
  if constexpr (K == F32_PARAM || K == F32_MASTER) return f32(a.f32 + i, t);
  else if constexpr (K == REMAINDER) {  // (bf16 << 16) + the remainder, sign-extended
    const I w = load16(a.w + i, t), r = load16(reinterpret_cast<const uint16_t*>(a.r) + i, t);
    return {f(_mm512_add_epi32(_mm512_slli_epi32(w, 16), sext16(r))),
            f(_mm512_add_epi32(_mm512_and_si512(w, c32(0xFFFF0000u)), _mm512_srai_epi32(r, 16)))};
  } else if constexpr (K == KAHAN) {
    const Pair w = bf16(a.w + i, t), c = bf16(a.c + i, t);
    return {_mm512_add_ps(w.e, c.e), _mm512_add_ps(w.o, c.o)};
  } else return bf16(a.w + i, t);
}
template <int K, int W> inline void encode(const Arrays& a, int64_t i, const Tail& t, Pair p, IPair lane) {
  if constexpr (K == F32_PARAM) {
    store_f32(a.f32 + i, t, p);
  } else if constexpr (K == F32_MASTER) {
    store_f32(a.f32 + i, t, p);
    if constexpr (W == F16) store16_lo(a.w + i, t, f16_rne(p.e), f16_rne(p.o));
    else store16_lo(a.w + i, t, bf16_rne(p.e), bf16_rne(p.o));
  } else if constexpr (K == REMAINDER) {  // the low 16 bits are the remainder; the rest, exact, the bf16 weight
    // (formats.h's encode: the weight is the high half of b - int16(b), which is b's high half plus
    // 1 where the low half is 0x8000 or more: the high half of b + 0x8000, in one operation)
    const I be = u(p.e), bo = u(p.o);
    store16_lo(reinterpret_cast<uint16_t*>(a.r) + i, t, be, bo);
    store16_hi(a.w + i, t, _mm512_add_epi32(be, c32(0x8000u)), _mm512_add_epi32(bo, c32(0x8000u)));
  } else if constexpr (K == KAHAN) {
    const I we = bf16_rne(p.e), wo = bf16_rne(p.o);
    store16_lo(a.w + i, t, we, wo);
    store16_lo(a.c + i, t, bf16_rne(_mm512_sub_ps(p.e, f(_mm512_slli_epi32(we, 16)))), bf16_rne(_mm512_sub_ps(p.o, f(_mm512_slli_epi32(wo, 16)))));
  } else {  // formats.h's round_stochastic, in 3 operations instead of 7: for bits b and a 16-bit lane,
    // b + sext16(lane) rounded half up to a multiple of 2**16 is b + (lane ^ 0x8000) rounded down,
    // so that with `lane` holding lane ^ 0x8000 (zero-extended) the weight is the high half of b + lane
    store16_hi(a.w + i, t, _mm512_add_epi32(u(p.e), lane.e), _mm512_add_epi32(u(p.o), lane.o));
  }
}
template <int BIAS> inline F q8_decode(I c) {  // any code (the normal ones: q8_unbiased, below)
  const F normal = f(_mm512_add_epi32(_mm512_slli_epi32(c, 23 - QM), c32(uint32_t(127 - BIAS) << 23)));
  const F sub = _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(from_bits(uint32_t(127 + 1 - BIAS - QM) << 23)));
  return _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(c, _mm512_set1_epi32(1 << QM)), sub, normal);
}
// A normal code's bits shifted into place, without the bias: its value times 2**(BIAS - 127),
// exactly (a normal FP32). Times the block's scale times 2**(127 - BIAS), it is the same real
// product as the decoded value times the scale, rounded once: one operation fewer per code where
// that scale is exact (the scale under 2**(BIAS + 1)).
inline F q8_unbiased(I c) { return f(_mm512_slli_epi32(c, 23 - QM)); }
template <int BIAS> inline float unbiased_scale(float scale) { return scale * from_bits(uint32_t(127 + 127 - BIAS) << 23); }
template <int BIAS> inline bool unbiases(float scale) { return scale < from_bits(uint32_t(127 + BIAS + 1) << 23); }
template <int BIAS, bool NORMAL> inline I q8_encode(F x) {
  const I b = u(x);
  const I biased = _mm512_add_epi32(b, c32(((1u << (22 - QM)) - 1) - (uint32_t(127 - BIAS) << 23)));
  const __mmask16 odd = _mm512_test_epi32_mask(b, c32(1u << (23 - QM)));  // ties to even: + 1 where the kept lsb is 1
  const I normal = _mm512_srli_epi32(_mm512_mask_add_epi32(biased, odd, biased, c32(1)), 23 - QM);
  if constexpr (NORMAL) return normal;
  const I sub = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(from_bits(uint32_t(127 + BIAS - 1 + QM) << 23))),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, _mm512_set1_ps(from_bits(uint32_t(127 + 1 - BIAS) << 23)), _CMP_LT_OQ), normal, sub);
}
// 32 codes, the even ones in the low byte of e's lanes and the odd in o's: joined into 16-bit
// lanes (e's byte low), narrowed, stored
inline void store8(void* p, const Tail& t, I e, I o) {
  __m256i y = _mm512_cvtepi32_epi16(_mm512_ternarylogic_epi32(c32(0xFF00u), _mm512_slli_epi32(o, 8), e, 0xCA));
  asm("" : "+x"(y));  // keeps the compiler from folding narrowing and store into one (vpmovdw m256), slower on Zen 4
  _mm256_mask_storeu_epi8(p, t.all, y);
}

// Per block, two passes. The first decodes the moments and updates them (as step.cpp's
// adamw_q8_range) while taking their new extreme magnitudes, which give the block's scales. The
// second steps the weights and encodes the moments over the scales. Why not one pass as the
// portable loop: each weight waits on a chain of a square root and two divisions, and a pass
// that holds the whole update fills the out-of-order window with operations waiting on it (the
// divider then idles); the second pass holds little else, and the codes' integer work runs
// beside the divisions.
template <int K, int W, int G, bool PLAIN>
void adamw_q8_range(const Segment& seg, const Hyper& h, int64_t begin, int64_t end) {
  const Arrays a = arrays<K>(seg);
  const GradPrep prep(h);
  const F factor = _mm512_set1_ps(prep.factor), clamp = _mm512_set1_ps(prep.clamp), nclamp = _mm512_set1_ps(-prep.clamp),
          sign = _mm512_set1_ps(prep.sign);
  const F beta2 = _mm512_set1_ps(h.beta2), c2 = _mm512_set1_ps(h.c2), eps = _mm512_set1_ps(h.eps),
          neg_step = _mm512_set1_ps(seg.a), bc2 = _mm512_set1_ps(seg.b), decay = _mm512_set1_ps(h.has_decay ? h.decay : 1.0f);
  const bool small = std::fabs(h.c1) < 0.5f;
  const F lerp_c = _mm512_set1_ps(small ? h.c1 : h.c1 - 1.0f);
  const I seg_key = c32(segment_key(mix(h.seed ^ mix(h.counter)), seg.index));
  const I iota_g = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), c32(0x9E3779B9U));
  // formats.h's q8_lane gives element k < 16 of each 32 the low half of hash k and element 16 + k
  // its high half; as 16-bit words of the hashes, element 2j's is word 4j (j < 8) or 4j - 31, and
  // element 2j + 1's word 4j + 2 or 4j - 29 (a permutation into the low half of lane j)
  const I lane_e = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const I lane_o = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
  const I absmask = c32(0x7FFFFFFFu), signmask = c32(0x80000000u);
  int8_t* __restrict__ mq = static_cast<int8_t*>(seg.m);
  uint8_t* __restrict__ vq = static_cast<uint8_t*>(seg.v);
  alignas(64) float mb[QBLOCK], vb[QBLOCK];  // the new moments, as pairs
  for (int64_t b0 = begin; b0 < end; b0 += QBLOCK) {
    const int64_t n = b0 + QBLOCK < end ? QBLOCK : end - b0, blk = b0 / QBLOCK;
    int8_t* __restrict__ mc = mq + b0;
    uint8_t* __restrict__ vc = vq + b0;
    I mlo = c32(~0u), mhi = _mm512_setzero_si512(), vlo = c32(~0u), vhi = _mm512_setzero_si512();
    // (compile time: the lerp's base, m0 for a small weight or g, and whether the codes are all
    // normal and the scales under q8_unbiased's bound, the common case, or the block takes q8_decode)
    auto moments = [&](auto normal_codes, auto small_weight) __attribute__((always_inline)) {
      constexpr bool NC = decltype(normal_codes)::value, SMALL = decltype(small_weight)::value;
      const F ms = _mm512_set1_ps(NC ? unbiased_scale<15>(seg.ms[blk]) : seg.ms[blk]);
      const F vs = _mm512_set1_ps(NC ? unbiased_scale<31>(seg.vs[blk]) : seg.vs[blk]);
      chunks(n, [&](int64_t j, const Tail t) __attribute__((always_inline)) {
        // codes widened to 16 bits: m's magnitudes (and signs), v's codes
        const I cm = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(t.all, mc + j)), am16 = _mm512_abs_epi16(cm);
        const I cv = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(t.all, vc + j));
        const F mse = _mm512_mul_ps(NC ? q8_unbiased(am16) : q8_decode<15>(_mm512_and_si512(am16, c32(0xFFFF))), ms);  // (normal: the shift drops the odd half)
        const F mso = _mm512_mul_ps(NC ? q8_unbiased(_mm512_srli_epi32(am16, 16)) : q8_decode<15>(_mm512_srli_epi32(am16, 16)), ms);
        const Pair m0{f(_mm512_ternarylogic_epi32(u(mse), _mm512_slli_epi32(cm, 16), signmask, 0xF8)),  // | sign & signmask
                      f(_mm512_ternarylogic_epi32(u(mso), cm, signmask, 0xF8))};
        const Pair v0{_mm512_mul_ps(NC ? q8_unbiased(cv) : q8_decode<31>(_mm512_and_si512(cv, c32(0xFFFF))), vs),
                      _mm512_mul_ps(NC ? q8_unbiased(_mm512_srli_epi32(cv, 16)) : q8_decode<31>(_mm512_srli_epi32(cv, 16)), vs)};
        Pair g = load_g<G>(a.g, b0 + j, t);
        if constexpr (!PLAIN) {
          for (F* x : {&g.e, &g.o}) {
            *x = _mm512_mul_ps(*x, factor);
            *x = _mm512_max_ps(nclamp, *x);  // g < -clamp ? -clamp : g (NaN stays)
            *x = _mm512_min_ps(clamp, *x);   // g > clamp ? clamp : g
            *x = _mm512_mul_ps(*x, sign);
          }
        }
        auto update = [&](F g, F m0, F v0, M k, float* mp, float* vp) __attribute__((always_inline)) {
          const F m = _mm512_fmadd_ps(lerp_c, _mm512_sub_ps(g, m0), SMALL ? m0 : g);
          const F v = _mm512_add_ps(_mm512_mul_ps(v0, beta2), _mm512_mul_ps(_mm512_mul_ps(c2, g), g));
          _mm512_store_ps(mp, m);
          _mm512_store_ps(vp, v);
          const I am = _mm512_and_si512(u(m), absmask), av = _mm512_and_si512(u(v), absmask);
          mlo = _mm512_mask_min_epu32(mlo, k, mlo, am);
          mhi = _mm512_mask_max_epu32(mhi, k, mhi, am);
          vlo = _mm512_mask_min_epu32(vlo, k, vlo, av);
          vhi = _mm512_mask_max_epu32(vhi, k, vhi, av);
        };
        update(g.e, m0.e, v0.e, t.e, mb + j, vb + j);
        update(g.o, m0.o, v0.o, t.o, mb + j + 16, vb + j + 16);
      });
    };
    using T = std::true_type;
    using N = std::false_type;
    if (codes_normal(mc, vc, n) && unbiases<15>(seg.ms[blk]) && unbiases<31>(seg.vs[blk])) small ? moments(T{}, T{}) : moments(T{}, N{});
    else small ? moments(N{}, T{}) : moments(N{}, N{});
    const float mmax = from_bits(_mm512_reduce_max_epu32(mhi)), vmax = from_bits(_mm512_reduce_max_epu32(vhi));
    const float mmin = from_bits(_mm512_reduce_min_epu32(mlo)), vmin = from_bits(_mm512_reduce_min_epu32(vlo));
    seg.ms[blk] = mmax;
    seg.vs[blk] = vmax;
    const float minv = inverse_scale(mmax), vinv = inverse_scale(vmax);
    const bool normal = values_normal(mmin, minv, vmin, vinv);
    // (compile time, too: whether the square roots are divided by sqrt(bias correction 2), which
    // rounds to 1.0 in FP32 once beta2**step < 2**-24, from step 325 at beta2 0.95 and 16628 at
    // 0.999: from there on the division changes no bit, and leaving it out takes about 6 % off the
    // loop in cache; the portable loop always divides, and the test compares the two)
    auto weights_and_codes = [&](auto normal_values, auto divides) __attribute__((always_inline)) {
      constexpr bool NV = decltype(normal_values)::value, DIV = decltype(divides)::value;
      const F minv_v = _mm512_set1_ps(minv), vinv_v = _mm512_set1_ps(vinv);
      chunks(n, [&](int64_t j, const Tail t) __attribute__((always_inline)) {
        const int64_t i = b0 + j;
        const Pair m{_mm512_load_ps(mb + j), _mm512_load_ps(mb + j + 16)}, v{_mm512_load_ps(vb + j), _mm512_load_ps(vb + j + 16)};
        const Pair w = decode<K>(a, i, t);
        auto step = [&](F w, F m, F v) __attribute__((always_inline)) {
          F d = _mm512_sqrt_ps(v);
          if constexpr (DIV) d = _mm512_div_ps(d, bc2);
          d = _mm512_add_ps(d, eps);
          return _mm512_add_ps(_mm512_mul_ps(w, decay), _mm512_div_ps(_mm512_mul_ps(neg_step, m), d));
        };
        IPair lane{};
        if constexpr (K == STOCHASTIC) {  // formats.h's q8_lane, each lane ^ 0x8000 as encode takes it
          const I words = _mm512_add_epi32(c32(uint32_t(i >> 1) * 0x9E3779B9U), iota_g);  // (i / 32 * 16 + k) * G
          const I hashes = _mm512_xor_si512(hash32(_mm512_xor_si512(seg_key, words)), c32(0x80008000u));
          lane = {_mm512_maskz_permutexvar_epi16(0x55555555u, lane_e, hashes), _mm512_maskz_permutexvar_epi16(0x55555555u, lane_o, hashes)};
        }
        encode<K, W>(a, i, t, {step(w.e, m.e, v.e), step(w.o, m.o, v.o)}, lane);
        auto m_code = [&](F m) __attribute__((always_inline)) {
          // The normal formula on a signed value: the sign bit changes only bit 31 of the sum, so bit
          // 8 + QM of the code, and the stored low byte of the code or its negation is the same. The
          // general one compares magnitudes: it takes |m|.
          const I c = q8_encode<15, NV>(_mm512_mul_ps(NV ? m : f(_mm512_and_si512(u(m), absmask)), minv_v));
          return _mm512_mask_sub_epi32(c, _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_si512(), c);
        };
        store8(mc + j, t, m_code(m.e), m_code(m.o));
        store8(vc + j, t, q8_encode<31, NV>(_mm512_mul_ps(v.e, vinv_v)), q8_encode<31, NV>(_mm512_mul_ps(v.o, vinv_v)));
      });
    };
    if (seg.b != 1.0f) normal ? weights_and_codes(T{}, T{}) : weights_and_codes(N{}, T{});
    else normal ? weights_and_codes(T{}, N{}) : weights_and_codes(N{}, N{});
  }
}

}  // namespace avx512
}  // namespace
