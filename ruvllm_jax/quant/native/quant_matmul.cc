// y[n, rows] = x[n, cols] @ dequant(w[rows, row_bytes]).T for GGML block formats, as an XLA FFI
// custom call on CPU (target built and registered by ruvllm_jax/quant/native.py).
//
// The method is ggml-cpu's: each x row is quantized once per call to int8 blocks (Q8_0-style 32-blocks
// with a float scale for Q8_0, Q4_1, Q5_0, plus their sums for the last two; Q8_K-style 256-blocks
// with 16-sums for Q4_K, Q6_K), then each weight block is dotted in integers and scaled once per
// block. Only the activation rounding differs from an f32 dot with the dequantized weights: with
// d_b = max|x_b| / 127 the scale of activation block b (32 or 256 values),
// |y - y_ref| <= sum_b d_b / 2 * sum_{i in b} |w_i|, plus f32 accumulation rounding.
//
// Paths: AVX2+FMA+F16C (maddubs / madd; the sign trick for signed Q8_0 weights; Q4_1, Q5_0 and Q6_K
// weights taken unsigned, their offsets folded out with the activation sums) when the compiler
// targets them, with VNNI's fused integer dots where the CPU has them (same bits), else portable
// scalar code (forced with -DRUVLLM_QMM_SCALAR, which the tests build too). Both quantize
// activations bit-identically; only float summation order differs. All vectors are 256 bits: an
// AVX-512 machine runs the AVX2 (+ VNNI) path.
//
// Threads: weight rows are claimed in guided chunks (a share of what is left) from an atomic counter
// by the calling thread and by helpers scheduled on XLA's intra-op pool (pool size - 1 of them). The
// caller never waits for a helper that has not started: it waits only until every claimed row is
// done, and a helper that starts late finds none left and touches nothing but the shared counters
// it co-owns.
//
// Determinism: an output row's bits depend only on its x row and w, never on n, the other rows or
// the thread split (each row is one thread's, summed in one fixed order).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(RUVLLM_QMM_SCALAR)
#define QMM_AVX2 1
#include <immintrin.h>
#else
#define QMM_AVX2 0
#endif

// VNNI (AVX-VNNI, or AVX512-VNNI with VL, both at 256 bits) fuses the integer steps of the AVX2 path:
// vpdpbusd = maddubs + madd by ones + add, vpdpwssd = madd + add. The AVX2 path's int16 pair sums
// never saturate (see each kernel), so both give the same int32 sums and the same output bits.
// -DRUVLLM_QMM_NO_VNNI keeps the plain AVX2 path, for comparisons and the tests.
#if QMM_AVX2 && !defined(RUVLLM_QMM_NO_VNNI) && (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
#define QMM_VNNI 1
#else
#define QMM_VNNI 0
#endif

#if defined(__F16C__) && !defined(RUVLLM_QMM_SCALAR)
#define QMM_F16C 1
#include <immintrin.h>
#else
#define QMM_F16C 0
#endif

namespace ffi = xla::ffi;

namespace {

enum : int32_t { kQ4_1 = 3, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

// Weights stream from memory once per call: prefetching this far ahead (bytes) of the block being
// read keeps more lines in flight than the out-of-order window and the hardware prefetcher do
// (+25-35% on the vocabulary projection, 1 and 2 threads, Zen 3; 512 bytes gained half of that).
// -DRUVLLM_QMM_PREFETCH=0 turns it off, for comparisons.
#ifndef RUVLLM_QMM_PREFETCH
#define RUVLLM_QMM_PREFETCH 3072
#endif
constexpr int kPrefetch = RUVLLM_QMM_PREFETCH;

inline void prefetch(const uint8_t* p) {
#if defined(__GNUC__)
  if (kPrefetch > 0) __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

inline float fp16_to_fp32(uint16_t h) {
#if QMM_F16C
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in f32
    float f = float(mant) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
#endif
}

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}

// ---------------------------------------------------------------------------------------------
// Quantized activations: row r of n, SoA.
struct XQ {
  const int8_t* qs;      // [n][cols]
  const float* d;        // [n][nbx]: scale per activation block
  const float* ds;       // [n][nbx][2]: (d, d * sum(q)) per block, side by side (Q4_1, Q5_0)
  const int16_t* bsums;  // [n][nbx * 16]: sums of q per 16 (K formats only)
  int64_t cols;
  int64_t nbx;
};

// Quantize bs (multiple of 32) floats with one scale d = max|x| / 127. A NaN or infinite input makes
// the scale NaN, so every output it reaches is NaN, as in an f32 product.
inline float quantize_block(const float* x, int bs, int8_t* q) {
#if QMM_AVX2
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  for (int i = 0; i < bs; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const bool bad_in = _mm256_movemask_ps(bad) != 0 || !(amax <= FLT_MAX);
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m256 mul = _mm256_set1_ps(id);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int i = 0; i < bs; i += 32) {
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), mul),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), mul),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), mul),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), mul),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // packs work per 128-bit lane; the permute restores element order
    i0 = _mm256_packs_epi32(i0, i1);
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_packs_epi16(i0, i2);
    i0 = _mm256_permutevar8x32_epi32(i0, perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), i0);
  }
#else
  float amax = 0.0f;
  bool bad_in = false;
  for (int i = 0; i < bs; ++i) {
    const float a = std::fabs(x[i]);
    bad_in |= !(a <= FLT_MAX);
    amax = a > amax ? a : amax;
  }
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int i = 0; i < bs; ++i) {
    const float v = x[i] * id;
    q[i] = bad_in ? 0 : int8_t(std::nearbyint(v));
  }
#endif
  return bad_in ? NAN : amax / 127.0f;
}

// Quantize rows [0, n) of x for one weight format into the scratch vectors.
struct XScratch {
  std::vector<int8_t> qs;
  std::vector<float> d, s;
  std::vector<int16_t> bsums;
};

XQ quantize_x(const float* x, int64_t n, int64_t cols, int32_t type, XScratch& sc) {
  const int bs = (type == kQ4_K || type == kQ6_K) ? 256 : 32;
  const int64_t nbx = cols / bs;
  sc.qs.resize(size_t(n * cols));
  sc.d.resize(size_t(n * nbx));
  const bool want_s = type == kQ4_1 || type == kQ5_0;
  const bool want_bsums = bs == 256;
  if (want_s) sc.s.resize(size_t(2 * n * nbx));
  if (want_bsums) sc.bsums.resize(size_t(n * nbx * 16));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t b = 0; b < nbx; ++b) {
      const int64_t off = r * cols + b * bs;
      int8_t* q = sc.qs.data() + off;
      const float d = quantize_block(x + off, bs, q);
      sc.d[size_t(r * nbx + b)] = d;
      if (want_s) {
        int sum = 0;
        for (int i = 0; i < bs; ++i) sum += q[i];
        sc.s[size_t(2 * (r * nbx + b))] = d;
        sc.s[size_t(2 * (r * nbx + b) + 1)] = d * float(sum);
      }
      if (want_bsums) {
        int16_t* bsum = sc.bsums.data() + (r * nbx + b) * 16;
        for (int g = 0; g < 16; ++g) {
          int sum = 0;
          for (int i = 0; i < 16; ++i) sum += q[g * 16 + i];
          bsum[g] = int16_t(sum);
        }
      }
    }
  }
  return XQ{sc.qs.data(), sc.d.data(), want_s ? sc.s.data() : nullptr, want_bsums ? sc.bsums.data() : nullptr,
            cols, nbx};
}

#if QMM_AVX2
inline float hsum8(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
inline float hsum4(__m128 r) {
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
inline __m256i loadu256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i loadu128(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// acc + (unsigned u times signed s, summed in fours), for u * s pair sums that fit int16.
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if QMM_VNNI && defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif QMM_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
// acc + (int16 a times int16 b, summed in pairs).
inline __m256i dpwssd(__m256i acc, __m256i a, __m256i b) {
#if QMM_VNNI && defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#elif QMM_VNNI
  return _mm256_dpwssd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
// Signed w (as |w| and w) times signed y, summed in fours: maddubs takes unsigned x signed, so the
// sign of w moves onto y. |w| <= 128 and |y| <= 127 keep the int16 pair sums from saturating.
inline __m256i dot_i8_signed(__m256i aw, __m256i w, __m256i y) {
  return dpbusd(_mm256_setzero_si256(), aw, _mm256_sign_epi8(y, w));
}
// Unsigned w (0..63) times signed y, summed in fours.
inline __m256i dot_u8(__m256i w, __m256i y) { return dpbusd(_mm256_setzero_si256(), w, y); }
// 16 packed bytes -> 32 nibbles as bytes: low nibbles (weights 0..15), then high (16..31).
inline __m256i nibbles32(const uint8_t* p) {
  const __m128i t = loadu128(p);
  const __m256i b = _mm256_insertf128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
  return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}
// 32 bits -> 32 bytes, 0xFF where the bit is set.
inline __m256i bits32(const uint8_t* p) {
  uint32_t x32;
  std::memcpy(&x32, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32(int(x32)), shuf);
  b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}
#endif

// ---------------------------------------------------------------------------------------------
// Row kernels: out[k] = dot(weight row w, x row r0 + k) for k < NR. nb = weight blocks per row.

// Q8_0: 34 bytes: f16 d, int8 q[32].
template <int NR>
void dot_q8_0(const uint8_t* w, int64_t nb, const XQ& x, int64_t r0, float* out) {
  const int8_t* xq[NR];
  const float* xd[NR];
  for (int r = 0; r < NR; ++r) {
    xq[r] = x.qs + (r0 + r) * x.cols;
    xd[r] = x.d + (r0 + r) * x.nbx;
  }
#if QMM_AVX2
  // even and odd blocks go to two accumulator sets, so one row's FMAs are not one dependent chain;
  // the same for every NR, so a row's result never depends on the rows dotted beside it
  __m256 acc[2][NR];
  for (int r = 0; r < NR; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* ac) {
    const uint8_t* blk = w + b * 34;
    const float dw = load_f16(blk);
    const __m256i q = loadu256(blk + 2);
    const __m256i aq = _mm256_sign_epi8(q, q);
    for (int r = 0; r < NR; ++r) {
      const __m256 p = _mm256_cvtepi32_ps(dot_i8_signed(aq, q, loadu256(xq[r] + b * 32)));
      ac[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[r][b]), p, ac[r]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    prefetch(w + b * 34 + kPrefetch);
    block(b, acc[0]);
    block(b + 1, acc[1]);
  }
  if (b < nb) block(b, acc[0]);
  for (int r = 0; r < NR; ++r) acc[0][r] = _mm256_add_ps(acc[0][r], acc[1][r]);
  for (int r = 0; r < NR; ++r) out[r] = hsum8(acc[0][r]);
#else
  float acc[NR] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 34;
    const float dw = load_f16(blk);
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int r = 0; r < NR; ++r) {
      const int8_t* y = xq[r] + b * 32;
      int32_t s = 0;
      for (int i = 0; i < 32; ++i) s += int32_t(q[i]) * y[i];
      acc[r] += dw * xd[r][b] * float(s);
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = acc[r];
#endif
}

// Q4_1: 20 bytes: f16 d, f16 m, u8 qs[16]; w = d * nibble + m, so
// dot = d * dy * sum(nibble * qy) + m * (dy * sum(qy)).
template <int NR>
void dot_q4_1(const uint8_t* w, int64_t nb, const XQ& x, int64_t r0, float* out) {
  const int8_t* xq[NR];
  const float* xds[NR];
  for (int r = 0; r < NR; ++r) {
    xq[r] = x.qs + (r0 + r) * x.cols;
    xds[r] = x.ds + 2 * (r0 + r) * x.nbx;
  }
#if QMM_AVX2
  __m256 acc[NR];
  __m128 accm[NR];  // lane 1 sums m * dy * sum(qy); lane 0 is unused
  for (int r = 0; r < NR; ++r) {
    acc[r] = _mm256_setzero_ps();
    accm[r] = _mm_setzero_ps();
  }
  __m256 acc1[NR];  // odd blocks: two FMA chains, as in dot_q8_0
  for (int r = 0; r < NR; ++r) acc1[r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* ac) {
    const uint8_t* blk = w + b * 20;
    uint32_t dm32;
    std::memcpy(&dm32, blk, 4);
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(int(dm32)));  // (d, m) in one conversion
    const __m256i q = nibbles32(blk + 4);
    for (int r = 0; r < NR; ++r) {
      const __m128 sc = _mm_mul_ps(dm, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xds[r] + 2 * b))));
      const __m256 p = _mm256_cvtepi32_ps(dot_u8(q, loadu256(xq[r] + b * 32)));
      ac[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sc), p, ac[r]);
      accm[r] = _mm_add_ps(accm[r], sc);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    prefetch(w + b * 20 + kPrefetch);
    block(b, acc);
    block(b + 1, acc1);
  }
  if (b < nb) block(b, acc);
  for (int r = 0; r < NR; ++r)
    out[r] = hsum8(_mm256_add_ps(acc[r], acc1[r])) + _mm_cvtss_f32(_mm_movehdup_ps(accm[r]));
#else
  float acc[NR] = {}, accm[NR] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 20;
    const float dw = load_f16(blk), mw = load_f16(blk + 2);
    const uint8_t* qs = blk + 4;
    for (int r = 0; r < NR; ++r) {
      const int8_t* y = xq[r] + b * 32;
      int32_t s = 0;
      for (int i = 0; i < 16; ++i) s += int32_t(qs[i] & 0x0F) * y[i] + int32_t(qs[i] >> 4) * y[i + 16];
      acc[r] += dw * xds[r][2 * b] * float(s);
      accm[r] += mw * xds[r][2 * b + 1];
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = acc[r] + accm[r];
#endif
}

// Q5_0: 22 bytes: f16 d, u8 qh[4], u8 qs[16]; w = d * (q5 - 16) with q5 = nibble | bit << 4, so
// dot = d * dy * sum(q5 * qy) - 16 * d * (dy * sum(qy)): q5 is unsigned, maddubs takes it directly.
template <int NR>
void dot_q5_0(const uint8_t* w, int64_t nb, const XQ& x, int64_t r0, float* out) {
  const int8_t* xq[NR];
  const float* xds[NR];
  for (int r = 0; r < NR; ++r) {
    xq[r] = x.qs + (r0 + r) * x.cols;
    xds[r] = x.ds + 2 * (r0 + r) * x.nbx;
  }
#if QMM_AVX2
  __m256 acc[NR], acc1[NR];  // even and odd blocks: two FMA chains, as in dot_q8_0
  __m128 accm[NR];           // lane 1 sums d * dy * sum(qy); lane 0 is unused
  for (int r = 0; r < NR; ++r) {
    acc[r] = acc1[r] = _mm256_setzero_ps();
    accm[r] = _mm_setzero_ps();
  }
  auto block = [&](int64_t b, __m256* ac) {
    const uint8_t* blk = w + b * 22;
    const __m128 dw = _mm_set1_ps(load_f16(blk));
    const __m256i q = _mm256_or_si256(nibbles32(blk + 6), _mm256_and_si256(bits32(blk + 2), _mm256_set1_epi8(0x10)));
    for (int r = 0; r < NR; ++r) {
      const __m128 sc = _mm_mul_ps(dw, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xds[r] + 2 * b))));
      const __m256 p = _mm256_cvtepi32_ps(dot_u8(q, loadu256(xq[r] + b * 32)));
      ac[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sc), p, ac[r]);
      accm[r] = _mm_add_ps(accm[r], sc);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    prefetch(w + b * 22 + kPrefetch);
    block(b, acc);
    block(b + 1, acc1);
  }
  if (b < nb) block(b, acc);
  for (int r = 0; r < NR; ++r)
    out[r] = hsum8(_mm256_add_ps(acc[r], acc1[r])) - 16.0f * _mm_cvtss_f32(_mm_movehdup_ps(accm[r]));
#else
  float acc[NR] = {}, accm[NR] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 22;
    const float dw = load_f16(blk);
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    const uint8_t* qs = blk + 6;
    uint8_t q[32];
    for (int i = 0; i < 16; ++i) {
      q[i] = uint8_t((qs[i] & 0x0F) | (((qh >> i) & 1) << 4));
      q[i + 16] = uint8_t((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
    }
    for (int r = 0; r < NR; ++r) {
      const int8_t* y = xq[r] + b * 32;
      int32_t s = 0;
      for (int i = 0; i < 32; ++i) s += int32_t(q[i]) * y[i];
      acc[r] += dw * xds[r][2 * b] * float(s);
      accm[r] += dw * xds[r][2 * b + 1];
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = acc[r] - 16.0f * accm[r];
#endif
}

// Q4_K scales: 12 bytes -> 8 6-bit scales (bytes 0..7) and 8 6-bit mins (bytes 8..15), as ggml.
inline void unpack_q4_k_scales(const uint8_t* scales, uint32_t utmp[4]) {
  constexpr uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
  std::memcpy(utmp, scales, 12);
  utmp[3] = ((utmp[2] >> 4) & kmask2) | (((utmp[1] >> 6) & kmask3) << 4);
  const uint32_t uaux = utmp[1] & kmask1;
  utmp[1] = (utmp[2] & kmask2) | (((utmp[0] >> 6) & kmask3) << 4);
  utmp[2] = uaux;
  utmp[0] &= kmask1;
}

#if QMM_AVX2
// Byte-shuffle masks that broadcast int16 lane i of a 128-bit lane to all 16 of its int16 lanes.
struct ShufK4 {
  alignas(32) uint8_t b[8][32];
};
constexpr ShufK4 make_shuf_k4() {
  ShufK4 t{};
  for (int i = 0; i < 8; ++i)
    for (int k = 0; k < 32; ++k) t.b[i][k] = uint8_t(2 * i + (k & 1));
  return t;
}
constexpr ShufK4 kShufK4 = make_shuf_k4();
#endif

// Q4_K: 144 bytes: f16 d, f16 dmin, u8 scales[12], u8 qs[128]; sub-block j of 32:
// w = d * sc_j * nibble - dmin * m_j. The min term needs only the activation 16-sums.
template <int NR>
void dot_q4_k(const uint8_t* w, int64_t nb, const XQ& x, int64_t r0, float* out) {
  const int8_t* xq[NR];
  const float* xd[NR];
  const int16_t* xb[NR];
  for (int r = 0; r < NR; ++r) {
    xq[r] = x.qs + (r0 + r) * x.cols;
    xd[r] = x.d + (r0 + r) * x.nbx;
    xb[r] = x.bsums + (r0 + r) * x.nbx * 16;
  }
#if QMM_AVX2
  __m256 acc[NR];
  __m128 accm[NR];
  for (int r = 0; r < NR; ++r) {
    acc[r] = _mm256_setzero_ps();
    accm[r] = _mm_setzero_ps();
  }
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 144;
    for (int k = 0; k < 144; k += 64) prefetch(blk + kPrefetch + k);
    const float d = load_f16(blk), dmin = load_f16(blk + 2);
    uint32_t utmp[4];
    unpack_q4_k_scales(blk + 4, utmp);
    const __m128i mins16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, int(utmp[3]), int(utmp[2])));
    const __m256i sc16 =
        _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, int(utmp[1]), int(utmp[0]))));
    const uint8_t* qs = blk + 16;
    __m256i sumi[NR];
    for (int r = 0; r < NR; ++r) {
      sumi[r] = _mm256_setzero_si256();
      const __m256i bs = loadu256(xb[r] + b * 16);
      const __m128i bs32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
      const __m128i prod = _mm_madd_epi16(mins16, bs32);
      accm[r] = _mm_fmadd_ps(_mm_set1_ps(dmin * xd[r][b]), _mm_cvtepi32_ps(prod), accm[r]);
    }
    for (int j = 0; j < 4; ++j) {
      const __m256i bits = loadu256(qs + 32 * j);
      const __m256i lo = _mm256_and_si256(bits, m4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
      // broadcast the sub-block scales by byte shuffles (cheaper than GPR broadcasts)
      const __m256i sl = _mm256_shuffle_epi8(sc16, loadu256(kShufK4.b[2 * j]));
      const __m256i sh = _mm256_shuffle_epi8(sc16, loadu256(kShufK4.b[2 * j + 1]));
      for (int r = 0; r < NR; ++r) {
        const int8_t* y = xq[r] + b * 256 + 64 * j;
        // nibble * y pair sums are at most 2 * 15 * 127: no saturation
        sumi[r] = dpwssd(sumi[r], sl, _mm256_maddubs_epi16(lo, loadu256(y)));
        sumi[r] = dpwssd(sumi[r], sh, _mm256_maddubs_epi16(hi, loadu256(y + 32)));
      }
    }
    for (int r = 0; r < NR; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[r][b]), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
  }
  for (int r = 0; r < NR; ++r) out[r] = hsum8(acc[r]) - hsum4(accm[r]);
#else
  float acc[NR] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 144;
    const float d = load_f16(blk), dmin = load_f16(blk + 2);
    uint32_t utmp[4];
    unpack_q4_k_scales(blk + 4, utmp);
    const uint8_t* sc = reinterpret_cast<const uint8_t*>(utmp);
    const uint8_t* mn = sc + 8;
    const uint8_t* qs = blk + 16;
    for (int r = 0; r < NR; ++r) {
      const int8_t* y = xq[r] + b * 256;
      const int16_t* bs = xb[r] + b * 16;
      int32_t sumi = 0, summ = 0;
      for (int j = 0; j < 4; ++j) {
        int32_t sl = 0, sh = 0;
        for (int i = 0; i < 32; ++i) {
          sl += int32_t(qs[32 * j + i] & 0x0F) * y[64 * j + i];
          sh += int32_t(qs[32 * j + i] >> 4) * y[64 * j + 32 + i];
        }
        sumi += sl * sc[2 * j] + sh * sc[2 * j + 1];
      }
      for (int j = 0; j < 8; ++j) summ += int32_t(mn[j]) * (bs[2 * j] + bs[2 * j + 1]);
      acc[r] += d * xd[r][b] * float(sumi) - dmin * xd[r][b] * float(summ);
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = acc[r];
#endif
}

// Q6_K: 210 bytes: u8 ql[128], u8 qh[64], int8 scales[16], f16 d; w = d * sc_g * (q6 - 32). The
// -32 offset is folded out with the activation 16-sums: sum sc_g * (sum q6 * y - 32 * bsum_g).
template <int NR>
void dot_q6_k(const uint8_t* w, int64_t nb, const XQ& x, int64_t r0, float* out) {
  const int8_t* xq[NR];
  const float* xd[NR];
  const int16_t* xb[NR];
  for (int r = 0; r < NR; ++r) {
    xq[r] = x.qs + (r0 + r) * x.cols;
    xd[r] = x.d + (r0 + r) * x.nbx;
    xb[r] = x.bsums + (r0 + r) * x.nbx * 16;
  }
#if QMM_AVX2
  __m256 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 210;
    for (int k = 0; k < 210; k += 64) prefetch(blk + kPrefetch + k);
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const float d = load_f16(blk + 208);
    const __m128i sc8 = loadu128(blk + 192);
    __m256i sumi[NR];
    {
      const __m256i sc16 = _mm256_cvtepi8_epi16(loadu128(blk + 192));
      for (int r = 0; r < NR; ++r)
        sumi[r] = _mm256_sub_epi32(_mm256_setzero_si256(),
                                   _mm256_slli_epi32(_mm256_madd_epi16(sc16, loadu256(xb[r] + b * 16)), 5));
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i l1 = loadu256(ql + 64 * h), l2 = loadu256(ql + 64 * h + 32);
      const __m256i hb = loadu256(qh + 32 * h);
      __m256i q[4];
      q[0] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));
      q[1] = _mm256_or_si256(_mm256_and_si256(l2, m4),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), m4),
                             _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4));
      for (int k = 0; k < 4; ++k) {
        // 32 weights span 16-groups g and g + 1: 8 int16 lanes of each scale
        const int g = 8 * h + 2 * k;
        const __m256i s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(
            sc8, _mm_set_epi64x(0x0101010101010101ll * (g + 1), 0x0101010101010101ll * g)));
        for (int r = 0; r < NR; ++r) {
          // q6 * y pair sums are at most 2 * 63 * 127: no saturation
          const __m256i p = _mm256_maddubs_epi16(q[k], loadu256(xq[r] + b * 256 + 128 * h + 32 * k));
          sumi[r] = dpwssd(sumi[r], s, p);
        }
      }
    }
    for (int r = 0; r < NR; ++r)
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[r][b]), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
  }
  for (int r = 0; r < NR; ++r) out[r] = hsum8(acc[r]);
#else
  (void)xb;  // the scalar path subtracts the 32 offset directly
  float acc[NR] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 210;
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = load_f16(blk + 208);
    int8_t q[256];
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t a = ql[64 * h + l], c = ql[64 * h + 32 + l], e = qh[32 * h + l];
        q[128 * h + l] = int8_t(((a & 0x0F) | ((e & 3) << 4)) - 32);
        q[128 * h + 32 + l] = int8_t(((c & 0x0F) | (((e >> 2) & 3) << 4)) - 32);
        q[128 * h + 64 + l] = int8_t(((a >> 4) | (((e >> 4) & 3) << 4)) - 32);
        q[128 * h + 96 + l] = int8_t(((c >> 4) | (((e >> 6) & 3) << 4)) - 32);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const int8_t* y = xq[r] + b * 256;
      int32_t sumi = 0;
      for (int g = 0; g < 16; ++g) {
        int32_t s = 0;
        for (int i = 0; i < 16; ++i) s += int32_t(q[16 * g + i]) * y[16 * g + i];
        sumi += s * sc[g];
      }
      acc[r] += d * xd[r][b] * float(sumi);
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = acc[r];
#endif
}

// ---------------------------------------------------------------------------------------------
struct Job {
  const uint8_t* w;
  int64_t row_bytes, rows, nb, n;
  XQ x;
  float* y;  // [n][rows]
};

using RowsFn = void (*)(const Job&, int64_t, int64_t);

// MAXR: the most x rows per pass, as many as keep the accumulators in registers (a power of two).
// The scalar path takes one row a pass: it is the fallback, and compiles faster so.
#if QMM_AVX2
#define QMM_ROWS(MAXR) MAXR
#else
#define QMM_ROWS(MAXR) 1
#endif
#define QMM_KERNEL(NAME, FN, MAXR)                                                       \
  template <int NR>                                                                      \
  struct NAME {                                                                          \
    static constexpr int kMaxRows = QMM_ROWS(MAXR);                                      \
    static void dot(const uint8_t* w, int64_t nb, const XQ& x, int64_t r0, float* out) { \
      FN<NR>(w, nb, x, r0, out);                                                         \
    }                                                                                    \
  };
QMM_KERNEL(KQ8_0, dot_q8_0, 4)
QMM_KERNEL(KQ4_1, dot_q4_1, 4)
QMM_KERNEL(KQ5_0, dot_q5_0, 4)
QMM_KERNEL(KQ4_K, dot_q4_k, 8)
QMM_KERNEL(KQ6_K, dot_q6_k, 8)
#undef QMM_KERNEL
#undef QMM_ROWS

// Dot m = a power of two <= kMaxRows x rows (fewer instantiations than every m: faster builds).
template <template <int> class K, int M = K<1>::kMaxRows>
inline void dot_group(const uint8_t* w, int64_t nb, const XQ& x, int64_t r0, int m, float* out) {
  if constexpr (M > 1) {
    if (m < M) return dot_group<K, M / 2>(w, nb, x, r0, m, out);
  }
  K<M>::dot(w, nb, x, r0, out);
}

// Weight rows [i0, i1) against all x rows. x is walked in tiles that stay in L2, and each weight row
// is dotted with up to kMaxRows x rows per pass, so a weight block leaves memory once per tile. No
// kernel's summation order depends on NR, so a row's result does not depend on its group.
template <template <int> class K>
void run_rows(const Job& job, int64_t i0, int64_t i1) {
  constexpr int G = K<1>::kMaxRows;
  const int64_t tile = std::max<int64_t>(G, ((int64_t(1) << 17) / std::max<int64_t>(job.x.cols, 1)) / G * G);
  float out[G];
  for (int64_t t0 = 0; t0 < job.n; t0 += tile) {
    const int64_t t1 = std::min(job.n, t0 + tile);
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* wrow = job.w + i * job.row_bytes;
      for (int64_t r = t0; r < t1;) {
        int m = G;
        while (m > t1 - r) m /= 2;
        dot_group<K>(wrow, job.nb, job.x, r, m, out);
        for (int k = 0; k < m; ++k) job.y[(r + k) * job.rows + i] = out[k];
        r += m;
      }
    }
  }
}

struct Shared {
  std::atomic<int64_t> next{0};  // first row not yet claimed
  std::atomic<int64_t> done{0};  // rows finished
  int64_t rows = 0, min_chunk = 1, threads = 1;
  Job job{};
  RowsFn fn = nullptr;
};

// Claim and run rows until none are left; touches job only for rows it claimed. Guided claims (a
// share of what is left, down to min_chunk) keep the last claims small, so a thread that starts
// late or is preempted holds up the others by little.
void work(Shared* s) {
  int64_t start = s->next.load(std::memory_order_relaxed);
  for (;;) {
    int64_t len;
    do {
      if (start >= s->rows) return;
      len = std::min(s->rows - start, std::max(s->min_chunk, (s->rows - start) / (2 * s->threads)));
    } while (!s->next.compare_exchange_weak(start, start + len, std::memory_order_relaxed));
    s->fn(s->job, start, start + len);
    s->done.fetch_add(len, std::memory_order_release);
    start = s->next.load(std::memory_order_relaxed);
  }
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct FormatInfo {
  int bs, ts;
  RowsFn fn;
};

bool format_info(int32_t type, FormatInfo* f) {
  switch (type) {
    case kQ8_0: *f = {32, 34, run_rows<KQ8_0>}; return true;
    case kQ4_1: *f = {32, 20, run_rows<KQ4_1>}; return true;
    case kQ5_0: *f = {32, 22, run_rows<KQ5_0>}; return true;
    case kQ4_K: *f = {256, 144, run_rows<KQ4_K>}; return true;
    case kQ6_K: *f = {256, 210, run_rows<KQ6_K>}; return true;
    default: return false;
  }
}

std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error QuantMatmulRun(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, const ffi::AnyBuffer& w,
                          ffi::ResultBuffer<ffi::F32>& y, int32_t ggml_type, int64_t cols, int64_t max_threads) {
  if (w.element_type() != ffi::DataType::U8) return ffi::Error::InvalidArgument("w is not uint8");
  FormatInfo f;
  if (!format_info(ggml_type, &f)) return ffi::Error::InvalidArgument("unsupported ggml type " + std::to_string(ggml_type));
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (cols < 0 || cols % f.bs) return ffi::Error::InvalidArgument("cols " + std::to_string(cols) + " not a multiple of the block");
  if (xd.size() < 1 || xd.back() != cols) return ffi::Error::InvalidArgument("x " + dims_str(xd) + " does not end in cols");
  const int64_t nb = cols / f.bs;
  if (wd.size() != 2 || wd[1] != nb * f.ts) return ffi::Error::InvalidArgument("w " + dims_str(wd) + " has the wrong row bytes");
  const int64_t rows = wd[0];
  bool ok = yd.size() == xd.size() && yd.back() == rows;
  for (size_t i = 0; ok && i + 1 < xd.size(); ++i) ok = yd[i] == xd[i];
  if (!ok) return ffi::Error::InvalidArgument("y " + dims_str(yd) + " does not match x and w");
  const int64_t n = cols ? int64_t(x.element_count()) / cols : int64_t(y->element_count()) / std::max<int64_t>(rows, 1);
  float* out = y->typed_data();
  if (n == 0 || rows == 0) return ffi::Error::Success();
  if (cols == 0) {
    std::fill(out, out + n * rows, 0.0f);
    return ffi::Error::Success();
  }

  thread_local XScratch scratch;  // reused across calls; helpers only read it while we wait
  std::shared_ptr<Shared> shared;
  try {  // no exception may cross the C boundary
    shared = std::make_shared<Shared>();
    shared->job = Job{static_cast<const uint8_t*>(w.untyped_data()), nb * f.ts, rows, nb, n, quantize_x(x.typed_data(), n, cols, ggml_type, scratch), out};
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, std::string("quantized matmul scratch: ") + e.what());
  }
  shared->fn = f.fn;

  int64_t threads = std::max<int64_t>(1, pool.num_threads());  // 0 when XLA gives no pool
  if (max_threads > 0) threads = std::min(threads, max_threads);
  const int64_t work_per_row = cols * n;
  // under ~5 us of work a helper, woken in ~5-50 us, would arrive after the end
  if (rows * work_per_row < (int64_t(1) << 17)) threads = 1;
  shared->rows = rows;
  shared->threads = threads;
  shared->min_chunk = std::max<int64_t>(1, (int64_t(1) << 15) / work_per_row);  // ~1 us of work
  if (threads == 1) shared->min_chunk = rows;
  try {
    for (int64_t t = 1; t < threads; ++t) pool.Schedule([shared] { work(shared.get()); });
  } catch (const std::exception&) {
    // fewer helpers: the rows they would have taken are left to us
  }
  work(shared.get());
  // A helper still holds rows: spin briefly (it is normally microseconds from done), then yield,
  // since on a busy machine the helper may be waiting for this very core.
  const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
  bool spinning = true;
  for (int spins = 1; shared->done.load(std::memory_order_acquire) < rows; ++spins) {
    if (spinning && !(spins & 63)) spinning = std::chrono::steady_clock::now() < spin_until;
    if (spinning) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
  return ffi::Error::Success();
}

ffi::Error QuantMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                           ffi::ResultBuffer<ffi::F32> y, int32_t ggml_type, int64_t cols, int64_t max_threads) {
  return QuantMatmulRun(pool, x, w, y, ggml_type, cols, max_threads);
}

// One layer's product out of a model's layers: `layer` (an int32 scalar, traced: the index of a
// lax.scan over the layers) picks which of the remaining buffers is the weight and which entry of
// `ggml_types` its format. The layers' weights stay the separate buffers the loader made; a scan
// over a stacked copy of them would hold the weights twice, and slicing one layer out copies it.
ffi::Error QuantMatmulLayerImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> x,
                                ffi::RemainingArgs weights, ffi::ResultBuffer<ffi::F32> y,
                                ffi::Span<const int32_t> ggml_types, int64_t cols, int64_t max_threads) {
  if (layer.element_count() != 1) return ffi::Error::InvalidArgument("layer is not a scalar");
  if (ggml_types.size() != weights.size())
    return ffi::Error::InvalidArgument(std::to_string(ggml_types.size()) + " ggml_types for " +
                                       std::to_string(weights.size()) + " weights");
  const int32_t i = layer.typed_data()[0];
  if (i < 0 || size_t(i) >= weights.size())
    return ffi::Error::InvalidArgument("layer " + std::to_string(i) + " out of " + std::to_string(weights.size()));
  auto w = weights.get<ffi::AnyBuffer>(i);
  if (w.has_error()) return w.error();
  return QuantMatmulRun(pool, x, *w, y, ggml_types[i], cols, max_threads);
}

}  // namespace

// Exported explicitly: the library is built with -fvisibility=hidden.
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* RuvllmQuantMatmul(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RuvllmQuantMatmul, QuantMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("ggml_type")
                                  .Attr<int64_t>("cols")
                                  .Attr<int64_t>("max_threads"));

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* RuvllmQuantMatmulLayer(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RuvllmQuantMatmulLayer, QuantMatmulLayerImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int32_t>>("ggml_types")
                                  .Attr<int64_t>("cols")
                                  .Attr<int64_t>("max_threads"));

// Reports how the library was compiled, for tests and benchmarks.
extern "C" __attribute__((visibility("default"))) int RuvllmQuantMatmulSimd() { return QMM_VNNI ? 3 : QMM_AVX2 ? 2 : 0; }
