// Host driver of the CUDA token-statistics kernel under the CPU emulator (cuda_emu.h): it runs the
// launch records of a case file through the C launchers of csrc/token_stats_cuda.cu, which the
// tests compile unchanged as C++ (g++ -x c++, the emulated CUDA headers first on the include path)
// and link with this file and cuda_emu.cpp. A mutant of the kernel is just another object file.
//
//   token_stats_emu CASES OUT
//
// CASES: "TSEMU1\0\0", int64 count, int64 order (0 forward, 1 reverse, 2 random), int64 seed, then
// per record 16 int64 (kind, dtype, rows, n_cols, ld, offset, n_real, vocab_start, vocab_size,
// has_ref, ks, ldd, 0...), one float64 inv_t, and the payload: z [, z_ref] (offset + (rows - 1) *
// ld + n_cols elements of dtype each), labels int64[rows] and, for kind 1, stats float32[rows, ks]
// and grads float32[rows, 4]. Kinds: 0 partials, 1 grad, 2/3 the same as dry runs (launch
// configuration only: rows may be huge, nothing is read), 4 conversions (n_cols float32 values).
// OUT, per record: int64 error, int64 length + message, int64 launches + (grid.x, block.x) pairs,
// int64 bytes + payload (partials [rows, K] float32; the dz buffer from `offset` on, every
// element the kernel should write, pre-filled with 0xFF so an unwritten one reads as nan).
//
// Buffers are sized exactly (posix_memalign), so an address sanitizer build sees any overrun.
#include "cuda_emu.h"
#include "token_stats_cuda.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

struct Reader {
  FILE* f;
  template <typename T>
  T get() {
    T v;
    if (fread(&v, sizeof v, 1, f) != 1) { fprintf(stderr, "token_stats_emu: truncated case file\n"); std::exit(2); }
    return v;
  }
  void bytes(void* p, size_t n) {
    if (n && fread(p, 1, n, f) != n) { fprintf(stderr, "token_stats_emu: truncated case file\n"); std::exit(2); }
  }
};

struct Writer {
  FILE* f;
  void i64(int64_t v) { fwrite(&v, sizeof v, 1, f); }
  void blob(const void* p, size_t n) { i64(static_cast<int64_t>(n)); if (n) fwrite(p, 1, n, f); }
};

struct Buffer {  // exactly n bytes, 16-byte aligned
  void* p = nullptr;
  explicit Buffer(size_t n) {
    if (n && posix_memalign(&p, 16, n) != 0) { fprintf(stderr, "token_stats_emu: out of memory\n"); std::exit(2); }
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  char* c() const { return static_cast<char*>(p); }
};

size_t elem_size(int64_t dtype) { return dtype == DUALRPO_F32 ? 4 : 2; }

void conversions(Reader& in, Writer& out, int64_t n) {
  std::vector<float> x(static_cast<size_t>(n));
  in.bytes(x.data(), x.size() * 4);
  std::vector<uint16_t> bf(x.size()), hf(x.size());
  std::vector<float> back(2 * x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    bf[i] = __float2bfloat16_rn(x[i]).__x;
    hf[i] = __float2half_rn(x[i]).__x;
    back[i] = __bfloat162float(__nv_bfloat16{bf[i]});
    back[x.size() + i] = __half2float(__half{hf[i]});
  }
  out.i64(0), out.i64(0), out.i64(0);
  std::vector<char> payload(bf.size() * 4 + back.size() * 4);
  memcpy(payload.data(), bf.data(), bf.size() * 2);
  memcpy(payload.data() + bf.size() * 2, hf.data(), hf.size() * 2);
  memcpy(payload.data() + bf.size() * 4, back.data(), back.size() * 4);
  out.blob(payload.data(), payload.size());
}

void run_record(Reader& in, Writer& out) {
  int64_t h[16];
  for (auto& v : h) v = in.get<int64_t>();
  const double inv_t = in.get<double>();
  const int64_t kind = h[0], dtype = h[1], rows = h[2], n_cols = h[3], ld = h[4], off = h[5];
  const int64_t n_real = h[6], vstart = h[7], vsize = h[8], has_ref = h[9], ks = h[10], ldd = h[11];
  if (kind == 4) return conversions(in, out, n_cols);
  emu::set_dry_run(kind >= 2);
  emu::clear_launches();
  const size_t es = elem_size(dtype);
  int err = 0;
  std::vector<char> payload;
  if (kind >= 2) {  // only the launch configuration matters: fake, aligned addresses
    const auto fake = reinterpret_cast<void*>(uintptr_t{1} << 40);
    err = kind == 2 ? dualrpo_cuda_partials(fake, has_ref ? fake : nullptr, static_cast<int>(dtype),
                                            static_cast<const int64_t*>(fake), rows, ld, ld, n_real, vstart,
                                            vsize, static_cast<float>(inv_t), static_cast<float*>(fake), nullptr)
                    : dualrpo_cuda_grad(fake, has_ref ? fake : nullptr, fake, static_cast<int>(dtype),
                                        static_cast<const int64_t*>(fake), rows, n_cols, ld, ld, ldd, n_real,
                                        vstart, vsize, static_cast<float>(inv_t), static_cast<const float*>(fake),
                                        ks, static_cast<const float*>(fake), nullptr);
  } else {
    const size_t nz = rows > 0 ? static_cast<size_t>(off + (rows - 1) * ld + n_cols) : 0;
    Buffer z(nz * es), zr(has_ref ? nz * es : 0), labels(static_cast<size_t>(rows) * 8);
    in.bytes(z.c(), nz * es);
    if (has_ref) in.bytes(zr.c(), nz * es);
    in.bytes(labels.c(), static_cast<size_t>(rows) * 8);
    const void* zp = z.c() + off * es;
    const void* rp = has_ref ? zr.c() + off * es : nullptr;
    const auto* lab = reinterpret_cast<const int64_t*>(labels.c());
    if (kind == 0) {
      const size_t k = has_ref ? 9 : 6, n = static_cast<size_t>(rows) * k * 4;
      Buffer o(n);
      if (n) memset(o.c(), 0xff, n);
      err = dualrpo_cuda_partials(zp, rp, static_cast<int>(dtype), lab, rows, ld, ld, n_real, vstart, vsize,
                                  static_cast<float>(inv_t), reinterpret_cast<float*>(o.c()), nullptr);
      payload.assign(o.c(), o.c() + n);
    } else {
      Buffer st(static_cast<size_t>(rows * ks) * 4), gr(static_cast<size_t>(rows) * 16);
      in.bytes(st.c(), static_cast<size_t>(rows * ks) * 4);
      in.bytes(gr.c(), static_cast<size_t>(rows) * 16);
      const size_t nd = rows > 0 ? static_cast<size_t>(off + (rows - 1) * ldd + n_cols) : 0;
      Buffer dz(nd * es);
      if (nd) memset(dz.c(), 0xff, nd * es);
      err = dualrpo_cuda_grad(zp, rp, dz.c() + off * es, static_cast<int>(dtype), lab, rows, n_cols, ld, ld, ldd,
                              n_real, vstart, vsize, static_cast<float>(inv_t),
                              reinterpret_cast<const float*>(st.c()), ks, reinterpret_cast<const float*>(gr.c()),
                              nullptr);
      if (nd) payload.assign(dz.c() + off * es, dz.c() + nd * es);
    }
  }
  out.i64(err);
  const std::string msg = err ? emu::message() : "";
  out.blob(msg.data(), msg.size());
  out.i64(emu::launch_count());
  for (int i = 0; i < emu::launch_count(); ++i) out.i64(emu::launch_grid(i).x), out.i64(emu::launch_block(i).x);
  out.blob(payload.data(), payload.size());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) { fprintf(stderr, "usage: %s CASES OUT\n", argv[0]); return 2; }
  FILE* fi = fopen(argv[1], "rb");
  FILE* fo = fopen(argv[2], "wb");
  if (!fi || !fo) { fprintf(stderr, "token_stats_emu: cannot open %s or %s\n", argv[1], argv[2]); return 2; }
  Reader in{fi};
  Writer out{fo};
  char magic[8];
  in.bytes(magic, 8);
  if (memcmp(magic, "TSEMU1\0\0", 8) != 0) { fprintf(stderr, "token_stats_emu: bad magic\n"); return 2; }
  const int64_t count = in.get<int64_t>();
  const auto order = static_cast<emu::Order>(in.get<int64_t>());
  emu::set_order(order, static_cast<uint64_t>(in.get<int64_t>()));
  for (int64_t i = 0; i < count; ++i) run_record(in, out);
  fclose(fi);
  return fclose(fo) == 0 ? 0 : 2;
}
