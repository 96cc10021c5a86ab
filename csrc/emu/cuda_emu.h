// A CPU emulator of the CUDA features that csrc/token_stats_cuda.cu uses, so that the host C++
// compiler (g++ -std=c++17 -x c++) builds that file unchanged and the tests run the real kernel.
// This header is what kernel code sees (types, intrinsics, the launch); the engine is in
// cuda_emu.cpp, compiled once, so that a kernel translation unit stays cheap to build.
//
// Execution model. Blocks run one after the other; the threads of a block are cooperative fibers
// on one OS thread (entered once through makecontext, then switched with _setjmp/_longjmp, which
// unlike swapcontext costs no system call). A fiber runs until it reaches a barrier or a warp
// collective, so __syncthreads and the *_sync shuffles have their real semantics. Which runnable
// fiber goes next is a knob: strict priority to the lowest thread id, to the highest, or a seeded
// random pick. A priority order lets the favoured warps run as far as they can before the others
// move, which is what turns a missing barrier into a wrong result.
//
// Checked (the launch then fails with cudaErrorLaunchFailure and emu_message() says why):
//   a shuffle/vote whose mask leaves out the calling lane, or whose source lane is not in it;
//   lanes of one warp meeting in collectives with different masks or kinds;
//   a collective or __syncthreads waiting on a thread that exited or waits elsewhere (deadlock);
//   __syncthreads after some thread of the block returned (a divergent barrier);
//   launch configurations the hardware rejects (cudaErrorInvalidConfiguration, as CUDA does).
// __shared__ variables of non-template functions live in one ELF section that is filled with
// 0xFF (NaN) at every block start, so a read before any write is visible (g++ ignores the
// section of a template's local static: those are plain statics, shared but not poisoned).
// Not modelled: fast-math approximations and flush-to-zero (host libm instead), memory races
// other than those the scheduling orders expose, streams (all synchronous), dynamic shared memory.
#pragma once

#define DUALRPO_CUDA_EMU 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <limits>

// --- qualifiers ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("emu_shared")))

// --- vector types -------------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// --- runtime API (synchronous) ------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

// --- bf16 / fp16 --------------------------------------------------------------------------------
struct __nv_bfloat16 { unsigned short __x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half { unsigned short __x; };
struct __half2 { __half x, y; };

namespace emu {
inline uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float bitsf(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

inline unsigned short float_to_bf16_rne(float f) {
  const uint32_t u = fbits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);  // quiet nan
  return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline unsigned short float_to_half_rne(float f) {
  const uint32_t u = fbits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<unsigned short>(sign | 0x7e00u);
  if (a >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half m * 2^-24, m rounded to nearest even
    if (a <= 0x33000000u) return static_cast<unsigned short>(sign);  // <= 2^-25 ties down to 0
    const int shift = 126 - static_cast<int>(a >> 23);
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    uint32_t m = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (m & 1u))) ++m;
    return static_cast<unsigned short>(sign | m);
  }
  uint32_t h = (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
  return static_cast<unsigned short>(sign | h);
}

inline float half_to_float(unsigned short h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) return bitsf(sign) + (sign ? -1.f : 1.f) * static_cast<float>(m) * 5.9604644775390625e-08f;
  if (e == 31) return bitsf(sign | 0x7f800000u | (m << 13));
  return bitsf(sign | ((e + 112u) << 23) | (m << 13));
}
}  // namespace emu

inline float __bfloat162float(__nv_bfloat16 h) { return emu::bitsf(static_cast<uint32_t>(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu::float_to_bf16_rne(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline float __half2float(__half h) { return emu::half_to_float(h.__x); }
inline __half __float2half_rn(float f) { return {emu::float_to_half_rne(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

// --- math ---------------------------------------------------------------------------------------
// Built with -ffp-contract=off (the ISO C++ default of g++), so a * b is the rounded product.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __int_as_float(int i) { return emu::bitsf(static_cast<uint32_t>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(emu::fbits(f)); }
#define CUDART_INF_F (std::numeric_limits<float>::infinity())
#define CUDART_NAN_F (std::numeric_limits<float>::quiet_NaN())
#define CUDART_INF (std::numeric_limits<double>::infinity())
#define CUDART_NAN (std::numeric_limits<double>::quiet_NaN())

// --- built-in variables (blockIdx etc. are set by the engine for each block) ----------------------
extern uint3 blockIdx;
extern dim3 blockDim, gridDim;

// --- engine interface (cuda_emu.cpp) -------------------------------------------------------------
namespace emu {

enum class Coll { kShfl, kShflUp, kShflDown, kShflXor, kSyncWarp, kBallot, kAny, kAll };

const uint3& thread_idx();
void syncthreads();
uint64_t warp_collective(Coll kind, unsigned mask, uint64_t val, int arg, int width);
void run_grid(dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

// `DUALRPO_LAUNCH(grid, block, stream, kernel)(args...)` stands for kernel<<<grid, block, 0, stream>>>(args...).
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A... a) const {
    auto call = [&]() { kernel(a...); };
    using Call = decltype(call);
    run_grid(grid, block, smem, [](void* c) { (*static_cast<Call*>(c))(); }, &call);
  }
};

template <typename... P>
Launcher<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return Launcher<P...>{kernel, grid, block, smem};
}

}  // namespace emu

#define DUALRPO_LAUNCH(grid, block, stream, ...) ::emu::launch(grid, block, 0, stream, __VA_ARGS__)
#define threadIdx (::emu::thread_idx())

// --- device intrinsics --------------------------------------------------------------------------
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_collective(emu::Coll::kSyncWarp, mask, 0, 0, 32); }
template <typename T>
T __shfl_sync(unsigned mask, T var, int src, int width = 32) {
  return emu::from_bits<T>(emu::warp_collective(emu::Coll::kShfl, mask, emu::to_bits(var), src, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return emu::from_bits<T>(emu::warp_collective(emu::Coll::kShflUp, mask, emu::to_bits(var), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return emu::from_bits<T>(emu::warp_collective(emu::Coll::kShflDown, mask, emu::to_bits(var), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return emu::from_bits<T>(emu::warp_collective(emu::Coll::kShflXor, mask, emu::to_bits(var), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(emu::warp_collective(emu::Coll::kBallot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) { return static_cast<int>(emu::warp_collective(emu::Coll::kAny, mask, pred != 0, 0, 32)); }
inline int __all_sync(unsigned mask, int pred) { return static_cast<int>(emu::warp_collective(emu::Coll::kAll, mask, pred != 0, 0, 32)); }

// Fibers are never preempted, so a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <typename T>
T atomicMax(T* p, T v) { const T old = *p; *p = old < v ? v : old; return old; }
template <typename T>
T atomicCAS(T* p, T cmp, T v) { const T old = *p; if (old == cmp) *p = v; return old; }

// --- runtime API and the driver's controls ------------------------------------------------------
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaDeviceSynchronize();
const char* cudaGetErrorString(cudaError_t e);

namespace emu {
enum class Order { kForward = 0, kReverse = 1, kRandom = 2 };
void set_order(Order order, uint64_t seed);
void set_dry_run(bool on);     // validate and record launches, run nothing
const char* message();         // why the last launch failed
int launch_count();            // launches since clear_launches()
dim3 launch_grid(int i);
dim3 launch_block(int i);
void clear_launches();
}  // namespace emu
