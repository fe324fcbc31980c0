// Host-only bridge from the op arguments (torch tensors and lists) to nuwa::WindowParams.
//
// Used by the CPU kernel (csrc/cpu/) and the CUDA binding (csrc/cuda/), so the mapping from
// (query, key, kernel_size, causal_axes, raster_causal, shift_border) to the window maths lives in
// one place. Device code sees only window.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include "window.h"

namespace nuwa {

// query (B, T, H, W, heads, D), key (B, Tk, Hk, Wk, heads_kv, D); kernel sizes already normalised.
inline WindowParams window_params(const at::Tensor& query, const at::Tensor& key, at::IntArrayRef kernel_size,
                                  const c10::List<bool>& causal_axes, bool raster, bool shift) {
  WindowParams p{};
  for (int a = 0; a < 3; ++a) {
    p.q_len[a] = query.size(1 + a);
    p.k_len[a] = key.size(1 + a);
    p.kernel[a] = kernel_size[a];
    p.causal[a] = causal_axes.get(a);
  }
  p.raster = raster;
  p.shift = shift;
  return p;
}

}  // namespace nuwa
