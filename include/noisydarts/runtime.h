#pragma once
/// Process-level runtime settings shared by the commands: device parsing and the allocator.
#include <torch/torch.h>
#include <chrono>
#include <string>

namespace noisydarts {

/// Upper bound of --threads: LibTorch's set_num_threads(99999999) does not fail, it stalls the
/// process (found by the broken-input checks, docs/reliability.md).
constexpr int kMaxThreads = 256;
/// Throws UsageError naming --threads unless 0 <= threads <= kMaxThreads (0 = all cores).
void check_threads(int64_t threads);

/// The compute thread count of a --threads value: itself when > 0, else every core.
int resolve_threads(int threads);

/// Parses --device (cpu | cuda | cuda:N). Throws UsageError naming the option when the value is
/// malformed or CUDA is not available.
torch::Device parse_device(const std::string& d);

/// glibc serves blocks above its mmap threshold with mmap and unmaps them when freed, so every
/// large activation tensor costs fresh page faults (measured here: evaluating Fashion-MNIST took
/// 5-9x longer, mostly system time). Keeps freed memory in the heap instead. Idempotent.
void keep_freed_memory();

/// Seconds elapsed since `t` (steady clock).
double seconds_since(std::chrono::steady_clock::time_point t);
/// "1h2m3s" / "4m5s" / "6s"; "?" for negative or non-finite values.
std::string format_duration(double seconds);
/// PyTorch's CosineAnnealingLR in closed form, stepped once per epoch: the lr of epoch `e` of `T`.
double cosine_lr(double lr_max, double lr_min, int64_t e, int64_t T);

}  // namespace noisydarts
