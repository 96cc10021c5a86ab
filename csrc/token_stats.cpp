// torch operators dualrpo::partials / dualrpo::grad_logits (CPU kernels here; CUDA kernels in
// token_stats_cuda_glue.cpp when built with CUDA) and the tiny Python module dualrpo_mcore._C.
// The autograd function, the all-gather and the merge live in dualrpo_mcore/ops/token_stats.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "token_stats_checks.h"
#include "token_stats_cpu.h"

namespace dualrpo {
namespace {

constexpr int64_t kIgnore = -100;

// Rows are independent: split them over threads. Small rows get a larger grain so that a
// thread's chunk is worth the fork.
int64_t grain_rows(int64_t n_cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n_cols)); }

// Column stride 1 is what the kernel reads; any row stride is fine.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// Shape, dtype, device and range checks are shared with the CUDA glue; only the CPU can afford to
// look at the label values (on a GPU that is a host sync per call).
void check_inputs(const at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& ref,
                  int64_t vocab_start, int64_t n_real, int64_t vocab_size, double inv_t) {
  check_partials_args("dualrpo::token_stats", z, labels, ref, vocab_start, n_real, vocab_size, inv_t);
  const auto lab = labels.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.size(0); ++i) {
    TORCH_CHECK(y[i] == kIgnore || (y[i] >= 0 && y[i] < vocab_size), "dualrpo::token_stats: label ",
                y[i], " at row ", i, " is outside [0, vocab_size=", vocab_size, ") and is not -100");
  }
}

template <typename S, typename A>
void partials_impl(const at::Tensor& z, const at::Tensor& labels, const at::Tensor* ref,
                   int64_t vocab_start, int64_t n_real, A inv_t, at::Tensor& out) {
  const S* zp = z.data_ptr<S>();
  const S* rp = ref ? ref->data_ptr<S>() : nullptr;
  const int64_t ld = z.stride(0), ldr = ref ? ref->stride(0) : 0, k = out.size(1);
  const int64_t* y = labels.data_ptr<int64_t>();
  A* o = out.data_ptr<A>();
  at::parallel_for(0, z.size(0), grain_rows(z.size(1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t local = y[i] == kIgnore ? -1 : y[i] - vocab_start;  // outside [0, n): not ours
      if (rp)
        row_partials<true>(zp + i * ld, rp + i * ldr, n_real, local, inv_t, o + i * k);
      else
        row_partials<false, S, A>(zp + i * ld, nullptr, n_real, local, inv_t, o + i * k);
    }
  });
}

template <typename S, typename A>
void grad_impl(const at::Tensor& z, const at::Tensor& labels, const at::Tensor* ref,
               const at::Tensor& stats, const at::Tensor& grads, int64_t vocab_start, int64_t n_real,
               int64_t vocab_size, A inv_t, at::Tensor& dz) {
  const S* zp = z.data_ptr<S>();
  const S* rp = ref ? ref->data_ptr<S>() : nullptr;
  S* dp = dz.data_ptr<S>();
  const int64_t ld = z.stride(0), ldr = ref ? ref->stride(0) : 0, ldd = dz.stride(0);
  const int64_t ks = stats.size(1), kg = grads.size(1), n_cols = z.size(1);
  const int64_t* y = labels.data_ptr<int64_t>();
  const A* st = stats.data_ptr<A>();
  const A* gr = grads.data_ptr<A>();
  const A inv_v = A(1) / A(vocab_size);
  at::parallel_for(0, z.size(0), grain_rows(n_cols), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t local = y[i] == kIgnore ? -1 : y[i] - vocab_start;
      if (rp)
        row_grad<true>(zp + i * ld, rp + i * ldr, dp + i * ldd, n_real, n_cols, local, st + i * ks,
                       gr + i * kg, inv_t, inv_v);
      else
        row_grad<false, S, A>(zp + i * ld, nullptr, dp + i * ldd, n_real, n_cols, local,
                              st + i * ks, gr + i * kg, inv_t, inv_v);
    }
  });
}

// Calls f.template operator()<S, A>() for the logits dtype S and its accumulation type A.
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f.template operator()<float, float>();
    case at::kBFloat16: return f.template operator()<c10::BFloat16, float>();
    case at::kHalf: return f.template operator()<c10::Half, float>();
    case at::kDouble: return f.template operator()<double, double>();
    default: TORCH_CHECK(false, "dualrpo::token_stats: unsupported logits dtype ", t);
  }
}

at::Tensor partials_cpu(const at::Tensor& logits, const at::Tensor& labels,
                        const std::optional<at::Tensor>& ref, int64_t vocab_start, int64_t n_real,
                        int64_t vocab_size, double inv_t) {
  check_inputs(logits, labels, ref, vocab_start, n_real, vocab_size, inv_t);
  const auto z = rows_contiguous(logits);
  const auto lab = labels.contiguous();
  std::optional<at::Tensor> r;
  if (ref.has_value()) r = rows_contiguous(*ref);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({z.size(0), r ? 9 : 6}, z.options().dtype(acc));
  dispatch(z.scalar_type(), [&]<typename S, typename A>() {
    partials_impl<S, A>(z, lab, r ? &*r : nullptr, vocab_start, n_real, A(inv_t), out);
  });
  return out;
}

at::Tensor grad_logits_cpu(const at::Tensor& logits, const at::Tensor& labels,
                           const std::optional<at::Tensor>& ref, const at::Tensor& stats,
                           const at::Tensor& grads, int64_t vocab_start, int64_t n_real,
                           int64_t vocab_size, double inv_t) {
  check_inputs(logits, labels, ref, vocab_start, n_real, vocab_size, inv_t);
  check_grad_args("dualrpo::grad_logits", logits, ref, stats, grads);
  const auto z = rows_contiguous(logits);
  const auto lab = labels.contiguous();
  std::optional<at::Tensor> r;
  if (ref.has_value()) r = rows_contiguous(*ref);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto st = stats.to(acc).contiguous();
  const auto gr = grads.to(acc).contiguous();
  at::Tensor dz = at::empty(z.sizes(), z.options());
  dispatch(z.scalar_type(), [&]<typename S, typename A>() {
    grad_impl<S, A>(z, lab, r ? &*r : nullptr, st, gr, vocab_start, n_real, vocab_size, A(inv_t), dz);
  });
  return dz;
}

}  // namespace

#ifdef DUALRPO_WITH_CUDA
bool cuda_built() { return true; }
#else
bool cuda_built() { return false; }
#endif

}  // namespace dualrpo

TORCH_LIBRARY(dualrpo, m) {
  m.def("partials(Tensor logits, Tensor labels, Tensor? ref, int vocab_start, int n_real, "
        "int vocab_size, float inv_t) -> Tensor");
  m.def("grad_logits(Tensor logits, Tensor labels, Tensor? ref, Tensor stats, Tensor grads, "
        "int vocab_start, int n_real, int vocab_size, float inv_t) -> Tensor");
}

TORCH_LIBRARY_IMPL(dualrpo, CPU, m) {
  m.impl("partials", &dualrpo::partials_cpu);
  m.impl("grad_logits", &dualrpo::grad_logits_cpu);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "dualrpo_mcore fused token statistics (registers torch.ops.dualrpo.*)";
  m.def("has_cuda", &dualrpo::cuda_built, "whether the CUDA kernels were compiled in");
  m.def("build_info", []() {
    std::string s = "cpu";
#ifdef __AVX512F__
    s += "+avx512f";
#elif defined(__AVX2__)
    s += "+avx2";
#endif
    if (dualrpo::cuda_built()) s += ",cuda";
    return s;
  });
}
