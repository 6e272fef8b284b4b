#include "noisydarts/runtime.h"

#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <sstream>

#include <ATen/autocast_mode.h>

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

void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // the largest value glibc accepts on 64-bit
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
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
