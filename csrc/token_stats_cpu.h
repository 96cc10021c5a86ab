// Per-row kernels of the fused token statistics on CPU (the math is in
// dualrpo_mcore/ops/token_stats.py). Each row is swept once in tiles of TILE columns:
// the tile is converted to the accumulation type (fp32, or fp64 for fp64 inputs), its max
// found, the running accumulators rescaled if the max grew (the same algebra as the merge
// across ranks), then exp-sums accumulated in a branch-free loop that GCC vectorizes
// (`omp simd` reductions; the exp below is a polynomial so the loop needs no libm call).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace dualrpo {

constexpr int64_t TILE = 512;

// The build uses -ffp-contract=off: a contracted fma(z, 1/T, -M) would not cancel exactly
// against the rounded max M (an error of |x| * 2^-24, i.e. 1e-3 at |x| = 1e4). Where a fused
// multiply-add is wanted (the exp polynomial) it is written out.
inline float madd(float a, float b, float c) {
#ifdef __FMA__
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

template <typename To, typename From>
inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// exp(x) for x <= 0 (what the kernels need: logits minus a max); 0 below -87 (the terms
// dropped there are < 1e-38 of a sum that is >= 1). Cody-Waite reduction x = k ln2 + r,
// |r| <= ln2/2, degree-7 Taylor (relative error ~5e-9 before rounding), 2^k built in the
// exponent bits. -inf gives 0; nan stays nan.
inline float fexp(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + magic;
  const float k = t - magic;
  const int32_t ki = bits_as<int32_t>(t) - 0x4B400000;
  float r = xc - k * 0.693145751953125f;  // ln2 split in a hi part exact in k * hi ...
  r = r - k * 1.428606765330187e-06f;      // ... and the rest
  float p = 1.0f / 5040.0f;
  p = madd(p, r, 1.0f / 720.0f);
  p = madd(p, r, 1.0f / 120.0f);
  p = madd(p, r, 1.0f / 24.0f);
  p = madd(p, r, 1.0f / 6.0f);
  p = madd(p, r, 0.5f);
  p = madd(p, r, 1.0f);
  p = madd(p, r, 1.0f);
  const float scale = bits_as<float>((ki + 127) << 23);
  const float res = p * scale;
  return x < -87.0f ? 0.0f : (x == x ? res : x);
}

inline double fexp(double x) { return std::exp(x); }  // float64 path (gradcheck), not hot

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(c10::BFloat16 v) { return bits_as<float>(static_cast<uint32_t>(v.x) << 16); }
inline float load(c10::Half v) { return static_cast<float>(v); }

inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }
inline void store(c10::BFloat16* p, float v) {
  // Round to nearest even on the upper 16 bits (the gradient is never nan here).
  const uint32_t u = bits_as<uint32_t>(v);
  p->x = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline void store(c10::Half* p, float v) { *p = c10::Half(v); }

// Accumulators of one row relative to the running maxima m (policy) and mr (reference); n counts
// the columns summed so far. B is relative to m as well (B = sum (x_j - m)): summing x_j itself
// would cancel two numbers of size |x| in self-certainty and lose it at large offsets.
template <typename A>
struct RowAcc {
  A m = -std::numeric_limits<A>::infinity(), s = 0, a = 0, b = 0, n = 0;
  A mr = -std::numeric_limits<A>::infinity(), sr = 0, c = 0;

  // Move from max m to m_new > m: e_j scales by f = exp(m - m_new), x - m grows by m - m_new.
  // While m is -inf every column so far is -inf and B is already -inf: nothing to move.
  void raise_m(A m_new) {
    if (m > -std::numeric_limits<A>::infinity()) b += n * (m - m_new);
    if (s > 0) {
      const A delta = m - m_new, f = fexp(delta);
      a = f * (a + delta * s);
      c = f * (c + delta * s);
      s = f * s;
    }
    m = m_new;
  }
  // Move the reference max: S_r scales, C shifts by -(mr - mr_new) * S.
  void raise_mr(A mr_new) {
    if (sr > 0) {
      const A delta = mr - mr_new;
      sr = sr * fexp(delta);
      if (s > 0) c = c - delta * s;
    }
    mr = mr_new;
  }
};

// Partials of one row: out = (m, S, A, B, y, n[, mr, Sr, C]); see token_stats.py.
template <bool REF, typename S, typename A>
void row_partials(const S* z, const S* zr, int64_t n, int64_t label_local, A inv_t, A* out) {
  RowAcc<A> acc;
  alignas(64) A x[TILE];
  alignas(64) A xr[TILE];
  for (int64_t t0 = 0; t0 < n; t0 += TILE) {
    const int64_t w = std::min(TILE, n - t0);
    A tmax = -std::numeric_limits<A>::infinity(), rmax = tmax;
#pragma omp simd reduction(max : tmax)
    for (int64_t i = 0; i < w; ++i) {
      x[i] = load(z[t0 + i]) * inv_t;
      tmax = x[i] > tmax ? x[i] : tmax;
    }
    if (REF) {
#pragma omp simd reduction(max : rmax)
      for (int64_t i = 0; i < w; ++i) {
        xr[i] = load(zr[t0 + i]) * inv_t;
        rmax = xr[i] > rmax ? xr[i] : rmax;
      }
    }
    if (tmax > acc.m) acc.raise_m(tmax);
    if (REF && rmax > acc.mr) acc.raise_mr(rmax);
    // While every value so far is -inf the shift is 0, so x - shift stays -inf (exp -> 0).
    const A shift = acc.m > -std::numeric_limits<A>::infinity() ? acc.m : A(0);
    const A shift_r = acc.mr > -std::numeric_limits<A>::infinity() ? acc.mr : A(0);
    A ts = 0, ta = 0, tb = 0, tsr = 0, tc = 0;
#pragma omp simd reduction(+ : ts, ta, tb, tsr, tc)
    for (int64_t i = 0; i < w; ++i) {
      const A d = x[i] - shift;
      const A e = fexp(d);
      ts += e;
      ta += e > 0 ? e * d : A(0);  // e = 0 for x = -inf: skip 0 * -inf
      tb += d;
      if (REF) {
        const A dr = xr[i] - shift_r;
        tsr += fexp(dr);
        tc += e > 0 ? e * (d - dr) : A(0);
      }
    }
    acc.s += ts, acc.a += ta, acc.b += tb, acc.sr += tsr, acc.c += tc;
    acc.n += A(w);
  }
  out[0] = acc.m, out[1] = acc.s, out[2] = acc.a, out[3] = acc.b;
  out[4] = (label_local >= 0 && label_local < n) ? load(z[label_local]) * inv_t : A(0);
  out[5] = A(n);
  if (REF) out[6] = acc.mr, out[7] = acc.sr, out[8] = acc.c;
}

// Gradient of one row. st = (M, log S, hbar[, M_r, D]), gr = (c, g_H, g_SC, g_KL); c is already 0
// for ignored labels. dz_j = [-c p - g_H p (d - hbar) + g_SC (p - 1/V) + g_KL p (d - dr - D)] / T
// on real columns (+ c / T at the label), 0 on padding; d = x - M, dr = r - M_r, p = exp(d - log S).
template <bool REF, typename S, typename A>
void row_grad(const S* z, const S* zr, S* dz, int64_t n, int64_t n_cols, int64_t label_local,
              const A* st, const A* gr, A inv_t, A inv_v) {
  const A big_m = st[0], log_s = st[1], hbar = st[2];
  const A big_mr = REF ? st[3] : A(0), dbar = REF ? st[4] : A(0);
  const A c = gr[0], gh = gr[1], gsc = gr[2], gkl = REF ? gr[3] : A(0);
  alignas(64) A buf[TILE];
  for (int64_t t0 = 0; t0 < n; t0 += TILE) {
    const int64_t w = std::min(TILE, n - t0);
#pragma omp simd
    for (int64_t i = 0; i < w; ++i) {
      const A d = load(z[t0 + i]) * inv_t - big_m;
      const A p = fexp(d - log_s);
      A g = -c * p + gsc * (p - inv_v) - (p > 0 ? gh * p * (d - hbar) : A(0));
      if (REF) {
        const A dr = load(zr[t0 + i]) * inv_t - big_mr;
        g += p > 0 ? gkl * p * ((d - dr) - dbar) : A(0);
      }
      buf[i] = g * inv_t;
    }
    if (label_local >= t0 && label_local < t0 + w) buf[label_local - t0] += c * inv_t;
#pragma omp simd
    for (int64_t i = 0; i < w; ++i) store(dz + t0 + i, buf[i]);
  }
  for (int64_t j = n; j < n_cols; ++j) store(dz + j, A(0));
}

}  // namespace dualrpo
