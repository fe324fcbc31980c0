// The vector instruction set the CPU kernels were compiled for (csrc/cpu/na3d_cpu.cpp, with setup.py's
// -march), reported by the op nuwa_kernels::cpu_kernel_isa and `python -m nuwa_kernels`.
#pragma once

#include <string>

namespace nuwa {
namespace cpu {

// "avx512": row-layout scores, and the float lanes take any head dim (rows padded with zeros to whole
// vectors; float64 lanes head dims in multiples of 8); "avx2": the lanes take head dims in multiples of 8,
// the row kernels the others; "generic": neither.
std::string cpu_kernel_isa();

}  // namespace cpu
}  // namespace nuwa
