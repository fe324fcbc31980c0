// CUDA implementations of nuwa_kernels::na3d_fwd / na3d_bwd (schemas: csrc/ops.cpp, docs/DESIGN.md).
//
// A thin binding: checks the arguments, allocates contiguous outputs, describes every tensor by its
// data pointer and strides (no .contiguous() copies: the kernels take any strides), and calls the
// torch-free launchers of nearby_attention_kernels.cu on the current stream of the tensors' device.
// It uses only device-generic c10 APIs (DeviceGuard, the CUDA device-guard implementation's stream
// handle), so it also compiles against a CPU-only torch's headers.
#ifdef NUWA_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

#include "../window_args.h"
#include "nearby_attention_kernels.cuh"

namespace nuwa {
namespace cuda {
namespace {

using at::Tensor;

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::ScalarType::Float: return kFloat32;
    case at::ScalarType::Half: return kFloat16;
    case at::ScalarType::BFloat16: return kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "nuwa_kernels (cuda backend): dtype must be float16, bfloat16 or float32; got ",
                       t.scalar_type());
  }
  return -1;
}

// Copies the strides of t (at most six dims) into a view's stride array.
void copy_strides(const Tensor& t, int64_t (&stride)[6]) {
  for (int64_t i = 0; i < t.dim() && i < 6; ++i) stride[i] = t.stride(i);
}

ConstView const_view(const Tensor& t) {
  ConstView v{};
  v.data = t.data_ptr();
  copy_strides(t, v.stride);
  return v;
}

MutView mut_view(Tensor& t) {
  MutView v{};
  v.data = t.data_ptr();
  copy_strides(t, v.stride);
  return v;
}

void check_grid_tensor(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.dim() == 6, "nuwa_kernels (cuda backend): ", name,
              " must have 6 dims (B, T, H, W, heads, D); got shape ", t.sizes());
  TORCH_CHECK(t.is_cuda(), "nuwa_kernels (cuda backend): ", name, " must be a CUDA tensor; got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "nuwa_kernels (cuda backend): ", name, " is on ", t.device(),
              " but query is on ", ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "nuwa_kernels (cuda backend): ", name, " has dtype ",
                   t.scalar_type(), " but query has dtype ", ref.scalar_type());
}

// lse / delta: float32, shape (B, T, H, W, heads) of the query, on the query's device.
void check_row_tensor(const Tensor& t, const char* name, const Tensor& query) {
  const auto row_shape = query.sizes().slice(0, 5);
  TORCH_CHECK(t.sizes() == row_shape, "nuwa_kernels (cuda backend): ", name, " must have shape ", row_shape,
              "; got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "nuwa_kernels (cuda backend): ", name, " must be float32; got ",
                   t.scalar_type());
  TORCH_CHECK(t.device() == query.device(), "nuwa_kernels (cuda backend): ", name, " is on ", t.device(),
              " but query is on ", query.device());
}

Na3dProblem make_problem(const Tensor& query, const Tensor& key, const Tensor& value, c10::IntArrayRef kernel_size,
                         const c10::List<bool>& causal_axes, bool raster_causal, bool shift_border,
                         c10::IntArrayRef stride, c10::IntArrayRef slab, double scale) {
  check_grid_tensor(query, "query", query);
  check_grid_tensor(key, "key", query);
  check_grid_tensor(value, "value", query);
  TORCH_CHECK(kernel_size.size() == 3, "nuwa_kernels (cuda backend): kernel_size must have 3 entries; got ",
              kernel_size);
  TORCH_CHECK(causal_axes.size() == 3, "nuwa_kernels (cuda backend): causal_axes must have 3 entries; got ",
              causal_axes.size());
  TORCH_CHECK(key.size(0) == query.size(0) && value.size(0) == query.size(0),
              "nuwa_kernels (cuda backend): batch mismatch between query ", query.sizes(), ", key ", key.sizes(),
              " and value ", value.sizes());
  for (int64_t d = 1; d < 5; ++d) {
    TORCH_CHECK(value.size(d) == key.size(d), "nuwa_kernels (cuda backend): key ", key.sizes(), " and value ",
                value.sizes(), " must have the same grid and heads_kv");
  }
  TORCH_CHECK(key.size(5) == query.size(5), "nuwa_kernels (cuda backend): head_dim of key (", key.size(5),
              ") must equal head_dim of query (", query.size(5), ")");
  TORCH_CHECK(value.size(5) == query.size(5), "nuwa_kernels (cuda backend): value head dim Dv (", value.size(5),
              ") must equal D (", query.size(5), ")");

  Na3dProblem pr{};
  pr.win = nuwa::window_params(query, key, kernel_size, causal_axes, raster_causal, shift_border, stride, slab);
  pr.batch = query.size(0);
  pr.heads = query.size(4);
  pr.heads_kv = key.size(4);
  pr.head_dim = query.size(5);
  pr.scale = scale;
  pr.dtype = dtype_code(query);
  if (raster_causal) {
    for (int a = 0; a < 3; ++a) {
      TORCH_CHECK(pr.win.q_full[a] == pr.win.k_full[a],
                  "nuwa_kernels (cuda backend): raster_causal needs the query grid to equal the key grid; got ",
                  query.sizes(), " and ", key.sizes());
    }
  }
  const char* why = na3d_check_problem(pr);
  TORCH_CHECK(why == nullptr, "nuwa_kernels (cuda backend): unsupported call: ", why ? why : "",
              " (query ", query.sizes(), ", key ", key.sizes(), ", kernel_size ", kernel_size, ")");
  const bool no_queries = pr.batch == 0 || pr.win.q_len[0] * pr.win.q_len[1] * pr.win.q_len[2] == 0;
  const bool no_keys = pr.win.k_len[0] * pr.win.k_len[1] * pr.win.k_len[2] == 0;
  TORCH_CHECK(no_queries || !no_keys, "nuwa_kernels (cuda backend): the key grid is empty (key ", key.sizes(),
              ") but there are queries (query ", query.sizes(), ")");
  return pr;
}

cudaStream_t current_stream(const c10::Device& device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  const c10::Stream stream = impl.getStream(device);
  return static_cast<cudaStream_t>(impl.getStreamNativeHandle(stream));
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "nuwa_kernels (cuda backend): ", what, " failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor> na3d_fwd_cuda(const Tensor& query, const Tensor& key, const Tensor& value,
                                         c10::IntArrayRef kernel_size, c10::List<bool> causal_axes,
                                         bool raster_causal, bool shift_border, c10::IntArrayRef stride,
                                         c10::IntArrayRef slab, double scale) {
  const Na3dProblem pr =
      make_problem(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride, slab, scale);
  const c10::DeviceGuard guard(query.device());
  Tensor out = at::empty(query.sizes(), query.options());  // Dv == D
  Tensor lse = at::empty(query.sizes().slice(0, 5), query.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  // Fields in declaration order: prob, query, key, value, out, lse.
  const Na3dFwdArgs args{pr, const_view(query), const_view(key), const_view(value), mut_view(out), mut_view(lse)};
  check_launch(na3d_fwd_launch(args, current_stream(query.device())), "na3d_fwd kernel launch");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> na3d_bwd_cuda(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                 const Tensor& value, const Tensor& lse, const Tensor& delta,
                                                 c10::IntArrayRef kernel_size, c10::List<bool> causal_axes,
                                                 bool raster_causal, bool shift_border, c10::IntArrayRef stride,
                                         c10::IntArrayRef slab, double scale) {
  const Na3dProblem pr =
      make_problem(query, key, value, kernel_size, causal_axes, raster_causal, shift_border, stride, slab, scale);
  check_grid_tensor(grad_out, "grad_out", query);
  TORCH_CHECK(grad_out.sizes() == query.sizes(), "nuwa_kernels (cuda backend): grad_out must have shape ",
              query.sizes(), "; got ", grad_out.sizes());
  check_row_tensor(lse, "lse", query);
  check_row_tensor(delta, "delta", query);

  const c10::DeviceGuard guard(query.device());
  Tensor grad_query = at::empty(query.sizes(), query.options());
  Tensor grad_key = at::empty(key.sizes(), key.options());
  Tensor grad_value = at::empty(value.sizes(), value.options());
  if (grad_query.numel() == 0 && grad_key.numel() == 0) return {grad_query, grad_key, grad_value};

  // Fields in declaration order: prob, grad_out, query, key, value, lse, delta, grad_query, grad_key, grad_value.
  const Na3dBwdArgs args{pr, const_view(grad_out), const_view(query), const_view(key), const_view(value),
                         const_view(lse), const_view(delta), mut_view(grad_query), mut_view(grad_key),
                         mut_view(grad_value)};
  check_launch(na3d_bwd_launch(args, current_stream(query.device())), "na3d_bwd kernel launch");
  return {grad_query, grad_key, grad_value};
}

}  // namespace
}  // namespace cuda
}  // namespace nuwa

TORCH_LIBRARY_IMPL(nuwa_kernels, CUDA, m) {
  m.impl("na3d_fwd", &nuwa::cuda::na3d_fwd_cuda);
  m.impl("na3d_bwd", &nuwa::cuda::na3d_bwd_cuda);
}

#endif  // NUWA_WITH_CUDA
