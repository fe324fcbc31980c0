// Launchers of the fused CUDA kernels of 3D nearby attention (kernels: nearby_attention_device.cuh).
//
// Torch-free: includes only the CUDA runtime, the fp16/bf16 headers (through the device header) and
// ../window.h. The torch binding is nearby_attention_cuda.cpp. Semantics: docs/nearby_attention.md.
#include <cuda_runtime.h>

#include "nearby_attention_device.cuh"
#include "nearby_attention_kernels.cuh"

namespace nuwa {
namespace cuda {

using namespace detail;  // NOLINT(build/namespaces)

const char* na3d_check_problem(const Na3dProblem& pr) { return check_problem(pr); }

cudaError_t na3d_fwd_launch(const Na3dFwdArgs& args, cudaStream_t stream) {
  FwdParams p;
  int64_t total = 0;
  const cudaError_t prep = prepare_fwd(args, p, total);
  if (prep != cudaSuccess || total == 0) return prep;
  return dispatch(args.prob, [&](auto type_tag, auto group_tag) -> cudaError_t {
    using T = typename decltype(type_tag)::type;
    constexpr int G = decltype(group_tag)::value;
    na3d_fwd_kernel<T, G><<<grid_for<G>(total), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t na3d_bwd_launch(const Na3dBwdArgs& args, cudaStream_t stream) {
  BwdParams p;
  int64_t total_q = 0, total_k = 0;
  const cudaError_t prep = prepare_bwd(args, p, total_q, total_k);
  if (prep != cudaSuccess || (total_q == 0 && total_k == 0)) return prep;
  return dispatch(args.prob, [&](auto type_tag, auto group_tag) -> cudaError_t {
    using T = typename decltype(type_tag)::type;
    constexpr int G = decltype(group_tag)::value;
    if (total_q > 0) {
      na3d_bwd_dq_kernel<T, G><<<grid_for<G>(total_q), kThreads, 0, stream>>>(p);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if (total_k > 0) {
      na3d_bwd_dkv_kernel<T, G><<<grid_for<G>(total_k), kThreads, 0, stream>>>(p);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

}  // namespace cuda
}  // namespace nuwa
