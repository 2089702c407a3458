// Argument checks shared by the CPU kernel (wkv_cpu.cpp) and the CUDA binding
// (wkv_cuda_binding.cpp): one place for the rules and their error messages.
#pragma once

#include <torch/extension.h>

#include <initializer_list>

#include "wkv_recurrence.h"

namespace wkv {

// w, u: (C,); k, v: (B, T, C); all on one device of type `device`, one dtype
// (float32 or float64), contiguous.  `op` prefixes the messages ("wkv_cpu", "wkv_cuda").
inline void check_inputs(const char* op, c10::DeviceType device, const at::Tensor& w,
                         const at::Tensor& u, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.dim() == 3, op, ": k must be (B, T, C), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v ", v.sizes(), " != k ", k.sizes());
  const int64_t C = k.size(2);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C, op, ": w must be (C,) = (", C, ",)");
  TORCH_CHECK(u.dim() == 1 && u.size(0) == C, op, ": u must be (C,) = (", C, ",)");
  for (const at::Tensor* x : {&w, &u, &k, &v}) {
    TORCH_CHECK(x->device().type() == device && x->device() == k.device(), op,
                ": all tensors must be on the same ", c10::DeviceTypeName(device), " device");
    TORCH_CHECK(x->scalar_type() == k.scalar_type(), op, ": dtypes must match");
    TORCH_CHECK(x->is_contiguous(), op, ": tensors must be contiguous");
  }
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kDouble, op,
              ": float32 or float64 expected (half/bfloat16 are computed in float32 by "
              "cuda_wkv.bi_wkv)");
}

// Backward: the saved forward outputs and the incoming gradient must look like k.
inline void check_saved(const char* op, const at::Tensor& k,
                        std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* x : tensors) {
    TORCH_CHECK(x->sizes() == k.sizes() && x->scalar_type() == k.scalar_type() &&
                    x->is_contiguous() && x->device() == k.device(),
                op, " backward: saved tensors / grad must match k");
  }
}

// The chunk length forced by CUDA_WKV_CHUNK (0: unset, automatic); an invalid value is
// an error naming the variable.
inline int64_t forced_chunk(const char* op) {
  const char* bad = nullptr;
  const int64_t len = chunk_from_env(&bad);
  TORCH_CHECK(bad == nullptr, op, ": CUDA_WKV_CHUNK='", (bad ? bad : ""),
              "' is not a positive integer; unset it for the automatic chunk length or set "
              "a length such as CUDA_WKV_CHUNK=256");
  return len;
}

}  // namespace wkv
