// AdamW with 8-bit moments, written with AVX-512 intrinsics (F, BW and VL): step.cpp's
// adamw_q8_range op for op, bit for bit (tests/test_fused.py compares the two builds), 16 elements
// a step. Why by hand: GCC vectorizes the portable loop at the width of its narrowest type, the
// 8-bit codes, so 64 elements an iteration, whose live values spill out of the 32 registers; here
// every value is one register of 16 floats, a block's tail is a masked load and store, and the
// gradient's unscale/clip is left out where there is none (multiplying by 1 and clamping at
// infinity are exact, so the results are the same).
#pragma once

#include <immintrin.h>

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
inline F bf16(const uint16_t* p, M k) { return f(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16)); }
inline I bf16_rne(F x) {  // as f32_to_bf16, in the low 16 bits of each lane
  const I b = u(x);
  const I r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, c32(0x7FFF)), _mm512_and_si512(_mm512_srli_epi32(b, 16), c32(1))), 16);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, c32(0x7FC0));
}
// Narrowing stores: the low 16 (8) bits of each lane, narrowed in a register and then stored. The
// empty asm keeps the compiler from folding the two into one narrowing store to memory (vpmovdw
// m256, zmm), which Zen 4 runs slower (measured: the 8-bit step 3 % faster this way).
inline void store16(uint16_t* p, M k, I x) {
  __m256i y = _mm512_cvtepi32_epi16(x);
  asm("" : "+x"(y));
  _mm256_mask_storeu_epi16(p, k, y);
}
inline void store8(void* p, M k, I x) {
  __m128i y = _mm512_cvtepi32_epi8(x);
  asm("" : "+x"(y));
  _mm_mask_storeu_epi8(p, k, y);
}
inline I hash32(I x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, c32(0x7FEB352DU));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, c32(0x846CA68BU));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
template <int G> inline F load_g(const void* g, int64_t i, M k) {
  if constexpr (G == F32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(g) + i);
  else if constexpr (G == BF16) return bf16(static_cast<const uint16_t*>(g) + i, k);
  else return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(g) + i));
}
template <int K> inline F decode(const Arrays& a, int64_t i, M k) {
  if constexpr (K == F32_PARAM || K == F32_MASTER) return _mm512_maskz_loadu_ps(k, a.f32 + i);
  else if constexpr (K == REMAINDER)
    return f(_mm512_add_epi32(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, a.w + i)), 16),
                              _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, a.r + i))));
  else if constexpr (K == KAHAN) return _mm512_add_ps(bf16(a.w + i, k), bf16(a.c + i, k));
  else return bf16(a.w + i, k);
}
template <int K, int W> inline void encode(const Arrays& a, int64_t i, M k, F p, I lane) {
  if constexpr (K == F32_PARAM) {
    _mm512_mask_storeu_ps(a.f32 + i, k, p);
  } else if constexpr (K == F32_MASTER) {
    _mm512_mask_storeu_ps(a.f32 + i, k, p);
    if constexpr (W == F16) _mm256_mask_storeu_epi16(a.w + i, k, _mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else store16(a.w + i, k, bf16_rne(p));
  } else if constexpr (K == REMAINDER) {
    const I b = u(p), lo = sext16(b);
    store16(reinterpret_cast<uint16_t*>(a.r) + i, k, lo);
    store16(a.w + i, k, _mm512_srli_epi32(_mm512_sub_epi32(b, lo), 16));
  } else if constexpr (K == KAHAN) {
    const I w = bf16_rne(p);
    store16(a.w + i, k, w);
    store16(a.c + i, k, bf16_rne(_mm512_sub_ps(p, f(_mm512_slli_epi32(w, 16)))));
  } else {  // formats.h's round_stochastic, in 3 operations instead of 7: for bits b and a 16-bit lane,
    // b + sext16(lane) rounded half up to a multiple of 2**16 is b + (lane ^ 0x8000) rounded down,
    // so that with `lane` holding lane ^ 0x8000 (zero-extended) the weight is (b + lane) >> 16
    store16(a.w + i, k, _mm512_srli_epi32(_mm512_add_epi32(u(p), lane), 16));
  }
}
template <int BIAS, bool NORMAL> inline F q8_decode(I c) {
  const F normal = f(_mm512_add_epi32(_mm512_slli_epi32(c, 23 - QM), c32(uint32_t(127 - BIAS) << 23)));
  if constexpr (NORMAL) return normal;
  const F sub = _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_set1_ps(from_bits(uint32_t(127 + 1 - BIAS - QM) << 23)));
  return _mm512_mask_blend_ps(_mm512_cmpge_epi32_mask(c, _mm512_set1_epi32(1 << QM)), sub, normal);
}
template <int BIAS, bool NORMAL> inline I q8_encode(F x) {
  const I b = u(x);
  const I normal = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, c32(((1u << (22 - QM)) - 1) - (uint32_t(127 - BIAS) << 23))),
                                                      _mm512_and_si512(_mm512_srli_epi32(b, 23 - QM), c32(1))), 23 - QM);
  if constexpr (NORMAL) return normal;
  const I sub = _mm512_cvt_roundps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(from_bits(uint32_t(127 + BIAS - 1 + QM) << 23))),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, _mm512_set1_ps(from_bits(uint32_t(127 + 1 - BIAS) << 23)), _CMP_LT_OQ), normal, sub);
}

inline M tail(int64_t left) { return left >= 16 ? M(0xFFFF) : M((1u << left) - 1); }  // the lanes of [j, n)

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
  const I absmask = c32(0x7FFFFFFFu), signmask = c32(0x80000000u);
  int8_t* __restrict__ mq = static_cast<int8_t*>(seg.m);
  uint8_t* __restrict__ vq = static_cast<uint8_t*>(seg.v);
  alignas(64) float mb[QBLOCK], vb[QBLOCK];
  for (int64_t b0 = begin; b0 < end; b0 += QBLOCK) {
    const int64_t n = b0 + QBLOCK < end ? QBLOCK : end - b0, blk = b0 / QBLOCK;
    int8_t* __restrict__ mc = mq + b0;
    uint8_t* __restrict__ vc = vq + b0;
    I mlo = c32(~0u), mhi = _mm512_setzero_si512(), vlo = c32(~0u), vhi = _mm512_setzero_si512();
    // (the lerp's base, m0 for a small weight or g, and whether the codes are all normal: compile time)
    auto moments = [&](auto normal_codes, auto small_weight) __attribute__((always_inline)) {
      constexpr bool NC = decltype(normal_codes)::value, SMALL = decltype(small_weight)::value;
      const F ms = _mm512_set1_ps(seg.ms[blk]), vs = _mm512_set1_ps(seg.vs[blk]);
      for (int64_t j = 0; j < n; j += 16) {
        const M k = tail(n - j);
        const I cm = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, mc + j));
        const F m0 = f(_mm512_or_si512(u(_mm512_mul_ps(q8_decode<15, NC>(_mm512_abs_epi32(cm)), ms)), _mm512_and_si512(cm, signmask)));
        const F v0 = _mm512_mul_ps(q8_decode<31, NC>(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, vc + j))), vs);
        F g = load_g<G>(a.g, b0 + j, k);
        if constexpr (!PLAIN) {
          g = _mm512_mul_ps(g, factor);
          g = _mm512_max_ps(nclamp, g);  // g < -clamp ? -clamp : g (NaN stays)
          g = _mm512_min_ps(clamp, g);   // g > clamp ? clamp : g
          g = _mm512_mul_ps(g, sign);
        }
        const F m = _mm512_fmadd_ps(lerp_c, _mm512_sub_ps(g, m0), SMALL ? m0 : g);
        const F v = _mm512_add_ps(_mm512_mul_ps(v0, beta2), _mm512_mul_ps(_mm512_mul_ps(c2, g), g));
        _mm512_store_ps(mb + j, m);
        _mm512_store_ps(vb + j, v);
        const I am = _mm512_and_si512(u(m), absmask), av = _mm512_and_si512(u(v), absmask);
        mlo = _mm512_mask_min_epu32(mlo, k, mlo, am);
        mhi = _mm512_mask_max_epu32(mhi, k, mhi, am);
        vlo = _mm512_mask_min_epu32(vlo, k, vlo, av);
        vhi = _mm512_mask_max_epu32(vhi, k, vhi, av);
      }
    };
    using T = std::true_type;
    using N = std::false_type;
    if (codes_normal(mc, vc, n)) small ? moments(T{}, T{}) : moments(T{}, N{});
    else small ? moments(N{}, T{}) : moments(N{}, N{});
    const float mmax = from_bits(_mm512_reduce_max_epu32(mhi)), vmax = from_bits(_mm512_reduce_max_epu32(vhi));
    const float mmin = from_bits(_mm512_reduce_min_epu32(mlo)), vmin = from_bits(_mm512_reduce_min_epu32(vlo));
    seg.ms[blk] = mmax;
    seg.vs[blk] = vmax;
    const float minv = inverse_scale(mmax), vinv = inverse_scale(vmax);
    const bool normal = values_normal(mmin, minv, vmin, vinv);
    auto weights_and_codes = [&](auto normal_values) __attribute__((always_inline)) {
      constexpr bool NV = decltype(normal_values)::value;
      const F minv_v = _mm512_set1_ps(minv), vinv_v = _mm512_set1_ps(vinv);
      I hashes = _mm512_setzero_si512(), lane = hashes;  // (blocks start at multiples of 32)
      for (int64_t j = 0; j < n; j += 16) {
        const M k = tail(n - j);
        const int64_t i = b0 + j;
        const F m = _mm512_load_ps(mb + j), v = _mm512_load_ps(vb + j);
        F d = _mm512_sqrt_ps(v);
        d = _mm512_div_ps(d, bc2);
        d = _mm512_add_ps(d, eps);
        const F p = _mm512_add_ps(_mm512_mul_ps(decode<K>(a, i, k), decay), _mm512_div_ps(_mm512_mul_ps(neg_step, m), d));
        if constexpr (K == STOCHASTIC) {  // formats.h's q8_lane (each lane ^ 0x8000, as encode takes it):
          if ((i & 16) == 0) {            // a hash for this vector and the next; (word + iota) * G is word * G + iota * G
            const I words = _mm512_add_epi32(c32(uint32_t((i >> 5) << 4) * 0x9E3779B9U), iota_g);
            hashes = _mm512_xor_si512(hash32(_mm512_xor_si512(seg_key, words)), c32(0x80008000u));
          }
          lane = (i & 16) == 0 ? _mm512_and_si512(hashes, c32(0xFFFFu)) : _mm512_srli_epi32(hashes, 16);
        }
        encode<K, W>(a, i, k, p, lane);
        const I c = q8_encode<15, NV>(_mm512_mul_ps(f(_mm512_and_si512(u(m), absmask)), minv_v));
        const I signed_c = _mm512_mask_sub_epi32(c, _mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_si512(), c);
        store8(mc + j, k, signed_c);
        store8(vc + j, k, q8_encode<31, NV>(_mm512_mul_ps(v, vinv_v)));
      }
    };
    if (normal) weights_and_codes(std::true_type{});
    else weights_and_codes(std::false_type{});
  }
}

}  // namespace avx512
}  // namespace
