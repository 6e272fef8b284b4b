#include "noisydarts/runtime.h"

#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <sstream>

#include <ATen/autocast_mode.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>

#include "noisydarts/error.h"
#include "noisydarts/fused_ops.h"

namespace noisydarts {

int resolve_threads(int threads) {
  return threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

void check_threads(int64_t threads) {
  if (threads < 0 || threads > kMaxThreads)
    throw UsageError("--threads must be in [0, " + std::to_string(kMaxThreads) + "] (0 = all cores), got " +
                     std::to_string(threads));
}

torch::Device parse_device(const std::string& d) {
  try {
    torch::Device dev(d);
    if (dev.is_cuda() && !torch::cuda::is_available())
      throw UsageError("--device " + d + ": this LibTorch build or machine has no CUDA device");
    if (!dev.is_cpu() && !dev.is_cuda()) throw UsageError("--device must be cpu or cuda[:N], got '" + d + "'");
    return dev;
  } catch (const c10::Error&) {
    throw UsageError("--device must be cpu or cuda[:N], got '" + d + "'");
  }
}

namespace {

// c10's default CPU allocator takes its 64-byte-aligned blocks from posix_memalign, which cuts
// the misaligned head (and an unused tail) off the chunk it finds and frees them as small
// chunks of their own. Those leftovers sit between the tensors in glibc's bins and per-thread
// cache, so a freed tensor's chunk cannot merge with its neighbours and the heap grows around
// them over the iterations (docs/bench.md: search row 4's peak 738 MB after the first forward,
// 760-779 MB after seven iterations). This allocator asks malloc for the size plus the
// alignment, aligns inside the block and keeps the block's own address in the 8 bytes before
// the data: one chunk per tensor, nothing split off.
constexpr size_t kDataAlign = c10::gAlignment;

void free_aligned(void* p) {
  if (p) std::free(static_cast<void**>(p)[-1]);
}

struct AlignedMallocAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) const override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &free_aligned, cpu};
    constexpr size_t kExtra = kDataAlign + sizeof(void*);
    void* raw = n <= SIZE_MAX - kExtra ? std::malloc(n + kExtra) : nullptr;
    TORCH_CHECK(raw != nullptr, "out of memory: could not allocate ", n,
                " bytes of CPU memory (use a smaller --batch-size, --channels or --layers)");
    const auto at = (reinterpret_cast<uintptr_t>(raw) + sizeof(void*) + kDataAlign - 1) & ~(kDataAlign - 1);
    void* p = reinterpret_cast<void*>(at);
    static_cast<void**>(p)[-1] = raw;
    return {p, p, &free_aligned, cpu};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_aligned; }
};

}  // namespace

void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // the largest value glibc accepts on 64-bit
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  // NOISYDARTS_C10_ALLOCATOR=1 keeps c10's own allocator (for side-by-side measurements).
  static const bool own = std::getenv("NOISYDARTS_C10_ALLOCATOR") == nullptr;
  static AlignedMallocAllocator allocator;
  if (own) c10::SetCPUAllocator(&allocator, /*priority=*/1);
}

Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::kFp32;
  if (s == "bf16") return Precision::kBf16;
  throw UsageError("--precision must be fp32 or bf16, got '" + s + "'");
}

PrecisionScope::PrecisionScope(Precision p, const torch::Device& device) {
  if (p == Precision::kFp32) return;
  if (!device.is_cpu())
    throw UsageError("--precision bf16 is implemented for --device cpu only (got " + device.str() + "): use fp32");
  prev_autocast_ = at::autocast::is_cpu_enabled();
  prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
  prev_fused_ = fused_ops_enabled();
  at::autocast::set_cpu_enabled(true);
  at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  at::autocast::increment_nesting();
  set_fused_ops(false);
  active_ = true;
}

PrecisionScope::~PrecisionScope() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();  // the cast weights
  at::autocast::set_cpu_enabled(prev_autocast_);
  at::autocast::set_autocast_cpu_dtype(prev_dtype_);
  set_fused_ops(prev_fused_);
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto total = static_cast<int64_t>(s + 0.5);
  std::ostringstream o;
  if (total >= 3600) o << total / 3600 << "h";
  if (total >= 60) o << (total / 60) % 60 << "m";
  o << total % 60 << "s";
  return o.str();
}

double cosine_lr(double lr_max, double lr_min, int64_t e, int64_t T) {
  return lr_min + (lr_max - lr_min) * (1.0 + std::cos(M_PI * static_cast<double>(e) / T)) / 2.0;
}

}  // namespace noisydarts
