// Argument checks of torch.ops.dualrpo.partials / grad_logits, shared by the CPU operators
// (token_stats.cpp) and the CUDA glue (token_stats_cuda_glue.cpp): both backends reject the same
// inputs with the same words. The kernels trust what passes here (row counts, column bounds).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace dualrpo {

inline void check_partials_args(const char* op, const at::Tensor& z, const at::Tensor& labels,
                                const std::optional<at::Tensor>& ref, int64_t vocab_start,
                                int64_t n_real, int64_t vocab_size, double inv_t) {
  TORCH_CHECK(z.dim() == 2, op, ": logits must be [T, V_local], got shape ", z.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0), op, ": labels must be [T] with T = ",
              z.size(0), " (the rows of logits), got shape ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == z.device(), op, ": labels are on ", labels.device(), " but logits on ",
              z.device());
  TORCH_CHECK(n_real >= 0 && n_real <= z.size(1), op, ": n_real = ", n_real, " outside [0, V_local = ",
              z.size(1), "]");
  TORCH_CHECK(vocab_start >= 0 && vocab_size > 0, op, ": need vocab_start >= 0 and vocab_size > 0, got ",
              vocab_start, " and ", vocab_size);
  TORCH_CHECK(inv_t > 0 && std::isfinite(inv_t), op, ": inv_t = 1 / temperature must be finite and > 0, got ",
              inv_t);
  if (ref.has_value()) {
    TORCH_CHECK(ref->sizes() == z.sizes(), op, ": ref_logits must have the shape of logits ", z.sizes(),
                ", got ", ref->sizes());
    TORCH_CHECK(ref->scalar_type() == z.scalar_type(), op, ": ref_logits must have the dtype of logits (",
                z.scalar_type(), "), got ", ref->scalar_type());
    TORCH_CHECK(ref->device() == z.device(), op, ": ref_logits are on ", ref->device(), " but logits on ",
                z.device());
  }
}

// stats [T, >= 3] (>= 5 with ref) and grads [T, 4], floating point, on the device of logits.
inline void check_grad_args(const char* op, const at::Tensor& z, const std::optional<at::Tensor>& ref,
                            const at::Tensor& stats, const at::Tensor& grads) {
  const int64_t ks = ref.has_value() ? 5 : 3;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == z.size(0) && stats.size(1) >= ks, op,
              ": saved stats must be [T = ", z.size(0), ", >= ", ks, "], got shape ", stats.sizes());
  TORCH_CHECK(grads.dim() == 2 && grads.size(0) == z.size(0) && grads.size(1) == 4, op,
              ": grads must be [T = ", z.size(0), ", 4], got shape ", grads.sizes());
  TORCH_CHECK(at::isFloatingType(stats.scalar_type()) && at::isFloatingType(grads.scalar_type()), op,
              ": stats and grads must be floating point, got ", stats.scalar_type(), " and ", grads.scalar_type());
  TORCH_CHECK(stats.device() == z.device() && grads.device() == z.device(), op, ": stats (", stats.device(),
              ") and grads (", grads.device(), ") must be on the device of logits (", z.device(), ")");
}

}  // namespace dualrpo
