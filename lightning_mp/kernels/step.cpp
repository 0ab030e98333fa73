// One fused pass per element for lightning_mp.optim's AdamW and SGD, under every storage kind.
//
// Built at first use by lightning_mp/fused.py with the machine's C++ compiler
// (-O3 -march=native -ffp-contract=off -fopenmp, on torch's thread count): the loops vectorize for
// the CPU at hand, and no multiply-add is fused unless written as std::fma. The arithmetic follows torch's foreach AdamW
// and SGD op for op, in float32, with the fused multiply-adds where ATen's kernels use them
// (lerp, add with alpha), so SGD is bit-exact with torch's; AdamW's sqrt is IEEE's, where torch's
// CPU sqrt (MKL) is 1 ulp off for about 0.7 % of values.
//
// A step reads each element's 16-bit weight and its storage (or an FP32 parameter, or an FP32
// master), its gradient and moments once, and writes them back once: the step moves the bytes it
// must and no more.
//
// formats.h: how an element is stored and read, shared by both loops of the 8-bit AdamW step, the
// portable one here and adamw_q8_avx512.h's, written by hand with AVX-512 and built where the CPU
// has it (-DLMP_PORTABLE builds the portable loop everywhere; the test compares the two).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>  // torch's own libgomp, already loaded: the step runs on torch's intra-op threads
#endif

#include "formats.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(LMP_PORTABLE)
#define LMP_AVX512 1
#include "adamw_q8_avx512.h"
#endif

namespace {

// Software prefetch, one line per stream per tile, a few KB ahead. The hardware prefetchers stop
// at 4 KiB page boundaries, and a step streams up to seven arrays that cross pages at different
// elements (their offsets within a page differ): each crossing then stalls on its own TLB miss and
// memory latency (measured: a bf16-moment step 2x slower than with page-aligned arrays). A
// prefetch walks the page tables early and never faults, past the end of an array included.
constexpr int64_t TILE = 1024;   // elements between prefetches: at most one 4 KiB page of any stream
constexpr int64_t AHEAD = 2048;  // elements ahead: a page or two, far enough to hide a walk
template <int K, int G, int M>
inline void prefetch(const Arrays& a, int64_t i) {
  const int64_t j = i + AHEAD;
  if constexpr (K == F32_PARAM || K == F32_MASTER) __builtin_prefetch(a.f32 + j, 1);
  if constexpr (K != F32_PARAM) __builtin_prefetch(a.w + j, 1);
  if constexpr (K == KAHAN) __builtin_prefetch(a.c + j, 1);
  if constexpr (K == REMAINDER) __builtin_prefetch(a.r + j, 1);
  __builtin_prefetch(static_cast<const char*>(a.g) + j * (G == F32 ? 4 : 2), 0);
  constexpr int mbytes = M == F32 ? 4 : (M == Q8 ? 1 : 2);
  if (a.m) __builtin_prefetch(static_cast<char*>(a.m) + j * mbytes, 1);
  if (a.v) __builtin_prefetch(static_cast<char*>(a.v) + j * mbytes, 1);
}

template <int K, int W, int G, int M>
void adamw_range(const Segment& seg, const Hyper& h, int64_t begin, int64_t end) {
  const Arrays a = arrays<K>(seg);
  const GradPrep prep(h);
  const float c1 = h.c1, beta2 = h.beta2, c2 = h.c2, eps = h.eps, neg_step = seg.a, bc2 = seg.b;
  const float decay = h.has_decay ? h.decay : 1.0f;  // p * 1 is p: no branch in the loop
  const bool small = std::fabs(c1) < 0.5f;
  const float lerp_c = small ? c1 : c1 - 1.0f;
  const uint64_t key = mix(h.seed ^ mix(h.counter));
  const int64_t index = seg.index;
  for (int64_t i = begin; i < end; ++i) {
    const Noise r = noise<K, M>(key, index + i);
    const float g = prep(load<G>(a.g, i));
    float p = decode<K>(a, i) * decay;
    float m = load_moment<M>(a.m, i);
    m = std::fma(lerp_c, g - m, small ? m : g);  // lerp, as ATen's vectorized kernel
    float v = load_moment<M>(a.v, i) * beta2;
    v = v + c2 * g * g;                           // addcmul
    float d = std::sqrt(v);
    d = d / bc2;
    d = d + eps;
    p = p + neg_step * m / d;                     // addcdiv
    store_moment<M>(a.m, i, m, uint16_t(r.b));
    store_moment<M>(a.v, i, v, uint16_t(r.b >> 16));
    encode<K, W>(a, i, p, uint16_t(r.a));
  }
}

// AdamW with 8-bit moments over [begin, end), which start on block boundaries: per block, decode
// the moments, step every element with the FP32 moments (as the foreach path) while taking the
// moments' new smallest and largest magnitudes, then encode them over the largest.
template <int K, int W, int G>
void adamw_q8_range(const Segment& seg, const Hyper& h, int64_t begin, int64_t end) {
  const Arrays a = arrays<K>(seg);
  const GradPrep prep(h);
  const float c1 = h.c1, beta2 = h.beta2, c2 = h.c2, eps = h.eps, neg_step = seg.a, bc2 = seg.b;
  const float decay = h.has_decay ? h.decay : 1.0f;
  const bool small = std::fabs(c1) < 0.5f;
  const float lerp_c = small ? c1 : c1 - 1.0f;
  const uint32_t seg_key = segment_key(mix(h.seed ^ mix(h.counter)), seg.index);
  int8_t* __restrict__ mq = static_cast<int8_t*>(seg.m);
  uint8_t* __restrict__ vq = static_cast<uint8_t*>(seg.v);
  alignas(64) float mb[QBLOCK], vb[QBLOCK];
  for (int64_t b0 = begin; b0 < end; b0 += QBLOCK) {
    const int64_t n = b0 + QBLOCK < end ? QBLOCK : end - b0, blk = b0 / QBLOCK;
    const float ms = seg.ms[blk], vs = seg.vs[blk];
    int8_t* __restrict__ mc = mq + b0;
    uint8_t* __restrict__ vc = vq + b0;
    // Magnitudes as the bit patterns of non-negative floats: integer minima and maxima vectorize,
    // and a NaN, above every number, gives a NaN scale, as torch's amax.
    uint32_t mlo = ~0u, mhi = 0, vlo = ~0u, vhi = 0;
    auto step = [&](auto normal_codes) __attribute__((always_inline)) {  // decode, step as adamw_range, and the extreme magnitudes
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = b0 + j;
        const uint16_t lane = K == STOCHASTIC ? q8_lane(seg_key, i) : 0;
        const int32_t c = mc[j];
        const float m0 = from_bits(to_bits(q8_decode<15, normal_codes>(std::abs(c)) * ms) | (uint32_t(c) & 0x80000000u));  // the code's sign
        const float v0 = q8_decode<31, normal_codes>(int32_t(vc[j])) * vs;
        const float g = prep(load<G>(a.g, i));
        float p = decode<K>(a, i) * decay;
        const float m = std::fma(lerp_c, g - m0, small ? m0 : g);
        const float v = v0 * beta2 + c2 * g * g;
        float d = std::sqrt(v);
        d = d / bc2;
        d = d + eps;
        p = p + neg_step * m / d;
        mb[j] = m;
        vb[j] = v;
        encode<K, W>(a, i, p, lane);
        const uint32_t am = to_bits(m) & 0x7FFFFFFFu, av = to_bits(v) & 0x7FFFFFFFu;
        mlo = am < mlo ? am : mlo;
        mhi = am > mhi ? am : mhi;
        vlo = av < vlo ? av : vlo;
        vhi = av > vhi ? av : vhi;
      }
    };
    if (codes_normal(mc, vc, n)) step(std::true_type{});
    else step(std::false_type{});
    const float mmax = from_bits(mhi), vmax = from_bits(vhi);
    seg.ms[blk] = mmax;
    seg.vs[blk] = vmax;
    const float minv = inverse_scale(mmax), vinv = inverse_scale(vmax);
    auto encode_block = [&](auto normal_values) __attribute__((always_inline)) {
      for (int64_t j = 0; j < n; ++j) {
        const float m = mb[j];
        const int c = q8_encode<15, normal_values>(std::fabs(m) * minv);
        mc[j] = int8_t(m < 0.0f ? -c : c);
        vc[j] = uint8_t(q8_encode<31, normal_values>(vb[j] * vinv));
      }
    };
    if (values_normal(from_bits(mlo), minv, from_bits(vlo), vinv)) encode_block(std::true_type{});
    else encode_block(std::false_type{});
  }
}



template <int K, int W, int G, int M>
void sgd_range(const Segment& seg, const Hyper& h, int64_t begin, int64_t end) {
  const Arrays a = arrays<K>(seg);
  const GradPrep prep(h);
  const bool fresh = seg.b != 0.0f, nesterov = h.nesterov != 0, decays = h.wd != 0.0f;
  const float keep = 1.0f - h.dampening, wd = h.wd, momentum = h.momentum, neg_lr = -h.lr;
  const uint64_t key = mix(h.seed ^ mix(h.counter));
  const int64_t index = seg.index;
  if (!h.has_momentum) {
    for (int64_t i = begin; i < end; ++i) {
      const Noise r = noise<K, M>(key, index + i);
      const float p = decode<K>(a, i);
      float g = prep(load<G>(a.g, i));
      g = decays ? std::fma(wd, p, g) : g;  // add with alpha
      encode<K, W>(a, i, std::fma(neg_lr, g, p), uint16_t(r.a));
    }
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const Noise r = noise<K, M>(key, index + i);
    const float p = decode<K>(a, i);
    float g = prep(load<G>(a.g, i));
    g = decays ? std::fma(wd, p, g) : g;
    const float buf = fresh ? g : std::fma(keep, g, load_moment<M>(a.m, i) * momentum);
    store_moment<M>(a.m, i, buf, uint16_t(r.b));  // the step uses the unrounded buffer, as the eager path
    g = nesterov ? std::fma(momentum, buf, g) : buf;
    encode<K, W>(a, i, std::fma(neg_lr, g, p), uint16_t(r.a));
  }
}

struct Chunk { int64_t seg, begin, end; };

// Runs f over every element of every segment, in chunks of at most 32K elements, on up to
// `threads` threads with about equal numbers of elements; work under 64K elements per thread stays
// on the calling thread. Built with OpenMP, the threads are torch's own (the same libgomp.so.1,
// which the loader shares): a pool of our own would compete for the cores with torch's workers,
// which spin a while after each parallel op (measured: a step right after a torch op 25 % slower).
template <typename F>
void parallel(const Segment* segs, int64_t nseg, int threads, F f) {
  const int64_t chunk = 1 << 15;
  std::vector<Chunk> chunks;
  std::vector<int64_t> before;  // elements in the chunks before each chunk
  int64_t total = 0;
  for (int64_t k = 0; k < nseg; ++k)
    for (int64_t b = 0; b < segs[k].n; b += chunk) {
      const int64_t e = b + chunk < segs[k].n ? b + chunk : segs[k].n;
      chunks.push_back({k, b, e});
      before.push_back(total);
      total += e - b;
    }
  const int64_t most = (total + (1 << 16) - 1) >> 16;
  const int nt = int(threads < most ? threads : (most > 0 ? most : 1));
  auto work = [&](int t) {
    for (size_t c = 0; c < chunks.size(); ++c)
      if (before[c] * nt / total == t) f(segs[chunks[c].seg], chunks[c].begin, chunks[c].end);
  };
  if (nt <= 1) {
    for (const Chunk& c : chunks) f(segs[c.seg], c.begin, c.end);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  work(omp_get_thread_num());
#else
  std::vector<std::thread> pool;
  for (int t = 1; t < nt; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
#endif
}

// f over [b, e) in tiles of TILE elements, each after the prefetch of its streams AHEAD elements on.
template <int K, int G, int M, typename F>
auto tiled(F f) {
  return [f](const Segment& s, int64_t b, int64_t e) {
    const Arrays a = arrays<K>(s);
    for (int64_t t = b; t < e; t += TILE) {
      prefetch<K, G, M>(a, t);
      f(s, t, t + TILE < e ? t + TILE : e);
    }
  };
}

template <int K, int W, int G, int M>
void adamw(const Segment* segs, int64_t nseg, const Hyper* h) {
  if constexpr (M == Q8) {  // (chunks and tiles are multiples of QBLOCK: each starts a block)
#ifdef LMP_AVX512
    if (!h->has_factor && !h->has_clamp && !h->maximize)  // no unscale, clip or negation to apply
      parallel(segs, nseg, h->threads, tiled<K, G, M>([&](const Segment& s, int64_t b, int64_t e) { avx512::adamw_q8_range<K, W, G, true>(s, *h, b, e); }));
    else
      parallel(segs, nseg, h->threads, tiled<K, G, M>([&](const Segment& s, int64_t b, int64_t e) { avx512::adamw_q8_range<K, W, G, false>(s, *h, b, e); }));
#else
    parallel(segs, nseg, h->threads, tiled<K, G, M>([&](const Segment& s, int64_t b, int64_t e) { adamw_q8_range<K, W, G>(s, *h, b, e); }));
#endif
  } else {
    parallel(segs, nseg, h->threads, tiled<K, G, M>([&](const Segment& s, int64_t b, int64_t e) { adamw_range<K, W, G, M>(s, *h, b, e); }));
  }
}

template <int K, int W, int G, int M>
void sgd(const Segment* segs, int64_t nseg, const Hyper* h) {
  if constexpr (M == Q8) return;  // (SGD refuses 8-bit momentum in Python)
  else parallel(segs, nseg, h->threads, tiled<K, G, M>([&](const Segment& s, int64_t b, int64_t e) { sgd_range<K, W, G, M>(s, *h, b, e); }));
}

using Fn = void (*)(const Segment*, int64_t, const Hyper*);

// The instantiations: storage kind x weight dtype x gradient dtype x moment dtype.
template <int K, int W, int G, int M> struct AdamWFn { static void run(const Segment* s, int64_t n, const Hyper* h) { adamw<K, W, G, M>(s, n, h); } };
template <int K, int W, int G, int M> struct SGDFn { static void run(const Segment* s, int64_t n, const Hyper* h) { sgd<K, W, G, M>(s, n, h); } };

template <template <int, int, int, int> class T, int K, int W, int G>
Fn pick_m(int m) {
  return m == F32 ? &T<K, W, G, F32>::run : (m == BF16 ? &T<K, W, G, BF16>::run : &T<K, W, G, Q8>::run);
}

template <template <int, int, int, int> class T, int K, int W>
Fn pick_gm(int g, int m) {
  if (g == F32) return pick_m<T, K, W, F32>(m);
  if (g == BF16) return pick_m<T, K, W, BF16>(m);
  return pick_m<T, K, W, F16>(m);
}

template <template <int, int, int, int> class T>
Fn pick(int k, int w, int g, int m) {
  switch (k) {
    case F32_PARAM: return pick_gm<T, F32_PARAM, F32>(g, m);
    case F32_MASTER: return w == F16 ? pick_gm<T, F32_MASTER, F16>(g, m) : pick_gm<T, F32_MASTER, BF16>(g, m);
    case REMAINDER: return pick_gm<T, REMAINDER, BF16>(g, m);
    case KAHAN: return pick_gm<T, KAHAN, BF16>(g, m);
    default: return pick_gm<T, STOCHASTIC, BF16>(g, m);
  }
}

}  // namespace

extern "C" {

int lmp_abi_version() { return 2; }
#ifdef LMP_AVX512
int lmp_avx512() { return 1; }  // whether the 8-bit AdamW step is the AVX-512 loop
#else
int lmp_avx512() { return 0; }
#endif
int64_t lmp_segment_size() { return int64_t(sizeof(Segment)); }
int64_t lmp_hyper_size() { return int64_t(sizeof(Hyper)); }

void lmp_adamw(int kind, int wdtype, int gdtype, int mdtype, const Segment* segs, int64_t nseg, const Hyper* h) {
  pick<AdamWFn>(kind, wdtype, gdtype, mdtype)(segs, nseg, h);
}

void lmp_sgd(int kind, int wdtype, int gdtype, int mdtype, const Segment* segs, int64_t nseg, const Hyper* h) {
  pick<SGDFn>(kind, wdtype, gdtype, mdtype)(segs, nseg, h);
}

// FP32 gradients for a torch optimizer's step on FP32 masters, in one pass over every tensor:
// upcast each 16-bit gradient (g) into its FP32 copy (s), check it for inf/NaN (before unscaling,
// as torch's GradScaler) and multiply by inv_scale. Returns whether any element was inf/NaN.
int lmp_upcast_check(int gdtype, const Segment* segs, int64_t nseg, float inv_scale, int threads) {
  int found = 0;
  parallel(segs, nseg, threads, [&](const Segment& s, int64_t b, int64_t e) {
    float* __restrict__ out = static_cast<float*>(s.s);
    int bad = 0;
    if (gdtype == BF16)
      for (int64_t i = b; i < e; ++i) { const float x = load<BF16>(s.g, i); bad |= !std::isfinite(x); out[i] = x * inv_scale; }
    else
      for (int64_t i = b; i < e; ++i) { const float x = load<F16>(s.g, i); bad |= !std::isfinite(x); out[i] = x * inv_scale; }
    if (bad) __atomic_store_n(&found, 1, __ATOMIC_RELAXED);
  });
  return found;
}

// Whether any gradient (g) holds inf/NaN: one read-only pass (the step needs the answer before it writes).
int lmp_check(int gdtype, const Segment* segs, int64_t nseg, int threads) {
  int found = 0;
  parallel(segs, nseg, threads, [&](const Segment& s, int64_t b, int64_t e) {
    int bad = 0;
    if (gdtype == F32) for (int64_t i = b; i < e; ++i) bad |= !std::isfinite(load<F32>(s.g, i));
    else if (gdtype == BF16) for (int64_t i = b; i < e; ++i) bad |= !std::isfinite(load<BF16>(s.g, i));
    else for (int64_t i = b; i < e; ++i) bad |= !std::isfinite(load<F16>(s.g, i));
    if (bad) __atomic_store_n(&found, 1, __ATOMIC_RELAXED);
  });
  return found;
}

// The 16-bit weights (w) from their FP32 masters (s), rounded to nearest even, as a copy_.
void lmp_round(int wdtype, const Segment* segs, int64_t nseg, int threads) {
  parallel(segs, nseg, threads, [&](const Segment& s, int64_t b, int64_t e) {
    const float* __restrict__ x = static_cast<const float*>(s.s);
    uint16_t* __restrict__ w = static_cast<uint16_t*>(s.w);
    if (wdtype == BF16) for (int64_t i = b; i < e; ++i) w[i] = f32_to_bf16(x[i]);
    else for (int64_t i = b; i < e; ++i) w[i] = f32_to_f16(x[i]);
  });
}

// Adds 1 to each of n FP32 step counters (0-dim tensors) and writes their new values to out: the
// optimizer's counts in one call, where torch's foreach add costs a dispatch per counter.
void lmp_count(float* const* counters, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = *counters[i] = *counters[i] + 1.0f;
}

// Multiplies a[0:n] by s in place, on `threads` threads: the machine's streaming rate for an
// in-place update (benchmarks/optimizer_step.py's bandwidth floor).
void lmp_scale(float* a, int64_t n, float s, int threads) {
  Segment seg{a, nullptr, nullptr, nullptr, nullptr, n, 0, 0.0f, 0.0f, nullptr, nullptr};
  parallel(&seg, 1, threads, [&](const Segment& g, int64_t b, int64_t e) {
    float* __restrict__ x = static_cast<float*>(g.w);
    for (int64_t i = b; i < e; ++i) x[i] = x[i] * s;
  });
}

}  // extern "C"
