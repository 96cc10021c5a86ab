// The engine of the CUDA emulator: fibers, scheduling orders, barriers, warp collectives, launch
// checks. The model and what is checked are described in cuda_emu.h.
#include "cuda_emu.h"

#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

uint3 blockIdx{0, 0, 0};
dim3 blockDim, gridDim;

extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

namespace emu {
namespace {

enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  char* stack = nullptr;
  size_t stack_size = 0;
  bool started = false;
  void* fake_stack = nullptr;  // ASan's bookkeeping while switched out
  uint3 tid{0, 0, 0};
  int linear = 0;
  State state = State::kRunnable;
  uint64_t result = 0;
};

struct WarpPending {
  Coll kind = Coll::kShfl;
  unsigned mask = 0, arrived = 0;
  int width = 32;
  uint64_t val[32] = {};
  int arg[32] = {};
};

struct Runtime {
  Order order = Order::kForward;
  uint64_t seed = 0;
  bool dry_run = false;
  std::vector<dim3> grids, blocks;
  cudaError_t last_error = cudaSuccess;
  std::string message;
  // the block being run
  std::vector<Fiber> fibers;
  int nthreads = 0, at_barrier = 0, exited = 0;
  std::vector<WarpPending> warps;
  std::vector<char> ready;
  int n_ready = 0;
  std::mt19937_64 rng;
  Fiber* cur = nullptr;
  bool trapped = false, pool_valid = false;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  jmp_buf sched_jb;
  ucontext_t boot_uc;
  void* sched_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  ~Runtime() {
    for (Fiber& f : fibers) std::free(f.stack);
  }
};

Runtime& rt() {
  static Runtime r;
  return r;
}

void asan_start(void** save, const void* bottom, size_t size) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(save, bottom, size);
#else
  (void)save, (void)bottom, (void)size;
#endif
}
void asan_finish(void* save, const void** bottom, size_t* size) {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(save, bottom, size);
#else
  (void)save, (void)bottom, (void)size;
#endif
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
__attribute__((noinline)) void yield() {
  Runtime& r = rt();
  Fiber* f = r.cur;
  if (_setjmp(f->jb) == 0) {
    asan_start(&f->fake_stack, r.main_bottom, r.main_size);
    _longjmp(r.sched_jb, 1);
  }
  asan_finish(f->fake_stack, nullptr, nullptr);
}

// A kernel fault: record it and leave this fiber for good (its frames are discarded).
[[noreturn]] void trap(const std::string& why) {
  Runtime& r = rt();
  if (!r.trapped) r.message = why;
  r.trapped = true;
  yield();
  std::abort();  // never resumed
}

std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) +
         ") = lane " + std::to_string(f.linear % 32) + " of warp " + std::to_string(f.linear / 32);
}

std::string hex(unsigned v) {
  char b[16];
  snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

const char* coll_name(Coll k) {
  switch (k) {
    case Coll::kShfl: return "__shfl_sync";
    case Coll::kShflUp: return "__shfl_up_sync";
    case Coll::kShflDown: return "__shfl_down_sync";
    case Coll::kShflXor: return "__shfl_xor_sync";
    case Coll::kSyncWarp: return "__syncwarp";
    case Coll::kBallot: return "__ballot_sync";
    case Coll::kAny: return "__any_sync";
    case Coll::kAll: return "__all_sync";
  }
  return "?";
}

void wake(int i) {
  Runtime& r = rt();
  r.fibers[i].state = State::kRunnable;
  if (!r.ready[i]) r.ready[i] = 1, ++r.n_ready;
}

// The next fiber to resume under the configured order; -1 when none is runnable.
int pick() {
  Runtime& r = rt();
  if (r.n_ready == 0) return -1;
  int i = -1;
  if (r.order == Order::kForward) {
    for (i = 0; !r.ready[i]; ++i) {}
  } else if (r.order == Order::kReverse) {
    for (i = r.nthreads - 1; !r.ready[i]; --i) {}
  } else {
    int k = static_cast<int>(r.rng() % static_cast<uint64_t>(r.n_ready));
    for (i = 0; !r.ready[i] || k-- > 0; ++i) {}
  }
  r.ready[i] = 0, --r.n_ready;
  return i;
}

void thread_exit(Fiber& f) {
  Runtime& r = rt();
  f.state = State::kDone;
  ++r.exited;
  if (r.at_barrier > 0)
    trap(thread_name(f) + " returned while " + std::to_string(r.at_barrier) +
         " thread(s) of its block wait in __syncthreads (divergent barrier)");
  const WarpPending& w = r.warps[f.linear / 32];
  if (w.arrived && (w.mask >> (f.linear % 32) & 1u))
    trap(thread_name(f) + " returned while lanes of its warp wait for it in " + coll_name(w.kind));
}

void fiber_main() {
  Runtime& r = rt();
  asan_finish(nullptr, &r.main_bottom, &r.main_size);
  for (;;) {
    Fiber& f = *r.cur;
    r.body(r.body_arg);
    thread_exit(f);
    yield();
  }
}

// Source lane of a shuffle, or -1 for "own value" (CUDA's out-of-segment rule).
int shfl_source(Coll k, int lane, int arg, int width) {
  const int base = lane / width * width;
  switch (k) {
    case Coll::kShfl: return base + (arg % width + width) % width;
    case Coll::kShflUp: return lane - base >= arg ? lane - arg : -1;
    case Coll::kShflDown: return lane - base + arg < width ? lane + arg : -1;
    case Coll::kShflXor: {
      const int s = lane ^ arg;
      return s < base + width ? s : -1;  // earlier segments may be read, later ones not
    }
    default: return -1;
  }
}

void complete(WarpPending& w, int warp) {
  Runtime& r = rt();
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((w.mask >> l & 1u) && w.val[l]) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    if (!(w.mask >> l & 1u)) continue;
    Fiber& f = r.fibers[warp * 32 + l];
    switch (w.kind) {
      case Coll::kShfl: case Coll::kShflUp: case Coll::kShflDown: case Coll::kShflXor: {
        const int s = shfl_source(w.kind, l, w.arg[l], w.width);
        if (s >= 0 && s != l && !(w.mask >> s & 1u))
          trap(std::string(coll_name(w.kind)) + " in " + thread_name(f) + " reads lane " + std::to_string(s) +
               ", which is not in mask " + hex(w.mask));
        f.result = s >= 0 ? w.val[s] : w.val[l];
        break;
      }
      case Coll::kSyncWarp: f.result = 0; break;
      case Coll::kBallot: f.result = ballot; break;
      case Coll::kAny: f.result = ballot != 0; break;
      case Coll::kAll: f.result = ballot == w.mask; break;
    }
    wake(warp * 32 + l);
  }
  w.arrived = 0;
}

void poison_shared() {
  const auto lo = reinterpret_cast<uintptr_t>(__start_emu_shared), hi = reinterpret_cast<uintptr_t>(__stop_emu_shared);
  if (lo && hi > lo) memset(__start_emu_shared, 0xff, hi - lo);
}

void ensure_pool(int n) {
  Runtime& r = rt();
  if (r.pool_valid && static_cast<int>(r.fibers.size()) >= n) return;
  const size_t size = EMU_ASAN ? (512u << 10) : (128u << 10);
  for (Fiber& f : r.fibers) std::free(f.stack);
  r.fibers.assign(static_cast<size_t>(n), Fiber());
  for (Fiber& f : r.fibers) {
    f.stack = static_cast<char*>(std::malloc(size));
    f.stack_size = size;
    if (!f.stack) { fprintf(stderr, "emu: out of memory for fiber stacks\n"); std::abort(); }
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = size;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
  }
  r.pool_valid = true;
}

__attribute__((noinline)) void resume(Fiber& f) {
  Runtime& r = rt();
  r.cur = &f;
  if (_setjmp(r.sched_jb) == 0) {
    asan_start(&r.sched_fake, f.stack, f.stack_size);
    if (!f.started) {
      f.started = true;
      swapcontext(&r.boot_uc, &f.uc);
    } else {
      _longjmp(f.jb, 1);
    }
  }
  asan_finish(r.sched_fake, nullptr, nullptr);
  r.cur = nullptr;
}

std::string deadlock_report() {
  Runtime& r = rt();
  std::string s = "deadlock: no thread can run;";
  int shown = 0;
  for (int i = 0; i < r.nthreads && shown < 4; ++i) {
    const Fiber& f = r.fibers[i];
    if (f.state == State::kDone) continue;
    s += " " + thread_name(f) + (f.state == State::kBarrier ? " waits in __syncthreads;" : " waits in a warp collective;");
    ++shown;
  }
  return s + " (" + std::to_string(r.exited) + " returned)";
}

// Runs one block; false when it faulted (message set, fibers discarded).
bool run_block(int n, dim3 block) {
  Runtime& r = rt();
  ensure_pool(n);
  r.nthreads = n, r.at_barrier = 0, r.exited = 0, r.trapped = false;
  r.warps.assign(static_cast<size_t>((n + 31) / 32), WarpPending());
  r.ready.assign(static_cast<size_t>(n), 0), r.n_ready = 0;
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    const unsigned u = static_cast<unsigned>(i);
    f.linear = i;
    f.tid = uint3{u % block.x, u / block.x % block.y, u / (block.x * block.y)};
    wake(i);
  }
  poison_shared();
  for (int i = pick(); i >= 0; i = pick()) {
    resume(r.fibers[i]);
    if (r.trapped) break;
  }
  if (!r.trapped && r.exited != n) {
    r.message = deadlock_report();
    r.trapped = true;
  }
  if (r.trapped) r.pool_valid = false;  // the frames of the fibers are abandoned
  return !r.trapped;
}

bool valid_config(dim3 grid, dim3 block, size_t smem, std::string* why) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535u || grid.z < 1 || grid.z > 65535u)
    *why = "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
           ") outside [1, 2^31-1] x [1, 65535] x [1, 65535]";
  else if (threads < 1 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    *why = "block of " + std::to_string(threads) + " threads outside the device limits";
  else if (smem != 0)
    *why = "dynamic shared memory is not emulated";
  else
    return true;
  return false;
}

}  // namespace

const uint3& thread_idx() { return rt().cur->tid; }

void syncthreads() {
  Runtime& r = rt();
  Fiber& f = *r.cur;
  if (r.exited > 0)
    trap("__syncthreads in " + thread_name(f) + " after " + std::to_string(r.exited) +
         " thread(s) of the block returned (divergent barrier)");
  f.state = State::kBarrier;
  if (++r.at_barrier == r.nthreads) {
    r.at_barrier = 0;
    for (int i = 0; i < r.nthreads; ++i) wake(i);
  }
  yield();
}

uint64_t warp_collective(Coll kind, unsigned mask, uint64_t val, int arg, int width) {
  Runtime& r = rt();
  Fiber& f = *r.cur;
  const int lane = f.linear % 32, warp = f.linear / 32;
  auto where = [&]() { return std::string(coll_name(kind)) + " in " + thread_name(f); };
  if (!(mask >> lane & 1u)) trap(where() + ": mask " + hex(mask) + " does not include the calling lane");
  if (width < 1 || width > 32 || (width & (width - 1)))
    trap(where() + ": width " + std::to_string(width) + " is not a power of two in [1, 32]");
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const int t = warp * 32 + l;
    if (t >= r.nthreads || r.fibers[t].state == State::kDone)
      trap(where() + ": mask " + hex(mask) + " names lane " + std::to_string(l) +
           (t >= r.nthreads ? ", which does not exist" : ", which has returned"));
  }
  WarpPending& w = r.warps[warp];
  if (w.arrived == 0) {
    w.kind = kind, w.mask = mask, w.width = width;
  } else if (w.kind != kind || w.mask != mask || w.width != width) {
    trap(where() + " with mask " + hex(mask) + " meets " + coll_name(w.kind) + " with mask " + hex(w.mask) +
         " from other lanes of the warp");
  }
  w.val[lane] = val, w.arg[lane] = arg;
  w.arrived |= 1u << lane;
  f.state = State::kWarp;
  if (w.arrived == mask) complete(w, warp);
  yield();
  return f.result;
}

void run_grid(dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg) {
  Runtime& r = rt();
  std::string why;
  if (!valid_config(grid, block, smem, &why)) {
    r.last_error = cudaErrorInvalidConfiguration;
    r.message = "invalid launch configuration: " + why;
    return;
  }
  r.grids.push_back(grid), r.blocks.push_back(block);
  if (r.dry_run) return;
  r.rng.seed(r.seed);
  r.body = body, r.body_arg = arg;
  ::gridDim = grid, ::blockDim = block;
  const int n = static_cast<int>(block.x * block.y * block.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        ::blockIdx = uint3{x, y, z};
        if (!run_block(n, block)) {
          r.last_error = cudaErrorLaunchFailure;
          r.message = "block (" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + "): " +
                      r.message;
          return;
        }
      }
}

void set_order(Order order, uint64_t seed) { rt().order = order, rt().seed = seed; }
void set_dry_run(bool on) { rt().dry_run = on; }
const char* message() { return rt().message.c_str(); }
int launch_count() { return static_cast<int>(rt().grids.size()); }
dim3 launch_grid(int i) { return rt().grids.at(static_cast<size_t>(i)); }
dim3 launch_block(int i) { return rt().blocks.at(static_cast<size_t>(i)); }
void clear_launches() { rt().grids.clear(), rt().blocks.clear(); }

}  // namespace emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::rt().last_error;
  emu::rt().last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::rt().last_error; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
