// The block pool of the CPU kernels (block_pool.h).
#include "block_pool.h"

#include <ATen/EmptyTensor.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>

#ifndef _WIN32
#include <pthread.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace nuwa {
namespace cpu {
namespace {

// Every block starts with a header of one cache line: its size (0: a malloc'd block outside the pool).
constexpr std::size_t kHeader = 64;

struct Pool {
  std::mutex m;
  std::multimap<std::size_t, char*> free_blocks;  // block bytes -> block (header included)
  std::size_t cached = 0;
  std::size_t limit = 0;

  Pool() {
    const char* env = std::getenv("NUWA_CPU_POOL_MB");
    const long mb = env && *env ? std::strtol(env, nullptr, 10) : 512;
    limit = mb > 0 ? std::size_t(mb) << 20 : 0;
  }
};

Pool& pool() {
  static Pool* p = [] {
    Pool* q = new Pool();  // never destroyed: tensors may be freed during interpreter shutdown
#ifndef _WIN32
    // fork() while another thread holds the lock would leave the child's pool locked forever
    pthread_atfork([] { pool().m.lock(); }, [] { pool().m.unlock(); }, [] { pool().m.unlock(); });
#endif
    return q;
  }();
  return *p;
}

// Blocks of kHugeMinBytes or more start on a 2 MiB boundary and ask for transparent huge pages (Linux,
// where THP is in `madvise` mode, the default of many distributions): the kernels walk a head's rows 2 KiB
// and more apart, one TLB entry per 2 MiB instead of per 4 KiB (NÜWA's (1,3,3) forward and backward,
// 10x21x21, 8 heads: 5-10% here with inputs in huge pages too). Best effort: madvise may fail.
constexpr std::size_t kHugePage = std::size_t(2) << 20;
constexpr std::size_t kHugeMinBytes = std::size_t(4) << 20;

char* raw_alloc(std::size_t total) {
  void* p = nullptr;
#ifdef __linux__
  if (total >= kHugeMinBytes) {
    if (posix_memalign(&p, kHugePage, total) != 0) throw std::bad_alloc();
    (void)madvise(p, total, MADV_HUGEPAGE);
    return static_cast<char*>(p);
  }
#endif
  if (posix_memalign(&p, 64, total) != 0) throw std::bad_alloc();
  return static_cast<char*>(p);
}

std::size_t& header_bytes(char* block) { return *reinterpret_cast<std::size_t*>(block); }

void delete_pooled(void* data) { pool_free(data); }

struct PoolAllocator final : public c10::Allocator {
  c10::DataPtr allocate(std::size_t n) override {
    void* p = pool_alloc(n);
    return {p, p, &delete_pooled, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_pooled; }
  void copy_data(void* dest, const void* src, std::size_t count) const final { default_copy_data(dest, src, count); }
};

}  // namespace

void* pool_alloc(std::size_t bytes) {
  Pool& pl = pool();
  if (bytes < kPoolMinBytes || pl.limit == 0) {
    char* b = raw_alloc(kHeader + std::max<std::size_t>(bytes, 1));
    header_bytes(b) = 0;
    return b + kHeader;
  }
  const std::size_t total = (kHeader + bytes + kPoolGrain - 1) / kPoolGrain * kPoolGrain;
  {
    std::lock_guard<std::mutex> lock(pl.m);
    auto it = pl.free_blocks.lower_bound(total);
    if (it != pl.free_blocks.end() && it->first <= total + total / 4) {
      char* b = it->second;
      pl.cached -= it->first;
      pl.free_blocks.erase(it);
      return b + kHeader;
    }
  }
  char* b = raw_alloc(total);
  header_bytes(b) = total;
  return b + kHeader;
}

void pool_free(void* p) {
  if (!p) return;
  char* b = static_cast<char*>(p) - kHeader;
  const std::size_t total = header_bytes(b);
  if (total == 0) {
    std::free(b);
    return;
  }
  Pool& pl = pool();
  {
    std::lock_guard<std::mutex> lock(pl.m);
    if (pl.cached + total <= pl.limit) {
      pl.free_blocks.emplace(total, b);
      pl.cached += total;
      return;
    }
  }
  std::free(b);
}

c10::Allocator* pool_allocator() {
  static PoolAllocator* a = new PoolAllocator();
  return a;
}

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, pool_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

int64_t empty_cpu_pool() {
  Pool& pl = pool();
  std::multimap<std::size_t, char*> blocks;
  {
    std::lock_guard<std::mutex> lock(pl.m);
    blocks.swap(pl.free_blocks);
    pl.cached = 0;
  }
  int64_t freed = 0;
  for (auto& kv : blocks) {
    freed += static_cast<int64_t>(kv.first);
    std::free(kv.second);
  }
  return freed;
}

int64_t cpu_pool_cached_bytes() {
  Pool& pl = pool();
  std::lock_guard<std::mutex> lock(pl.m);
  return static_cast<int64_t>(pl.cached);
}

}  // namespace cpu
}  // namespace nuwa
