#include "noisydarts/runtime.h"

#include <malloc.h>

#include "noisydarts/error.h"

namespace noisydarts {

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

}  // namespace noisydarts
