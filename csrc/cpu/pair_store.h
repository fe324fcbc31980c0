// The CPU kernel's saved probabilities (nuwa_kernels::na3d_fwd_probs / na3d_bwd_probs, csrc/cpu/na3d_cpu.cpp):
// how many elements the forward returns for a call, for the ops' fake kernels
// (nuwa_kernels/backends/_fused_ops.py) and csrc/ops.cpp's op declarations.
#pragma once

#include <ATen/core/List.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace nuwa {
namespace cpu {

// Elements of na3d_fwd_probs's probabilities for tensors of these shapes and dtype and these window
// arguments: 0 when the lane kernels do not save them (the backward then recomputes the scores).
int64_t na3d_probs_numel(c10::IntArrayRef query_shape, c10::IntArrayRef key_shape, c10::IntArrayRef value_shape,
                         c10::ScalarType dtype, c10::IntArrayRef kernel_size, c10::List<bool> causal_axes,
                         bool raster_causal, bool shift_border, c10::IntArrayRef stride, c10::IntArrayRef slab);

}  // namespace cpu
}  // namespace nuwa
