// A cache of large, 64-byte aligned memory blocks for the CPU kernels' outputs and scratch.
//
// Every call of the fused CPU ops returns fresh output tensors (out, lse; dQ, dK, dV; delta) and uses
// per-thread scratch (the lane kernels' rings). Allocated with malloc, tensors of megabytes are mapped
// fresh and page-faulted in on first write (the kernel zeroes every page), then returned to the system
// when freed: measured on the NÜWA 10x21x21 grid (8 heads, D=64, 2 threads, AMD EPYC), 2,800 page faults
// per (3,3,3) training step and 6,700 per (1,3,3) one, up to two fifths of the step's time. The pool
// keeps freed blocks (like PyTorch's CUDA caching allocator), so that the next call reuses mapped memory.
//
// Blocks below kPoolMinBytes go to malloc directly. Block sizes are rounded up to kPoolGrain; a request
// takes the smallest cached block of at least its size and at most 5/4 of it. The pool holds at most
// NUWA_CPU_POOL_MB megabytes of free blocks (default 512; 0 disables it); empty_cpu_pool() frees them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>

namespace nuwa {
namespace cpu {

constexpr std::size_t kPoolMinBytes = std::size_t(1) << 18;  // 256 KiB
constexpr std::size_t kPoolGrain = std::size_t(1) << 16;     // 64 KiB

// 64-byte aligned storage of `bytes` (freed with pool_free); uninitialised.
void* pool_alloc(std::size_t bytes);
void pool_free(void* p);

// The allocator behind pooled_empty (a c10::Allocator: tensors from it resize and free as any).
c10::Allocator* pool_allocator();

// at::empty(sizes, options) on the CPU, from the pool.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the cached blocks; returns their bytes.
int64_t empty_cpu_pool();
// Bytes of the cached (free) blocks.
int64_t cpu_pool_cached_bytes();

}  // namespace cpu
}  // namespace nuwa
