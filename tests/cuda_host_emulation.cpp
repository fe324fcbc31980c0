// Host emulation of the CUDA kernels of csrc/cuda/nearby_attention_device.cuh, for tests without a GPU.
//
// Compiles the exact device code with a host C++ compiler: the CUDA keywords become plain C++, threadIdx /
// blockIdx / gridDim become thread-local variables, __ldg a plain load, and the lane group's
// __shfl_xor_sync an exchange between the G threads that run the G lanes of a group in lock step (a
// barrier per shuffle). Every CTA and every group of the launch runs in turn, with a capped grid so the
// kernels' grid-stride loops are exercised. The host-side preparation (validation, vectorisation flags)
// and the dtype/head-dim dispatch are the launchers' own (prepare_fwd/prepare_bwd, dispatch).
// Built by tests/test_cuda_kernel.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {
struct Barrier {
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const long gen = gen_;
    if (++count_ == n_) { count_ = 0; ++gen_; cv_.notify_all(); return; }
    cv_.wait(lock, [&] { return gen_ != gen; });
  }
  int n_, count_ = 0;
  long gen_ = 0;
  std::mutex m_;
  std::condition_variable cv_;
};
struct Group { Barrier bar; float slot[32]; explicit Group(int g) : bar(g) {} };
thread_local uint3 tid, bid;
uint3 grid_dim;
thread_local Group* group = nullptr;
thread_local int lane = 0;
}  // namespace emu

#define threadIdx emu::tid
#define blockIdx emu::bid
#define gridDim emu::grid_dim

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width) {
  emu::Group* g = emu::group;
  TORCH_CHECK(g != nullptr && lane_mask < width, "emulated shuffle outside a lane group");
  TORCH_CHECK((mask >> (emu::tid.x & 31)) & 1u, "emulated shuffle: calling lane not in mask");
  g->slot[emu::lane] = v;
  g->bar.wait();
  const float r = g->slot[emu::lane ^ lane_mask];
  g->bar.wait();
  return r;
}

#include "cuda/nearby_attention_device.cuh"

using namespace nuwa::cuda;
using namespace nuwa::cuda::detail;

// Runs kernel() for every lane of every group of `blocks` CTAs; the G lanes of a group run as G threads.
template <int G, typename K>
void emulate(unsigned blocks, K kernel) {
  emu::grid_dim = make_uint3(blocks, 1, 1);
  for (unsigned b = 0; b < blocks; ++b) {
    for (int grp = 0; grp < kThreads / G; ++grp) {
      emu::Group group(G);
      auto run = [&, b, grp](int lane) {
        emu::tid = make_uint3(grp * G + lane, 0, 0);
        emu::bid = make_uint3(b, 0, 0);
        emu::group = &group;
        emu::lane = lane;
        kernel();
      };
      if (G == 1) { run(0); continue; }
      std::vector<std::thread> lanes;
      for (int l = 0; l < G; ++l) lanes.emplace_back(run, l);
      for (auto& t : lanes) t.join();
    }
  }
}

static int dtype_code(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return kFloat32;
  if (t.scalar_type() == at::kHalf) return kFloat16;
  if (t.scalar_type() == at::kBFloat16) return kBFloat16;
  TORCH_CHECK(false, "dtype");
}
static ConstView cview(const at::Tensor& t) {
  ConstView v{};
  v.data = t.data_ptr();
  for (int64_t i = 0; i < t.dim(); ++i) v.stride[i] = t.stride(i);
  return v;
}

static MutView mview(at::Tensor& t) {
  MutView v{};
  v.data = t.data_ptr();
  for (int64_t i = 0; i < t.dim(); ++i) v.stride[i] = t.stride(i);
  return v;
}

// stride: 3 ints; slab: empty or q_origin(3), k_origin(3), q_full(3), k_full(3) (as csrc/window_args.h).
static Na3dProblem problem(const at::Tensor& q, const at::Tensor& k, std::vector<int64_t> ks,
                           std::vector<int64_t> causal, bool raster, bool shift, std::vector<int64_t> stride,
                           std::vector<int64_t> slab, double scale) {
  Na3dProblem pr{};
  for (int a = 0; a < 3; ++a) {
    pr.win.q_len[a] = q.size(1 + a); pr.win.k_len[a] = k.size(1 + a);
    pr.win.kernel[a] = ks[a]; pr.win.causal[a] = causal[a] != 0;
    pr.win.stride[a] = stride[a];
    pr.win.q_org[a] = slab.empty() ? 0 : slab[a];
    pr.win.k_org[a] = slab.empty() ? 0 : slab[3 + a];
    pr.win.q_full[a] = slab.empty() ? pr.win.q_len[a] : slab[6 + a];
    pr.win.k_full[a] = slab.empty() ? pr.win.k_len[a] : slab[9 + a];
  }
  pr.win.raster = raster; pr.win.shift = shift;
  pr.batch = q.size(0); pr.heads = q.size(4); pr.heads_kv = k.size(4); pr.head_dim = q.size(5);
  pr.scale = scale; pr.dtype = dtype_code(q);
  return pr;
}

std::vector<at::Tensor> emu_fwd(at::Tensor q, at::Tensor k, at::Tensor v, std::vector<int64_t> ks,
                                std::vector<int64_t> causal, bool raster, bool shift, std::vector<int64_t> stride,
                                std::vector<int64_t> slab, double scale, int64_t max_blocks) {
  Na3dFwdArgs a{};
  a.prob = problem(q, k, ks, causal, raster, shift, stride, slab, scale);
  a.query = cview(q); a.key = cview(k); a.value = cview(v);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 5), q.options().dtype(at::kFloat));
  a.out = mview(out); a.lse = mview(lse);
  FwdParams p; int64_t total = 0;
  TORCH_CHECK(prepare_fwd(a, p, total) == cudaSuccess, "prepare_fwd failed");
  if (total > 0) {
    dispatch(a.prob, [&](auto tt, auto gt) -> cudaError_t {
      using T = typename decltype(tt)::type;
      constexpr int G = decltype(gt)::value;
      emulate<G>(std::min<unsigned>(grid_for<G>(total), max_blocks), [&] { na3d_fwd_kernel<T, G>(p); });
      return cudaSuccess;
    });
  }
  return {out, lse, at::tensor(int64_t(p.vec))};
}

std::vector<at::Tensor> emu_bwd(at::Tensor g, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor lse,
                                at::Tensor delta, std::vector<int64_t> ks, std::vector<int64_t> causal, bool raster,
                                bool shift, std::vector<int64_t> stride, std::vector<int64_t> slab, double scale,
                                int64_t max_blocks) {
  Na3dBwdArgs a{};
  a.prob = problem(q, k, ks, causal, raster, shift, stride, slab, scale);
  a.grad_out = cview(g); a.query = cview(q); a.key = cview(k); a.value = cview(v);
  a.lse = cview(lse); a.delta = cview(delta);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  a.grad_query = mview(dq); a.grad_key = mview(dk); a.grad_value = mview(dv);
  BwdParams p; int64_t tq = 0, tk = 0;
  TORCH_CHECK(prepare_bwd(a, p, tq, tk) == cudaSuccess, "prepare_bwd failed");
  dispatch(a.prob, [&](auto tt, auto gt) -> cudaError_t {
    using T = typename decltype(tt)::type;
    constexpr int G = decltype(gt)::value;
    if (tq > 0) emulate<G>(std::min<unsigned>(grid_for<G>(tq), max_blocks), [&] { na3d_bwd_dq_kernel<T, G>(p); });
    if (tk > 0) emulate<G>(std::min<unsigned>(grid_for<G>(tk), max_blocks), [&] { na3d_bwd_dkv_kernel<T, G>(p); });
    return cudaSuccess;
  });
  return {dq, dk, dv, at::tensor(int64_t(p.vec))};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("emu_fwd", &emu_fwd, "emulated na3d_fwd: (out, lse, vec_flags)");
  m.def("emu_bwd", &emu_bwd, "emulated na3d_bwd: (grad_query, grad_key, grad_value, vec_flags)");
}
