// Op declarations of the fused C++ backends (schemas: docs/DESIGN.md, nuwa_kernels/_ops.py).
//
//   nuwa_kernels::na3d_fwd / na3d_bwd   the fused kernels; implemented per dispatch key in
//                                       csrc/cpu/ (CPU) and csrc/cuda/ (CUDA).
//   nuwa_kernels::na3d_fwd_probs / na3d_bwd_probs / na3d_probs_numel
//                                       the CPU pair that keeps the probabilities for the backward.
//   nuwa_kernels::na3d_bwd_recompute    the differentiable backward of double backward (Python kernel).
//   nuwa_kernels::na3d_delta            delta = rowsum(dO * O) - dLSE of the backward, one pass over
//                                       dO and O (no dO * O temporary) for the eager path.
//   nuwa_kernels::window_table          a test hook: the per-axis window and inverse-window tables
//                                       computed by csrc/window.h, compared with window.py by
//                                       tests/test_window_header.py.
//
// Autograd of na3d_fwd: csrc/autograd.cpp. Fake (meta) kernels are registered from Python
// (nuwa_kernels/backends/_fused_ops.py).
// This file also defines the module init of nuwa_kernels._C, which holds no Python bindings: importing
// it runs the static registrations below.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cpu/block_pool.h"
#include "cpu/kernel_isa.h"
#include "cpu/pair_store.h"
#include "window.h"

extern "C" {
// `import nuwa_kernels._C` loads this shared library, which registers the ops with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "nuwa_kernels C++ ops, registered under torch.ops.nuwa_kernels",
      -1,    // size of per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

namespace nuwa {
namespace {

// (lo, hi) of every local query coordinate, shape (q_len, 2), and (first, last) of every local key
// coordinate, shape (k_len, 2): one axis of window.h's window_on_axis / inverse_window_on_axis, for
// a stride and an optional slab [q_origin, k_origin, q_full, k_full] of that axis.
std::tuple<at::Tensor, at::Tensor> window_table(int64_t q_len, int64_t k_len, int64_t k, bool causal, bool shift,
                                                int64_t stride, at::IntArrayRef slab) {
  TORCH_CHECK(q_len >= 0 && k_len >= 0, "window_table: q_len and k_len must be >= 0, got ", q_len, " and ", k_len);
  TORCH_CHECK(k >= 1 && stride >= 1, "window_table: k and stride must be positive ints, got ", k, " and ", stride);
  TORCH_CHECK(slab.empty() || slab.size() == 4, "window_table: slab needs 0 or 4 entries");
  WindowParams p{};
  for (int a = 0; a < 3; ++a) {
    p.q_len[a] = p.k_len[a] = p.q_full[a] = p.k_full[a] = p.kernel[a] = p.stride[a] = 1;
  }
  p.q_len[0] = q_len;
  p.k_len[0] = k_len;
  p.kernel[0] = k;
  p.stride[0] = stride;
  p.causal[0] = causal;
  p.shift = shift;
  p.q_org[0] = slab.empty() ? 0 : slab[0];
  p.k_org[0] = slab.empty() ? 0 : slab[1];
  p.q_full[0] = slab.empty() ? q_len : slab[2];
  p.k_full[0] = slab.empty() ? k_len : slab[3];
  at::Tensor win = at::empty({q_len, 2}, at::TensorOptions().dtype(at::kLong));
  at::Tensor inv = at::empty({k_len, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* wp = win.data_ptr<int64_t>();
  int64_t* ip = inv.data_ptr<int64_t>();
  for (int64_t i = 0; i < q_len; ++i) {
    const Interval iv = window_on_axis(p, 0, i);
    wp[2 * i] = iv.lo;
    wp[2 * i + 1] = iv.hi;
  }
  for (int64_t j = 0; j < k_len; ++j) {
    const Interval iv = inverse_window_on_axis(p, 0, j);
    ip[2 * j] = iv.lo;
    ip[2 * j + 1] = iv.hi;
  }
  return {win, inv};
}

// Row dot products of contiguous CPU rows, accumulated in acc_t (float, or double for double inputs):
// kParts interleaved partial sums (one vector register's worth, which the compiler keeps in one; a
// single chain of scalar adds made this pass latency-bound), then their sum in a fixed order.
template <typename scalar_t, typename acc_t>
void rowsum_product(const scalar_t* g, const scalar_t* o, acc_t* d, int64_t rows, int64_t dim) {
  constexpr int kParts = 64 / sizeof(acc_t);
  at::parallel_for(0, rows, 2048 / std::max<int64_t>(dim, 1) + 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gr = g + r * dim;
      const scalar_t* orow = o + r * dim;
      acc_t part[kParts] = {};
      int64_t i = 0;
      for (; i + kParts <= dim; i += kParts)
        for (int j = 0; j < kParts; ++j)
          part[j] += static_cast<acc_t>(gr[i + j]) * static_cast<acc_t>(orow[i + j]);
      acc_t s = 0;
      for (int j = 0; j < kParts; ++j) s += part[j];
      for (; i < dim; ++i) s += static_cast<acc_t>(gr[i]) * static_cast<acc_t>(orow[i]);
      d[r] = s;
    }
  });
}

// delta = rowsum(grad_out * out) - grad_lse, in float32 (float64 for float64 inputs), shape out[:-1].
// CPU inputs take one fused pass (no dO * O temporary); CUDA inputs the equivalent ATen ops.
at::Tensor na3d_delta(const at::Tensor& grad_out, const at::Tensor& out, const std::optional<at::Tensor>& grad_lse) {
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "na3d_delta: grad_out and out shapes differ");
  TORCH_CHECK(out.dim() >= 1, "na3d_delta: out needs a head dim");
  const auto acc = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor delta;
  if (out.device().is_cpu()) {
    // one loop for every layout (strided or expanded gradients are made contiguous first), so equal
    // values give bitwise-equal deltas whatever their strides
    at::Tensor g = grad_out, o = out;
    if (g.scalar_type() != o.scalar_type()) {
      g = g.to(acc);
      o = o.to(acc);
    }
    g = g.contiguous();
    o = o.contiguous();
    auto shape = o.sizes().vec();
    const int64_t dim = shape.back();
    shape.pop_back();
    delta = cpu::pooled_empty(shape, out.options().dtype(acc));
    const int64_t rows = delta.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "na3d_delta", [&] {
      if (acc == at::kDouble) {
        rowsum_product<scalar_t, double>(g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                                         delta.mutable_data_ptr<double>(), rows, dim);
      } else {
        rowsum_product<scalar_t, float>(g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                                        delta.mutable_data_ptr<float>(), rows, dim);
      }
    });
  } else {
    delta = at::sum(at::mul(grad_out.to(acc), out.to(acc)), {-1});
  }
  if (grad_lse.has_value() && grad_lse->defined()) delta = at::sub(delta, grad_lse->to(acc));
  return delta;
}

}  // namespace
}  // namespace nuwa

TORCH_LIBRARY(nuwa_kernels, m) {
  m.def(
      "na3d_fwd(Tensor query, Tensor key, Tensor value, int[] kernel_size, bool[] causal_axes, "
      "bool raster_causal, bool shift_border, int[] stride, int[] slab, float scale) -> (Tensor, Tensor)");
  m.def(
      "na3d_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor lse, Tensor delta, "
      "int[] kernel_size, bool[] causal_axes, bool raster_causal, bool shift_border, int[] stride, int[] slab, "
      "float scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("na3d_delta(Tensor grad_out, Tensor out, Tensor? grad_lse) -> Tensor");
  // The CPU pair: the forward also returns every pair's probability (1-D, the accumulation dtype; empty
  // when the lane kernels do not keep them), which the backward reads instead of recomputing the scores
  // (csrc/cpu/lane_kernels.h); the backward takes the gradient of lse instead of delta and forms delta
  // from P and dP itself. csrc/autograd.cpp calls them for CPU tensors (the backward only with non-empty
  // probabilities); na3d_probs_numel is their size, for the fake kernels.
  m.def(
      "na3d_fwd_probs(Tensor query, Tensor key, Tensor value, int[] kernel_size, bool[] causal_axes, "
      "bool raster_causal, bool shift_border, int[] stride, int[] slab, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "na3d_bwd_probs(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor lse, Tensor? grad_lse, "
      "Tensor probs, int[] kernel_size, bool[] causal_axes, bool raster_causal, bool shift_border, int[] stride, "
      "int[] slab, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "na3d_probs_numel(int[] query_shape, int[] key_shape, int[] value_shape, ScalarType dtype, int[] kernel_size, "
      "bool[] causal_axes, bool raster_causal, bool shift_border, int[] stride, int[] slab) -> int",
      &nuwa::cpu::na3d_probs_numel);
  // The differentiable backward for create_graph=True (csrc/autograd.cpp); implemented in Python
  // (CompositeImplicitAutograd, nuwa_kernels/backends/_fused_ops.py).
  m.def(
      "na3d_bwd_recompute(Tensor query, Tensor key, Tensor value, Tensor? grad_out, Tensor? grad_lse, "
      "int[] kernel_size, bool[] causal_axes, bool raster_causal, bool shift_border, int[] stride, int[] slab, "
      "float scale) -> (Tensor, Tensor, Tensor)");
  // No tensor arguments: registered as a catch-all kernel.
  m.def(
      "window_table(int q_len, int k_len, int k, bool causal, bool shift, int stride=1, int[] slab=[]) -> "
      "(Tensor window, Tensor inverse)",
        &nuwa::window_table);
  // The CPU kernels' block pool (csrc/cpu/block_pool.h): frees its cached blocks / reads their bytes.
  m.def("empty_cpu_pool() -> int", &nuwa::cpu::empty_cpu_pool);
  m.def("cpu_pool_cached_bytes() -> int", &nuwa::cpu::cpu_pool_cached_bytes);
  // The CPU kernels' vector instruction set (csrc/cpu/kernel_isa.h): "avx512", "avx2" or "generic".
  m.def("cpu_kernel_isa() -> str", &nuwa::cpu::cpu_kernel_isa);
}

TORCH_LIBRARY_IMPL(nuwa_kernels, CompositeExplicitAutograd, m) { m.impl("na3d_delta", &nuwa::na3d_delta); }
