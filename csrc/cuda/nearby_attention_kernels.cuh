// Host-side interface of the fused CUDA kernels of 3D nearby attention.
//
// Torch-free on purpose: the kernels (nearby_attention_kernels.cu) include only the CUDA runtime,
// cuda_fp16.h, cuda_bf16.h and ../window.h, and the torch binding (nearby_attention_cuda.cpp)
// talks to them through the launchers declared here (raw pointers, int64 sizes and strides, a dtype
// code, a stream). This header is plain C++ plus <cuda_runtime_api.h>, so a host compiler can
// include it.
//
// Tensor conventions (docs/DESIGN.md): grid layout, heads last,
//   query, grad_out, out, grad_query : (B, T, H, W, heads, D)
//   key, value, grad_key, grad_value : (B, Tk, Hk, Wk, heads_kv, D)
//   lse, delta                       : (B, T, H, W, heads), float32
// Every tensor is described by its data pointer and its strides in elements (any strides, including
// 0 and non-contiguous views); offsets are computed in int64.
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "../window.h"

namespace nuwa {
namespace cuda {

// Element type of query/key/value/out and of the gradients. lse/delta are always float32.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Supported head dims: multiples of 8 in [kMinHeadDim, kMaxHeadDim] (Dv == D).
constexpr int64_t kMinHeadDim = 8;
constexpr int64_t kMaxHeadDim = 256;

// A read-only strided tensor: stride[i] is the step of dim i in elements. Grid tensors use all six
// dims (B, T, H, W, heads, D); lse/delta use the first five.
struct ConstView {
  const void* data;
  int64_t stride[6];
};

// A written strided tensor (the binding passes fresh contiguous tensors).
struct MutView {
  void* data;
  int64_t stride[6];
};

// Sizes and window of one call. win.q_len / win.k_len are the query and key grids.
struct Na3dProblem {
  WindowParams win;
  int64_t batch;
  int64_t heads;     // query heads
  int64_t heads_kv;  // key/value heads; heads % heads_kv == 0
  int64_t head_dim;  // D == Dv
  double scale;      // already resolved (D ** -0.5 by default)
  int dtype;         // DTypeCode
};

struct Na3dFwdArgs {
  Na3dProblem prob;
  ConstView query, key, value;
  MutView out;  // (B, T, H, W, heads, D), dtype
  MutView lse;  // (B, T, H, W, heads), float32, natural log
};

struct Na3dBwdArgs {
  Na3dProblem prob;
  ConstView grad_out, query, key, value;
  ConstView lse, delta;  // float32; delta = rowsum(dO * O) - dLSE
  MutView grad_query, grad_key, grad_value;
};

// nullptr when the problem is supported; otherwise a static message saying why not.
const char* na3d_check_problem(const Na3dProblem& prob);

// Forward: out and lse. Returns the first CUDA error (launch configuration or argument error);
// cudaErrorInvalidValue for an unsupported problem (see na3d_check_problem).
cudaError_t na3d_fwd_launch(const Na3dFwdArgs& args, cudaStream_t stream);

// Backward: grad_query (one pass over each query's window) and grad_key / grad_value (one pass over
// each key's inverse neighbourhood, summed over the query heads of its group). Deterministic: every
// output element is written by exactly one thread group, no atomics.
cudaError_t na3d_bwd_launch(const Na3dBwdArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace nuwa
