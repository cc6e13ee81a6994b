// Per-row work on one float32 logits tile while it is in cache: bias and temperature, the tile's max, the sums of
// the online logsumexp, and the logits' gradient. AVX2+FMA when the compiler targets it, plain loops otherwise.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define AAM_FAST_AVX2 1
#else
#define AAM_FAST_AVX2 0
#endif

namespace aam_fast::cpu {

// Shifted logits and log-probs are clamped here before they multiply a probability: below log of the smallest
// float (about -103.3) the probability is 0 anyway, and a masked entry (z = -inf, a bias of -inf) then adds 0, not
// 0 * (-inf) = NaN. The clamps keep NaN (max with the NaN as the operand that is returned).
constexpr float kLogFloor = -1.0e4f;

#if AAM_FAST_AVX2
// exp of 8 floats (Cephes expf): x = n ln2 + r, |r| <= ln2/2, exp(x) = 2^n (1 + r + r^2 P(r)); about 1 ulp.
// 0 below ln(FLT_MIN), +inf above ln(FLT_MAX), NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654475f);
  const __m256 hi = _mm256_set1_ps(88.0f);
  const __m256 overflow = _mm256_set1_ps(88.72283906f);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(x, overflow, _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// z <- (z + bias) * scale in place (bias may be null); returns max_j z_j. The same two roundings as the scalar
// `(z + b) * s`, so a logit read back from the tile equals one recomputed on its own.
inline float bias_scale_max(float* z, int64_t n, const float* bias, float scale) {
  int64_t j = 0;
  float best = -std::numeric_limits<float>::infinity();
#if AAM_FAST_AVX2
  const __m256 s = _mm256_set1_ps(scale);
  __m256 m0 = _mm256_set1_ps(best), m1 = m0;
  for (; j + 16 <= n; j += 16) {
    __m256 a = _mm256_loadu_ps(z + j), b = _mm256_loadu_ps(z + j + 8);
    if (bias != nullptr) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(bias + j));
      b = _mm256_add_ps(b, _mm256_loadu_ps(bias + j + 8));
    }
    a = _mm256_mul_ps(a, s);
    b = _mm256_mul_ps(b, s);
    _mm256_storeu_ps(z + j, a);
    _mm256_storeu_ps(z + j + 8, b);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
  }
  best = hmax8(_mm256_max_ps(m0, m1));
#endif
  for (; j < n; ++j) {
    float v = bias != nullptr ? (z[j] + bias[j]) * scale : z[j] * scale;
    z[j] = v;
    best = std::max(best, v);
  }
  return best;
}

// sum_j exp(z_j - m), and sum_j exp(z_j - m) (z_j - m) when `with_shift` (else 0). With m >= every z_j each
// term of the second sum is <= 0, so nothing cancels (a sum of exp(z_j - m) z_j mixes signs and loses |z|/H).
inline void exp_sums(const float* z, int64_t n, float m, bool with_shift, float& sum, float& shift) {
  int64_t j = 0;
  sum = 0.0f;
  shift = 0.0f;
#if AAM_FAST_AVX2
  const __m256 vm = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, t0 = s0, t1 = s0;
  for (; j + 16 <= n; j += 16) {
    __m256 a = _mm256_sub_ps(_mm256_loadu_ps(z + j), vm), b = _mm256_sub_ps(_mm256_loadu_ps(z + j + 8), vm);
    a = _mm256_max_ps(_mm256_set1_ps(kLogFloor), a);  // max_ps returns its second operand when one is NaN
    b = _mm256_max_ps(_mm256_set1_ps(kLogFloor), b);
    __m256 ea = exp8(a), eb = exp8(b);
    s0 = _mm256_add_ps(s0, ea);
    s1 = _mm256_add_ps(s1, eb);
    if (with_shift) {
      t0 = _mm256_fmadd_ps(ea, a, t0);
      t1 = _mm256_fmadd_ps(eb, b, t1);
    }
  }
  sum = hsum8(_mm256_add_ps(s0, s1));
  shift = hsum8(_mm256_add_ps(t0, t1));
#endif
  for (; j < n; ++j) {
    const float d = std::max(z[j] - m, kLogFloor);  // std::max(NaN, x) returns the NaN
    const float e = std::exp(d);
    sum += e;
    if (with_shift) shift += e * d;
  }
}

// The logits' gradient of one row, in place: z <- (z + bias) * scale, log p = (z - lse_hi) - lse_lo (the float64
// lse split into float32 hi + lo parts, so log p carries the rounding of z - lse, not of lse), p = exp(log p), then
// dz = -g p (log-prob only) or dz = p (-e (log p + H) - g) = p (e (mean_z - z) - g) with the entropy H and its
// upstream gradient e. The target column's `+ g` is left to the caller, which forms it without cancellation.
inline void logit_grad_row(float* z, int64_t n, const float* bias, float scale, float lse_hi, float lse_lo, float g,
                           bool entropy, float e, float entropy_value) {
  int64_t j = 0;
#if AAM_FAST_AVX2
  const __m256 s = _mm256_set1_ps(scale), vhi = _mm256_set1_ps(lse_hi), vlo = _mm256_set1_ps(lse_lo);
  const __m256 ve = _mm256_set1_ps(e), vh = _mm256_set1_ps(entropy_value), neg_g = _mm256_set1_ps(-g);
  for (; j + 8 <= n; j += 8) {
    __m256 a = _mm256_loadu_ps(z + j);
    if (bias != nullptr) a = _mm256_add_ps(a, _mm256_loadu_ps(bias + j));
    a = _mm256_mul_ps(a, s);
    const __m256 log_p = _mm256_max_ps(_mm256_set1_ps(kLogFloor), _mm256_sub_ps(_mm256_sub_ps(a, vhi), vlo));
    const __m256 p = exp8(log_p);
    const __m256 coef = entropy ? _mm256_fnmadd_ps(ve, _mm256_add_ps(log_p, vh), neg_g) : neg_g;
    _mm256_storeu_ps(z + j, _mm256_mul_ps(p, coef));
  }
#endif
  for (; j < n; ++j) {
    const float v = bias != nullptr ? (z[j] + bias[j]) * scale : z[j] * scale;
    const float log_p = std::max((v - lse_hi) - lse_lo, kLogFloor);
    const float p = std::exp(log_p);
    z[j] = entropy ? p * (-e * (log_p + entropy_value) - g) : -g * p;
  }
}

}  // namespace aam_fast::cpu
