// Runs the CUDA glue (csrc/token_stats_cuda_glue.cpp) on a CPU-only torch: tensors that claim to
// live on cuda:0 / cuda:1 wrap host memory, the few libc10_cuda / libcudart functions the glue
// calls are stubbed below, aten::empty gets a "CUDA" kernel that allocates host memory, and the
// kernels are the emulated ones (cuda_emu.cpp + the real .cu built as C++). One line per
// scenario on stdout: "ok NAME v v v ..." (the output tensor, %a floats) or "error NAME: MESSAGE".
#ifndef DUALRPO_GLUE_SOURCE
#define DUALRPO_GLUE_SOURCE "token_stats_cuda_glue.cpp"
#endif
#include DUALRPO_GLUE_SOURCE

#include <ATen/ops/from_blob.h>
#include <c10/core/impl/FakeGuardImpl.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

// --- stubs of the CUDA-only libraries: the glue asks for the current stream, nothing else -------
namespace c10::cuda {
CUDAStream getCurrentCUDAStream(DeviceIndex i) {
  return CUDAStream(CUDAStream::UNCHECKED, Stream(Stream::DEFAULT, Device(DeviceType::CUDA, i < 0 ? 0 : i)));
}
cudaStream_t CUDAStream::stream() const { return nullptr; }
}  // namespace c10::cuda
// Devices cuda:0 and cuda:1 for c10::DeviceGuard (torch's own test double).
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);

extern "C" const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

namespace {

at::Device dev(int i) { return i < 0 ? at::Device(at::kCPU) : at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(i)); }

// A tensor with a CUDA (or CPU) device tag over host memory; freed with the tensor.
at::Tensor host_tensor(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType t, int device) {
  int64_t span = 1;
  for (size_t k = 0; k < sizes.size(); ++k) span += (sizes[k] - 1) * strides[k];
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(span, 1)) * c10::elementSize(t);
  void* p = nullptr;
  if (posix_memalign(&p, 64, bytes) != 0) std::abort();
  memset(p, 0, bytes);
  return at::for_blob(p, sizes).strides(strides).deleter([](void* q) { std::free(q); })
      .options(at::TensorOptions().dtype(t)).target_device(dev(device)).make_tensor();
}

std::vector<int64_t> contiguous_strides(at::IntArrayRef sizes) {
  std::vector<int64_t> s(sizes.size(), 1);
  for (int k = static_cast<int>(sizes.size()) - 2; k >= 0; --k) s[k] = s[k + 1] * sizes[k + 1];
  return s;
}

at::Tensor host_tensor(at::IntArrayRef sizes, at::ScalarType t, int device = 0) {
  return host_tensor(sizes, contiguous_strides(sizes), t, device);
}

at::Tensor empty_cuda(at::IntArrayRef sizes, std::optional<at::ScalarType> dtype, std::optional<at::Layout>,
                      std::optional<at::Device> device, std::optional<bool>, std::optional<at::MemoryFormat>) {
  return host_tensor(sizes, dtype.value_or(at::kFloat), device && device->has_index() ? device->index() : 0);
}

float value(int64_t i, int64_t j, int salt) {  // deterministic logits, the same formula as the test
  return static_cast<float>(((i * 131 + j * 71 + salt * 17) % 97) - 48) / 8.0f;
}

void fill(at::Tensor& t, int salt) {  // t is [T, V] with stride(1) == 1
  const auto st = t.scalar_type();
  for (int64_t i = 0; i < t.size(0); ++i)
    for (int64_t j = 0; j < t.size(1); ++j) {
      const float v = value(i, j, salt);
      char* p = static_cast<char*>(t.data_ptr()) + (i * t.stride(0) + j * t.stride(1)) * t.element_size();
      if (st == at::kFloat) *reinterpret_cast<float*>(p) = v;
      else if (st == at::kBFloat16) *reinterpret_cast<c10::BFloat16*>(p) = c10::BFloat16(v);
      else if (st == at::kHalf) *reinterpret_cast<c10::Half*>(p) = c10::Half(v);
    }
}

at::Tensor labels_of(int64_t rows, int device = 0, at::ScalarType t = at::kLong) {
  at::Tensor y = host_tensor({rows}, t, device);
  for (int64_t i = 0; i < rows && t == at::kLong; ++i) y.data_ptr<int64_t>()[i] = i == 1 ? -100 : (i * 7) % 37;
  return y;
}

void run(const char* name, const std::function<at::Tensor()>& f) {
  try {
    const at::Tensor out = f();
    printf("ok %s", name);
    const at::Tensor o = out.scalar_type() == at::kFloat ? out : at::Tensor();
    for (int64_t i = 0; o.defined() && i < o.numel(); ++i) printf(" %a", static_cast<double>(o.data_ptr<float>()[i]));
    if (!o.defined()) {  // bf16 dz: widen
      for (int64_t i = 0; i < out.numel(); ++i)
        printf(" %a", static_cast<double>(static_cast<float>(static_cast<const c10::BFloat16*>(out.data_ptr())[i])));
    }
    printf("\n");
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    for (char& c : msg)
      if (c == '\n') c = ' ';
    printf("error %s: %s\n", name, msg.c_str());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, CUDA, m) { m.impl("empty.memory_format", &empty_cuda); }

int main() {
  using dualrpo::grad_logits_cuda;
  using dualrpo::partials_cuda;
  const int64_t T = 3, V = 40, n_real = 37;
  const double inv_t = 1.0 / 0.7;
  // logits with a row stride of 48 (16-byte rows: the vector path), ref contiguous
  at::Tensor z = host_tensor({T, V}, {48, 1}, at::kBFloat16, 0);
  at::Tensor r = host_tensor({T, V}, at::kBFloat16);
  fill(z, 0), fill(r, 1);
  const at::Tensor y = labels_of(T);
  const std::optional<at::Tensor> ref = r, none;
  at::Tensor stats = host_tensor({T, 5}, at::kFloat), grads = host_tensor({T, 4}, at::kFloat);
  for (int64_t i = 0; i < T; ++i) {
    float* s = stats.data_ptr<float>() + i * 5;
    float* g = grads.data_ptr<float>() + i * 4;
    s[0] = 6.0f / 0.7f, s[1] = 2.5f, s[2] = 1.0f, s[3] = 6.0f / 0.7f, s[4] = 0.1f;
    g[0] = i == 1 ? 0.f : 1.f, g[1] = 0.5f, g[2] = -0.25f, g[3] = 0.125f;
  }

  run("partials", [&] { return partials_cuda(z, y, ref, 3, n_real, 50, inv_t); });
  run("partials_noref", [&] { return partials_cuda(z, y, none, 3, n_real, 50, inv_t); });
  run("grad", [&] { return grad_logits_cuda(z, y, ref, stats, grads, 3, n_real, 50, inv_t); });

  run("labels_length", [&] { return partials_cuda(z, labels_of(T + 1), ref, 0, n_real, 50, inv_t); });
  run("labels_2d", [&] { return partials_cuda(z, host_tensor({T, 1}, at::kLong), ref, 0, n_real, 50, inv_t); });
  run("labels_int32", [&] { return partials_cuda(z, labels_of(T, 0, at::kInt), ref, 0, n_real, 50, inv_t); });
  run("labels_on_cpu", [&] { return partials_cuda(z, labels_of(T, -1), ref, 0, n_real, 50, inv_t); });
  run("labels_on_cuda1", [&] { return partials_cuda(z, labels_of(T, 1), ref, 0, n_real, 50, inv_t); });
  run("logits_3d", [&] { return partials_cuda(host_tensor({T, V, 1}, at::kFloat), y, none, 0, n_real, 50, inv_t); });
  run("logits_on_cpu", [&] { return partials_cuda(host_tensor({T, V}, at::kFloat, -1), labels_of(T, -1), none, 0, n_real, 50, inv_t); });
  run("logits_float64", [&] { return partials_cuda(host_tensor({T, V}, at::kDouble), y, none, 0, n_real, 50, inv_t); });
  run("n_real_too_big", [&] { return partials_cuda(z, y, ref, 0, V + 1, 50, inv_t); });
  run("n_real_negative", [&] { return partials_cuda(z, y, ref, 0, -1, 50, inv_t); });
  run("vocab_size_zero", [&] { return partials_cuda(z, y, ref, 0, n_real, 0, inv_t); });
  run("inv_t_zero", [&] { return partials_cuda(z, y, ref, 0, n_real, 50, 0.0); });
  run("ref_shape", [&] { return partials_cuda(z, y, host_tensor({T, V - 1}, at::kBFloat16), 0, n_real, 50, inv_t); });
  run("ref_dtype", [&] { return partials_cuda(z, y, host_tensor({T, V}, at::kFloat), 0, n_real, 50, inv_t); });
  run("ref_on_cuda1", [&] { return partials_cuda(z, y, host_tensor({T, V}, at::kBFloat16, 1), 0, n_real, 50, inv_t); });
  run("grad_stats_rows", [&] { return grad_logits_cuda(z, y, ref, host_tensor({T + 1, 5}, at::kFloat), grads, 0, n_real, 50, inv_t); });
  run("grad_stats_cols", [&] { return grad_logits_cuda(z, y, ref, host_tensor({T, 3}, at::kFloat), grads, 0, n_real, 50, inv_t); });
  run("grad_grads_shape", [&] { return grad_logits_cuda(z, y, ref, stats, host_tensor({T, 3}, at::kFloat), 0, n_real, 50, inv_t); });
  run("grad_stats_on_cpu", [&] { return grad_logits_cuda(z, y, ref, host_tensor({T, 5}, at::kFloat, -1), grads, 0, n_real, 50, inv_t); });
  run("grad_labels_length", [&] { return grad_logits_cuda(z, labels_of(T - 1), ref, stats, grads, 0, n_real, 50, inv_t); });
  return 0;
}
