// CUDA kernels of the fused token statistics (math: dualrpo_mcore/ops/token_stats.py).
//
// Bandwidth design: 256-thread blocks walk the token rows (one row at a time per block, a capped
// grid striding over rows so any 64-bit row count works). Forward: each thread sweeps the row in
// 16-byte vectors (8 bf16/fp16 or 4 fp32 values), keeps online partials (m, S, A, B, n[, mr, Sr,
// C]) in registers, rescaling only when a vector raises its max; the block then merges the 256
// partials with warp shuffles and shared memory in a fixed tree (deterministic). Backward: one
// read of z (and z_ref) and one write of dz per element, 16-byte vectors both ways. Rows whose
// pointer or stride is not 16-byte aligned take the scalar (VEC = 1) instantiation.
//
// No fp contraction of x = z * (1/T): __fmul_rn keeps x bitwise equal to the value whose max is
// M, so x - M is exactly 0 at the max (a fused z * inv_t - M would leave |x| * 2^-24 there). B
// is kept relative to the running max too, so a uniform row sums exact zeros whatever its offset.
//
// The tests compile this file unchanged with the host compiler through csrc/emu/ (a CPU emulator
// of the CUDA features used here); that is why the launch syntax goes through DUALRPO_LAUNCH.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include "token_stats_cuda.h"

#ifndef DUALRPO_LAUNCH  // csrc/emu/cuda_emu.h defines a host-callable replacement
#define DUALRPO_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif
// Blocks per launch. Rows past it are reached by the grid-stride loop, so the 2^31 - 1 limit of
// gridDim.x is never hit; 2^20 blocks are ~1000 waves of an H100, far beyond any launch overhead.
#ifndef DUALRPO_MAX_BLOCKS
#define DUALRPO_MAX_BLOCKS (1 << 20)
#endif

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kIgnore = -100;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float ex(float d) { return exp2f(d * kLog2e); }  // exp2f(-inf) = 0

// 16 bytes of S. Loading it from an S array is an access through an aggregate of S (no type
// punning), and its alignment lets nvcc emit one 128-bit load or store.
template <typename S>
struct alignas(16) Pack {
  static constexpr int N = 16 / static_cast<int>(sizeof(S));
  S e[N];
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

// Round a pair to S (the paired conversions are one instruction for two values).
__device__ __forceinline__ void from_f2(float a, float b, float* o) { o[0] = a, o[1] = b; }
__device__ __forceinline__ void from_f2(float a, float b, __nv_bfloat16* o) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  o[0] = h.x, o[1] = h.y;
}
__device__ __forceinline__ void from_f2(float a, float b, __half* o) {
  const __half2 h = __floats2half2_rn(a, b);
  o[0] = h.x, o[1] = h.y;
}
__device__ __forceinline__ void from_f(float a, float* o) { *o = a; }
__device__ __forceinline__ void from_f(float a, __nv_bfloat16* o) { *o = __float2bfloat16_rn(a); }
__device__ __forceinline__ void from_f(float a, __half* o) { *o = __float2half_rn(a); }

template <typename S>
__device__ __forceinline__ void load_scaled(const S* row, int64_t v, float inv_t, float* x) {
  const Pack<S> p = reinterpret_cast<const Pack<S>*>(row)[v];
  for (int k = 0; k < Pack<S>::N; ++k) x[k] = __fmul_rn(to_f(p.e[k]), inv_t);
}

struct Acc {  // partials relative to the running maxima m (policy) and mr (reference); n counts
  float m, s, a, b, n, mr, sr, c;
};

__device__ __forceinline__ Acc acc_init() {
  return Acc{-CUDART_INF_F, 0.f, 0.f, 0.f, 0.f, -CUDART_INF_F, 0.f, 0.f};
}

// Fold q into p (same algebra as the cross-rank merge in token_stats.py).
__device__ __forceinline__ Acc acc_merge(const Acc& p, const Acc& q) {
  Acc o;
  o.m = fmaxf(p.m, q.m);
  o.mr = fmaxf(p.mr, q.mr);
  o.n = p.n + q.n;
  o.s = o.a = o.b = o.sr = o.c = 0.f;
  const Acc* side[2] = {&p, &q};
  for (int k = 0; k < 2; ++k) {
    const Acc& t = *side[k];
    // A side whose max is -inf holds only -inf (B = -inf already) or nothing (B = 0).
    o.b += t.m > -CUDART_INF_F ? t.b + t.n * (t.m - o.m) : t.b;
    const float dr = t.sr > 0.f ? t.mr - o.mr : 0.f;
    if (t.sr > 0.f) o.sr += ex(dr) * t.sr;
    if (t.s > 0.f) {
      const float d = t.m - o.m, w = ex(d);
      o.s += w * t.s;
      o.a += w * (t.a + d * t.s);
      o.c += w * (t.c + t.s * (d - dr));
    }
  }
  return o;
}

template <bool REF>
__device__ __forceinline__ void acc_add(Acc& acc, const float* x, const float* xr, int n) {
  float vmax = -CUDART_INF_F, rmax = -CUDART_INF_F;
  for (int k = 0; k < n; ++k) vmax = fmaxf(vmax, x[k]);
  if (REF) for (int k = 0; k < n; ++k) rmax = fmaxf(rmax, xr[k]);
  if (vmax > acc.m) {  // raise m: e scales by f, x - m grows by m - m_new
    if (acc.m > -CUDART_INF_F) acc.b += acc.n * (acc.m - vmax);
    if (acc.s > 0.f) {
      const float d = acc.m - vmax, f = ex(d);
      acc.a = f * (acc.a + d * acc.s);
      acc.c = f * (acc.c + d * acc.s);
      acc.s *= f;
    }
    acc.m = vmax;
  }
  if (REF && rmax > acc.mr) {
    if (acc.sr > 0.f) {
      const float d = acc.mr - rmax;
      acc.sr *= ex(d);
      acc.c -= d * acc.s;
    }
    acc.mr = rmax;
  }
  const float shift = acc.m > -CUDART_INF_F ? acc.m : 0.f;
  const float shift_r = acc.mr > -CUDART_INF_F ? acc.mr : 0.f;
  for (int k = 0; k < n; ++k) {
    const float d = x[k] - shift, e = ex(d);
    acc.s += e;
    acc.a += e > 0.f ? e * d : 0.f;
    acc.b += d;
    if (REF) {
      const float dr = xr[k] - shift_r;
      acc.sr += ex(dr);
      acc.c += e > 0.f ? e * (d - dr) : 0.f;
    }
  }
  acc.n += static_cast<float>(n);
}

__device__ __forceinline__ Acc shfl_xor(const Acc& a, int lane) {
  Acc o;
  o.m = __shfl_xor_sync(0xffffffffu, a.m, lane);
  o.s = __shfl_xor_sync(0xffffffffu, a.s, lane);
  o.a = __shfl_xor_sync(0xffffffffu, a.a, lane);
  o.b = __shfl_xor_sync(0xffffffffu, a.b, lane);
  o.n = __shfl_xor_sync(0xffffffffu, a.n, lane);
  o.mr = __shfl_xor_sync(0xffffffffu, a.mr, lane);
  o.sr = __shfl_xor_sync(0xffffffffu, a.sr, lane);
  o.c = __shfl_xor_sync(0xffffffffu, a.c, lane);
  return o;
}

// Fixed-shape tree over the block: the result is deterministic run to run.
__device__ Acc block_merge(Acc acc) {
  __shared__ Acc warp_acc[kWarps];
  for (int lane = 16; lane > 0; lane >>= 1) acc = acc_merge(acc, shfl_xor(acc, lane));
  if ((threadIdx.x & 31) == 0) warp_acc[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < kWarps ? warp_acc[threadIdx.x] : acc_init();
    for (int lane = 16; lane > 0; lane >>= 1) acc = acc_merge(acc, shfl_xor(acc, lane));
  }
  __syncthreads();  // warp_acc is written again for the block's next row
  return acc;       // valid in thread 0
}

template <typename S, int VEC, bool REF>
__global__ void __launch_bounds__(kThreads)
partials_kernel(const S* __restrict__ z, const S* __restrict__ zr, const int64_t* __restrict__ labels,
                int64_t rows, int64_t ld, int64_t ldr, int64_t n_real, int64_t vocab_start,
                int64_t vocab_size, float inv_t, float* __restrict__ out) {
  static_assert(VEC == 1 || VEC == Pack<S>::N, "VEC: scalar, or one 16-byte pack");
  constexpr int K = REF ? 9 : 6;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const S* zrow = z + row * ld;
    const S* rrow = REF ? zr + row * ldr : nullptr;
    Acc acc = acc_init();
    float x[VEC], xr[VEC];
    int64_t tail = 0;
    if constexpr (VEC > 1) {
      const int64_t nvec = n_real / VEC;
      for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
        load_scaled(zrow, v, inv_t, x);
        if (REF) load_scaled(rrow, v, inv_t, xr);
        acc_add<REF>(acc, x, xr, VEC);
      }
      tail = nvec * VEC;
    }
    for (int64_t j = tail + threadIdx.x; j < n_real; j += kThreads) {  // tail / scalar path
      x[0] = __fmul_rn(to_f(zrow[j]), inv_t);
      if (REF) xr[0] = __fmul_rn(to_f(rrow[j]), inv_t);
      acc_add<REF>(acc, x, xr, 1);
    }
    acc = block_merge(acc);
    if (threadIdx.x == 0) {
      const int64_t y = labels[row], local = y - vocab_start;
      float ylogit = 0.f;
      if (y != kIgnore && local >= 0 && local < n_real) ylogit = __fmul_rn(to_f(zrow[local]), inv_t);
      // An invalid label cannot raise here without a host sync: poison its logprob instead.
      if (vocab_start == 0 && y != kIgnore && (y < 0 || y >= vocab_size)) ylogit = CUDART_NAN_F;
      float* o = out + row * K;
      o[0] = acc.m, o[1] = acc.s, o[2] = acc.a, o[3] = acc.b, o[4] = ylogit;
      o[5] = static_cast<float>(n_real);
      if (REF) o[6] = acc.mr, o[7] = acc.sr, o[8] = acc.c;
    }
  }
}

// dz_j = [-c p - g_H p (d - hbar) + g_SC (p - 1/V) + g_KL p (d - dr - D) + c 1[j = y]] / T on real
// columns, 0 on padding; d = x - M, dr = r - Mr, p = exp(d - log S).
template <bool REF>
__device__ __forceinline__ float grad_one(float x, float xr, int64_t j, int64_t label, int64_t n_real,
                                          const float* st, const float* gr, float inv_t, float inv_v) {
  if (j >= n_real) return 0.f;
  const float d = x - st[0], p = ex(d - st[1]);
  float g = -gr[0] * p + gr[2] * (p - inv_v) - (p > 0.f ? gr[1] * p * (d - st[2]) : 0.f);
  if (REF) g += p > 0.f ? gr[3] * p * ((d - (xr - st[3])) - st[4]) : 0.f;
  if (j == label) g += gr[0];
  return g * inv_t;
}

template <typename S, int VEC, bool REF>
__global__ void __launch_bounds__(kThreads)
grad_kernel(const S* __restrict__ z, const S* __restrict__ zr, S* __restrict__ dz,
            const int64_t* __restrict__ labels, int64_t rows, int64_t n_cols, int64_t ld, int64_t ldr,
            int64_t ldd, int64_t n_real, int64_t vocab_start, float inv_t, float inv_v,
            const float* __restrict__ stats, int64_t ks, const float* __restrict__ grads) {
  static_assert(VEC == 1 || VEC == Pack<S>::N, "VEC: scalar, or one 16-byte pack");
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const S* zrow = z + row * ld;
    const S* rrow = REF ? zr + row * ldr : nullptr;
    S* drow = dz + row * ldd;
    float st[5], gr[4];
    for (int k = 0; k < 5; ++k) st[k] = k < ks ? stats[row * ks + k] : 0.f;
    for (int k = 0; k < 4; ++k) gr[k] = grads[row * 4 + k];
    const int64_t y = labels[row];
    const int64_t label = y == kIgnore ? -1 : y - vocab_start;
    int64_t tail = 0;
    if constexpr (VEC > 1) {
      const int64_t nvec = n_cols / VEC;
      for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
        const int64_t j0 = v * VEC;
        float x[VEC], xr[VEC], g[VEC];
        if (j0 < n_real) {  // a vector of padding only is written, never read
          load_scaled(zrow, v, inv_t, x);
          if (REF) load_scaled(rrow, v, inv_t, xr);
          for (int k = 0; k < VEC; ++k)
            g[k] = grad_one<REF>(x[k], REF ? xr[k] : 0.f, j0 + k, label, n_real, st, gr, inv_t, inv_v);
        } else {
          for (int k = 0; k < VEC; ++k) g[k] = 0.f;
        }
        Pack<S> out;
        for (int k = 0; k < VEC; k += 2) from_f2(g[k], g[k + 1], out.e + k);
        reinterpret_cast<Pack<S>*>(drow)[v] = out;
      }
      tail = nvec * VEC;
    }
    for (int64_t j = tail + threadIdx.x; j < n_cols; j += kThreads) {
      const float xj = j < n_real ? __fmul_rn(to_f(zrow[j]), inv_t) : 0.f;
      const float rj = REF && j < n_real ? __fmul_rn(to_f(rrow[j]), inv_t) : 0.f;
      from_f(grad_one<REF>(xj, rj, j, label, n_real, st, gr, inv_t, inv_v), drow + j);
    }
  }
}

template <typename S>
bool aligned(const void* p, int64_t ld) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (ld * static_cast<int64_t>(sizeof(S))) % 16 == 0;
}

dim3 grid_for(int64_t rows) {
  return dim3(static_cast<unsigned>(rows < DUALRPO_MAX_BLOCKS ? rows : DUALRPO_MAX_BLOCKS));
}

template <typename S>
int launch_partials(const void* z, const void* zr, const int64_t* labels, int64_t rows, int64_t ld,
                    int64_t ldr, int64_t n_real, int64_t vs, int64_t vsize, float inv_t, float* out,
                    cudaStream_t st) {
  constexpr int W = Pack<S>::N;
  const S* zp = static_cast<const S*>(z);
  const S* rp = static_cast<const S*>(zr);
  const bool vec = aligned<S>(z, ld) && (!zr || aligned<S>(zr, ldr));
  const dim3 grid = grid_for(rows), block(kThreads);
#define DUALRPO_PARTIALS(VEC, REF) \
  DUALRPO_LAUNCH(grid, block, st, partials_kernel<S, VEC, REF>)(zp, rp, labels, rows, ld, ldr, n_real, vs, vsize, inv_t, out)
  if (zr && vec) DUALRPO_PARTIALS(W, true);
  else if (zr) DUALRPO_PARTIALS(1, true);
  else if (vec) DUALRPO_PARTIALS(W, false);
  else DUALRPO_PARTIALS(1, false);
#undef DUALRPO_PARTIALS
  return static_cast<int>(cudaGetLastError());
}

template <typename S>
int launch_grad(const void* z, const void* zr, void* dz, const int64_t* labels, int64_t rows,
                int64_t n_cols, int64_t ld, int64_t ldr, int64_t ldd, int64_t n_real, int64_t vs,
                int64_t vsize, float inv_t, const float* stats, int64_t ks, const float* grads,
                cudaStream_t st) {
  constexpr int W = Pack<S>::N;
  const S* zp = static_cast<const S*>(z);
  const S* rp = static_cast<const S*>(zr);
  S* dp = static_cast<S*>(dz);
  const bool vec = aligned<S>(z, ld) && aligned<S>(dz, ldd) && (!zr || aligned<S>(zr, ldr));
  const float inv_v = 1.0f / static_cast<float>(vsize);
  const dim3 grid = grid_for(rows), block(kThreads);
#define DUALRPO_GRAD(VEC, REF)                                                                    \
  DUALRPO_LAUNCH(grid, block, st, grad_kernel<S, VEC, REF>)(zp, rp, dp, labels, rows, n_cols, ld, \
                                                            ldr, ldd, n_real, vs, inv_t, inv_v,   \
                                                            stats, ks, grads)
  if (zr && vec) DUALRPO_GRAD(W, true);
  else if (zr) DUALRPO_GRAD(1, true);
  else if (vec) DUALRPO_GRAD(W, false);
  else DUALRPO_GRAD(1, false);
#undef DUALRPO_GRAD
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int dualrpo_cuda_partials(const void* z, const void* zr, int dtype, const int64_t* labels,
                                     int64_t rows, int64_t ld, int64_t ldr, int64_t n_real,
                                     int64_t vocab_start, int64_t vocab_size, float inv_t, float* out,
                                     void* stream) {
  if (rows == 0) return 0;
  if (rows < 0 || n_real < 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DUALRPO_F32: return launch_partials<float>(z, zr, labels, rows, ld, ldr, n_real, vocab_start, vocab_size, inv_t, out, st);
    case DUALRPO_BF16: return launch_partials<__nv_bfloat16>(z, zr, labels, rows, ld, ldr, n_real, vocab_start, vocab_size, inv_t, out, st);
    case DUALRPO_F16: return launch_partials<__half>(z, zr, labels, rows, ld, ldr, n_real, vocab_start, vocab_size, inv_t, out, st);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int dualrpo_cuda_grad(const void* z, const void* zr, void* dz, int dtype, const int64_t* labels,
                                 int64_t rows, int64_t n_cols, int64_t ld, int64_t ldr, int64_t ldd,
                                 int64_t n_real, int64_t vocab_start, int64_t vocab_size, float inv_t,
                                 const float* stats, int64_t ks, const float* grads, void* stream) {
  if (rows == 0) return 0;
  if (rows < 0 || n_real < 0 || n_real > n_cols || vocab_size <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DUALRPO_F32: return launch_grad<float>(z, zr, dz, labels, rows, n_cols, ld, ldr, ldd, n_real, vocab_start, vocab_size, inv_t, stats, ks, grads, st);
    case DUALRPO_BF16: return launch_grad<__nv_bfloat16>(z, zr, dz, labels, rows, n_cols, ld, ldr, ldd, n_real, vocab_start, vocab_size, inv_t, stats, ks, grads, st);
    case DUALRPO_F16: return launch_grad<__half>(z, zr, dz, labels, rows, n_cols, ld, ldr, ldd, n_real, vocab_start, vocab_size, inv_t, stats, ks, grads, st);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
