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
/// 5-9x longer, mostly system time). Keeps freed memory in the heap instead, and installs an own
/// CPU allocator (64-byte-aligned blocks from plain malloc, instead of c10's posix_memalign,
/// whose split-off pieces fragment the heap: docs/bench.md); NOISYDARTS_C10_ALLOCATOR=1 in the
/// environment keeps c10's. Idempotent.
void keep_freed_memory();

/// Arithmetic precision of evaluation passes (`--precision` of eval, predict, bench eval-step).
/// fp32 (default) runs the own fused kernels in float; bf16 runs every convolution, BN and the
/// classifier in bfloat16 through oneDNN (AVX512-BF16 on CPUs that have it), module by module,
/// with float logits. docs/bench.md measures its speed and its effect on accuracy.
enum class Precision { kFp32, kBf16 };
/// "fp32" | "bf16"; throws UsageError naming --precision otherwise.
Precision parse_precision(const std::string& s);

/// Inference under a Precision for the scope's lifetime. bf16: LibTorch's CPU autocast to
/// bfloat16 on (convolutions and linear layers cast their inputs and weights; the ops after them
/// follow the dtype), the fused float kernels off; both restored on exit. Throws UsageError for
/// bf16 on a non-CPU device (not implemented there). fp32: changes nothing.
class PrecisionScope {
 public:
  PrecisionScope(Precision p, const torch::Device& device);
  ~PrecisionScope();
  PrecisionScope(const PrecisionScope&) = delete;
  PrecisionScope& operator=(const PrecisionScope&) = delete;

 private:
  bool active_ = false, prev_autocast_ = false, prev_fused_ = true;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

/// Seconds elapsed since `t` (steady clock).
double seconds_since(std::chrono::steady_clock::time_point t);
/// "1h2m3s" / "4m5s" / "6s"; "?" for negative or non-finite values.
std::string format_duration(double seconds);
/// PyTorch's CosineAnnealingLR in closed form, stepped once per epoch: the lr of epoch `e` of `T`.
double cosine_lr(double lr_max, double lr_min, int64_t e, int64_t T);

}  // namespace noisydarts
