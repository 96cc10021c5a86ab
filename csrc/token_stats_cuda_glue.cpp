// CUDA implementations of torch.ops.dualrpo.partials / grad_logits: tensor checks, then the C
// launchers of token_stats_cuda.cu on the current stream. Compiled only in a CUDA torch build
// (DUALRPO_WITH_CUDA); float64 logits on CUDA are routed to the torch fallback in Python.
// Only c10 headers and the generic DeviceGuard (no ATen/cuda, no CUDAGuard): the tests compile this
// file without the CUDA math libraries and run it on a CPU-only torch against two stubs
// (csrc/emu/cuda_glue_driver.cpp); with a CUDA torch the DeviceGuard is torch's CUDA guard.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>

#include "token_stats_checks.h"
#include "token_stats_cuda.h"

namespace dualrpo {
namespace {

constexpr const char* kOp = "dualrpo::token_stats (CUDA)";

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DUALRPO_F32;
    case at::kBFloat16: return DUALRPO_BF16;
    case at::kHalf: return DUALRPO_F16;
    default: TORCH_CHECK(false, kOp, ": logits dtype ", t, " is not supported (float32, bfloat16, float16)");
  }
  return -1;
}

// The kernels read columns with stride 1 and take any row stride.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

void check(const at::Tensor& z, const at::Tensor& labels, const std::optional<at::Tensor>& ref,
           int64_t vocab_start, int64_t n_real, int64_t vocab_size, double inv_t) {
  TORCH_CHECK(z.is_cuda(), kOp, ": logits must be a CUDA tensor, got one on ", z.device());
  check_partials_args(kOp, z, labels, ref, vocab_start, n_real, vocab_size, inv_t);
  dtype_code(z.scalar_type());
}

cudaStream_t current_stream(const at::Tensor& z) {
  return c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
}

at::Tensor partials_cuda(const at::Tensor& logits, const at::Tensor& labels,
                         const std::optional<at::Tensor>& ref, int64_t vocab_start, int64_t n_real,
                         int64_t vocab_size, double inv_t) {
  check(logits, labels, ref, vocab_start, n_real, vocab_size, inv_t);
  const c10::DeviceGuard guard(logits.device());
  const auto z = rows_contiguous(logits);
  const auto lab = labels.contiguous();
  std::optional<at::Tensor> r;
  if (ref) r = rows_contiguous(*ref);
  at::Tensor out = at::empty({z.size(0), r ? 9 : 6}, z.options().dtype(at::kFloat));
  const int err = dualrpo_cuda_partials(z.data_ptr(), r ? r->data_ptr() : nullptr, dtype_code(z.scalar_type()),
                                        lab.data_ptr<int64_t>(), z.size(0), z.stride(0), r ? r->stride(0) : 0,
                                        n_real, vocab_start, vocab_size, static_cast<float>(inv_t),
                                        out.data_ptr<float>(), current_stream(z));
  TORCH_CHECK(err == 0, "dualrpo::partials CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

at::Tensor grad_logits_cuda(const at::Tensor& logits, const at::Tensor& labels,
                            const std::optional<at::Tensor>& ref, const at::Tensor& stats,
                            const at::Tensor& grads, int64_t vocab_start, int64_t n_real,
                            int64_t vocab_size, double inv_t) {
  check(logits, labels, ref, vocab_start, n_real, vocab_size, inv_t);
  check_grad_args(kOp, logits, ref, stats, grads);
  const c10::DeviceGuard guard(logits.device());
  const auto z = rows_contiguous(logits);
  const auto lab = labels.contiguous();
  std::optional<at::Tensor> r;
  if (ref) r = rows_contiguous(*ref);
  const auto st = stats.to(at::kFloat).contiguous();
  const auto gr = grads.to(at::kFloat).contiguous();
  at::Tensor dz = at::empty(z.sizes(), z.options());
  const int err = dualrpo_cuda_grad(z.data_ptr(), r ? r->data_ptr() : nullptr, dz.data_ptr(),
                                    dtype_code(z.scalar_type()), lab.data_ptr<int64_t>(), z.size(0), z.size(1),
                                    z.stride(0), r ? r->stride(0) : 0, dz.stride(0), n_real, vocab_start,
                                    vocab_size, static_cast<float>(inv_t), st.data_ptr<float>(), st.size(1),
                                    gr.data_ptr<float>(), current_stream(z));
  TORCH_CHECK(err == 0, "dualrpo::grad_logits CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return dz;
}

}  // namespace
}  // namespace dualrpo

TORCH_LIBRARY_IMPL(dualrpo, CUDA, m) {
  m.impl("partials", &dualrpo::partials_cuda);
  m.impl("grad_logits", &dualrpo::grad_logits_cuda);
}
