#pragma once
/// Process-level runtime settings shared by the commands: device parsing and the allocator.
#include <torch/torch.h>
#include <string>

namespace noisydarts {

/// Parses --device (cpu | cuda | cuda:N). Throws UsageError naming the option when the value is
/// malformed or CUDA is not available.
torch::Device parse_device(const std::string& d);

/// glibc serves blocks above its mmap threshold with mmap and unmaps them when freed, so every
/// large activation tensor costs fresh page faults (measured here: evaluating Fashion-MNIST took
/// 5-9x longer, mostly system time). Keeps freed memory in the heap instead. Idempotent.
void keep_freed_memory();

}  // namespace noisydarts
