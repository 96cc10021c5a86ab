// torch operators dualrpo::head_partials / dualrpo::head_grad: the output layer fused with the token
// statistics, in token chunks, so a chunk's logits [rows, V_local] exist only inside one loop turn.
//
// Per chunk: logits = hidden_c @ weight^T by an ATen GEMM (MKL/oneDNN on CPU, cuBLAS on CUDA), then
// the statistics kernel of token_stats.cpp / token_stats_cuda.cu through the dispatcher, so one body
// serves both devices. The cross-shard merge (one all-gather of the [T, 6|9] partials of every chunk)
// and the autograd function live in dualrpo_mcore/ops/fused_head.py.
//
// Only the shard's real vocabulary rows (weight[:n_real]) enter the GEMMs: padding rows would only
// produce columns that the statistics ignore, and their weight gradient is exactly zero.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace dualrpo {
namespace {

constexpr const char* kOp = "dualrpo::fused_head";

using PartialsFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                              int64_t, int64_t, double);
using GradFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, double);

// Through the dispatcher, so a CUDA tensor reaches the CUDA kernel and a CPU tensor the C++ one.
const c10::TypedOperatorHandle<PartialsFn>& partials_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dualrpo::partials", "").typed<PartialsFn>();
  return op;
}

const c10::TypedOperatorHandle<GradFn>& grad_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dualrpo::grad_logits", "").typed<GradFn>();
  return op;
}

void check_pair(const char* what, const at::Tensor& h, const at::Tensor& w, int64_t rows, int64_t v_local) {
  TORCH_CHECK(h.dim() == 2 && h.size(0) == rows, kOp, ": ", what, "hidden must be [T = ", rows, ", H], got shape ",
              h.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == v_local && w.size(1) == h.size(1), kOp, ": ", what,
              "weight must be [V_local = ", v_local, ", H = ", h.size(1), "], got shape ", w.sizes());
  TORCH_CHECK(h.scalar_type() == w.scalar_type(), kOp, ": ", what, "hidden (", h.scalar_type(), ") and ", what,
              "weight (", w.scalar_type(), ") must have one dtype");
  TORCH_CHECK(h.device() == w.device(), kOp, ": ", what, "hidden is on ", h.device(), " but ", what, "weight on ",
              w.device());
}

// Everything the kernels do not check themselves (they see only the chunk's logits).
void check_inputs(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels,
                  const std::optional<at::Tensor>& rh, const std::optional<at::Tensor>& rw, int64_t n_real,
                  int64_t chunk_rows) {
  TORCH_CHECK(h.dim() == 2, kOp, ": hidden must be [T, H], got shape ", h.sizes());
  check_pair("", h, w, h.size(0), w.size(0));
  TORCH_CHECK(rh.has_value() == rw.has_value(), kOp, ": give both ref_hidden and ref_weight, or neither");
  if (rh.has_value()) {
    check_pair("ref_", *rh, *rw, h.size(0), w.size(0));
    TORCH_CHECK(rh->scalar_type() == h.scalar_type() && rh->device() == h.device(), kOp,
                ": the reference must have the dtype and device of the policy (", h.scalar_type(), ", ",
                h.device(), "), got ", rh->scalar_type(), ", ", rh->device());
  }
  TORCH_CHECK(labels.device() == h.device(), kOp, ": labels are on ", labels.device(), " but hidden on ",
              h.device());
  TORCH_CHECK(n_real >= 0 && n_real <= w.size(0), kOp, ": n_real = ", n_real, " outside [0, V_local = ",
              w.size(0), "]");
  TORCH_CHECK(chunk_rows > 0, kOp, ": chunk_rows must be > 0, got ", chunk_rows);
}

struct Chunk {
  at::Tensor logits;
  std::optional<at::Tensor> ref;
};

// The chunk's logits (and the reference's): the only [rows, V_local] tensors the op ever holds.
Chunk chunk_logits(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& rh,
                   const std::optional<at::Tensor>& rw, int64_t lo, int64_t rows) {
  Chunk c;
  c.logits = at::mm(h.narrow(0, lo, rows), w.t());
  if (rh.has_value()) c.ref = at::mm(rh->narrow(0, lo, rows), rw->t());
  return c;
}

at::Tensor head_partials(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                         const std::optional<at::Tensor>& ref_hidden, const std::optional<at::Tensor>& ref_weight,
                         int64_t vocab_start, int64_t n_real, int64_t vocab_size, double inv_t,
                         int64_t chunk_rows) {
  check_inputs(hidden, weight, labels, ref_hidden, ref_weight, n_real, chunk_rows);
  const int64_t rows = hidden.size(0);
  const auto h = hidden.contiguous();
  const auto w = weight.narrow(0, 0, n_real);
  std::optional<at::Tensor> rh, rw;
  if (ref_hidden.has_value()) rh = ref_hidden->contiguous(), rw = ref_weight->narrow(0, 0, n_real);
  const auto lab = labels.contiguous();
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({rows, rh ? 9 : 6}, hidden.options().dtype(acc));
  for (int64_t lo = 0; lo < rows; lo += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - lo);
    Chunk c = chunk_logits(h, w, rh, rw, lo, n);
    out.narrow(0, lo, n).copy_(partials_op().call(c.logits, lab.narrow(0, lo, n), c.ref, vocab_start, n_real,
                                                  vocab_size, inv_t));
  }
  return out;
}

// dW += dz^T h_c. With a half-precision weight and several chunks the sum runs in an fp32 buffer (one
// rounding per chunk product instead of one per running sum); each product is formed on a block of
// vocabulary rows no larger than the chunk's logits, so the temporary stays inside the memory budget.
void accumulate_dw(at::Tensor& dw, const at::Tensor& dz, const at::Tensor& h_c) {
  if (dw.scalar_type() == dz.scalar_type()) {
    dw.addmm_(dz.t(), h_c);
    return;
  }
  const int64_t v = dz.size(1), hdim = std::max<int64_t>(1, h_c.size(1));
  const int64_t block = std::max<int64_t>(1, dz.size(0) * v / hdim);
  for (int64_t v0 = 0; v0 < v; v0 += block) {
    const int64_t nb = std::min(block, v - v0);
    dw.narrow(0, v0, nb).add_(at::mm(dz.narrow(1, v0, nb).t(), h_c));
  }
}

std::tuple<at::Tensor, at::Tensor> head_grad(const at::Tensor& hidden, const at::Tensor& weight,
                                             const at::Tensor& labels, const std::optional<at::Tensor>& ref_hidden,
                                             const std::optional<at::Tensor>& ref_weight, const at::Tensor& stats,
                                             const at::Tensor& grads, int64_t vocab_start, int64_t n_real,
                                             int64_t vocab_size, double inv_t, int64_t chunk_rows, bool need_dw) {
  check_inputs(hidden, weight, labels, ref_hidden, ref_weight, n_real, chunk_rows);
  const int64_t rows = hidden.size(0);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && grads.dim() == 2 && grads.size(0) == rows, kOp,
              ": stats and grads must have T = ", rows, " rows, got ", stats.sizes(), " and ", grads.sizes());
  const auto h = hidden.contiguous();
  const auto w = weight.narrow(0, 0, n_real);
  std::optional<at::Tensor> rh, rw;
  if (ref_hidden.has_value()) rh = ref_hidden->contiguous(), rw = ref_weight->narrow(0, 0, n_real);
  const auto lab = labels.contiguous();
  // One chunk: a single GEMM writes dW, rounded once, as the unfused layer's; no fp32 buffer needed.
  const bool half = (weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf) && rows > chunk_rows;
  at::Tensor dh = at::empty_like(h);
  // A frozen weight (need_dw false) skips the third GEMM; an empty tensor stands for "no gradient".
  at::Tensor dw_full = need_dw ? at::zeros(weight.sizes(), weight.options().dtype(half ? at::kFloat : weight.scalar_type()))
                               : at::empty({0}, weight.options());
  at::Tensor dw = need_dw ? dw_full.narrow(0, 0, n_real) : dw_full;  // padding rows keep a zero gradient
  for (int64_t lo = 0; lo < rows; lo += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - lo);
    Chunk c = chunk_logits(h, w, rh, rw, lo, n);
    const at::Tensor dz = grad_op().call(c.logits, lab.narrow(0, lo, n), c.ref, stats.narrow(0, lo, n),
                                         grads.narrow(0, lo, n), vocab_start, n_real, vocab_size, inv_t);
    c = Chunk{};  // the logits go before dz's two GEMMs need their room
    auto dh_c = dh.narrow(0, lo, n);
    at::mm_out(dh_c, dz, w);
    if (need_dw) accumulate_dw(dw, dz, h.narrow(0, lo, n));
  }
  return {dh, half && need_dw ? dw_full.to(weight.scalar_type()) : dw_full};
}

}  // namespace
}  // namespace dualrpo

TORCH_LIBRARY_FRAGMENT(dualrpo, m) {
  m.def("head_partials(Tensor hidden, Tensor weight, Tensor labels, Tensor? ref_hidden, Tensor? ref_weight, "
        "int vocab_start, int n_real, int vocab_size, float inv_t, int chunk_rows) -> Tensor");
  m.def("head_grad(Tensor hidden, Tensor weight, Tensor labels, Tensor? ref_hidden, Tensor? ref_weight, "
        "Tensor stats, Tensor grads, int vocab_start, int n_real, int vocab_size, float inv_t, "
        "int chunk_rows, bool need_dw=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dualrpo, CPU, m) {
  m.impl("head_partials", &dualrpo::head_partials);
  m.impl("head_grad", &dualrpo::head_grad);
}

#ifdef DUALRPO_WITH_CUDA
// The same body: at::mm is cuBLAS on CUDA tensors and the dispatcher routes the statistics to
// token_stats_cuda_glue.cpp. The CUDA kernel reads fp32/bf16/fp16 (fp64 takes the torch path).
TORCH_LIBRARY_IMPL(dualrpo, CUDA, m) {
  m.impl("head_partials", &dualrpo::head_partials);
  m.impl("head_grad", &dualrpo::head_grad);
}
#endif
