// Host-only bridge from the op arguments (torch tensors and lists) to nuwa::WindowParams.
//
// Used by the CPU kernel (csrc/cpu/) and the CUDA binding (csrc/cuda/), so the mapping from
// (query, key, kernel_size, causal_axes, raster_causal, shift_border, stride, slab) to the window
// maths lives in one place. Device code sees only window.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include "window.h"

namespace nuwa {

// query (B, T, H, W, heads, D), key (B, Tk, Hk, Wk, heads_kv, D); kernel sizes already normalised.
// stride: 3 positive ints. slab: empty (the tensors are the whole grids) or 12 ints
// q_origin(3), k_origin(3), q_full(3), k_full(3) (nuwa_kernels.window.Slab).
inline WindowParams window_params(const at::Tensor& query, const at::Tensor& key, at::IntArrayRef kernel_size,
                                  const c10::List<bool>& causal_axes, bool raster, bool shift,
                                  at::IntArrayRef stride, at::IntArrayRef slab) {
  TORCH_CHECK(kernel_size.size() == 3 && stride.size() == 3 && causal_axes.size() == 3,
              "nuwa_kernels: kernel_size, causal_axes and stride need 3 entries");
  TORCH_CHECK(slab.empty() || slab.size() == 12, "nuwa_kernels: slab needs 0 or 12 entries, got ", slab.size());
  WindowParams p{};
  for (int a = 0; a < 3; ++a) {
    p.q_len[a] = query.size(1 + a);
    p.k_len[a] = key.size(1 + a);
    p.kernel[a] = kernel_size[a];
    p.stride[a] = stride[a];
    p.causal[a] = causal_axes.get(a);
    TORCH_CHECK(p.kernel[a] >= 1 && p.stride[a] >= 1, "nuwa_kernels: kernel_size and stride must be >= 1");
    p.q_org[a] = slab.empty() ? 0 : slab[a];
    p.k_org[a] = slab.empty() ? 0 : slab[3 + a];
    p.q_full[a] = slab.empty() ? p.q_len[a] : slab[6 + a];
    p.k_full[a] = slab.empty() ? p.k_len[a] : slab[9 + a];
  }
  p.raster = raster;
  p.shift = shift;
  return p;
}

}  // namespace nuwa
