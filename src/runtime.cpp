#include "noisydarts/runtime.h"

#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <sstream>

#include "noisydarts/error.h"

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
