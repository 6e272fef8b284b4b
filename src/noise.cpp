#include "noisydarts/noise.h"

#include <algorithm>
#include <cmath>
#include <mutex>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include "noisydarts/error.h"
#include "noisydarts/splitmix.h"

namespace noisydarts {

bool NoiseOptions::applies_to(const std::string& op) const {
  return enabled() && std::find(ops.begin(), ops.end(), op) != ops.end();
}

void NoiseOptions::validate() const {
  if (!(lambda >= 0.0) || !std::isfinite(lambda))
    throw UsageError("--noise-lambda must be a finite number >= 0, got " + std::to_string(lambda));
  if (!std::isfinite(mean))
    throw UsageError("--noise-mean must be finite, got " + std::to_string(mean));
  if (!(skip_drop_path >= 0.0 && skip_drop_path < 1.0))
    throw UsageError("--skip-drop-path must be in [0, 1), got " + std::to_string(skip_drop_path));
}

double noise_decay_factor(const NoiseOptions& opt, double epoch, double total_epochs) {
  if (opt.decay == NoiseDecay::kNone || total_epochs <= 0) return 1.0;
  const double e = std::clamp(epoch, 0.0, total_epochs);
  return (1.0 + std::cos(M_PI * e / total_epochs)) / 2.0;
}

namespace {
// A tensor shaped like y, filled with N(a, b) (gaussian: mean a, sigma b) or U(a, b) (uniform)
// in parallel on CPU: blocks of 2^16 elements, each drawn by its own generator
// seeded from one 64-bit draw of the default generator and the block index. Same seed, same
// noise, whatever the thread count. (ATen's CPU sampler runs on one thread: at the sizes of a
// search it held up the other threads for ~5% of an iteration.) Other devices: ATen.
torch::Tensor random_like(const torch::Tensor& y, bool gaussian, double a, double b) {
  if (!y.device().is_cpu() || !std::isfinite(a) || !std::isfinite(b)) {
    // A diverged input (sigma NaN or inf) gives NaN/inf noise, as the arithmetic says: the
    // divergence check then reports it. ATen's samplers reject such parameters.
    return gaussian ? torch::randn_like(y).mul_(b).add_(a) : torch::rand_like(y).mul_(b - a).add_(a);
  }
  auto out = torch::empty(y.sizes(), y.options().memory_format(c10::MemoryFormat::Contiguous));
  uint64_t seed = 0;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    seed = gen.get<at::CPUGeneratorImpl>()->random64();
  }
  auto flat = out.view({-1});
  const int64_t n = flat.numel(), block = int64_t{1} << 16, nb = (n + block - 1) / block;
  at::parallel_for(0, nb, 1, [&](int64_t bb, int64_t be) {
    for (int64_t i = bb; i < be; ++i) {
      auto gen = at::detail::createCPUGenerator(splitmix64(seed + static_cast<uint64_t>(i)));
      auto part = flat.narrow(0, i * block, std::min(block, n - i * block));
      if (gaussian) part.normal_(a, b, gen);
      else part.uniform_(a, b, gen);
    }
  });
  return out;
}
}  // namespace

torch::Tensor sample_noise(const torch::Tensor& y, const NoiseOptions& opt, double decay) {
  torch::NoGradGuard no_grad;
  const auto yd = y.detach();
  double sigma = opt.lambda;
  if (opt.mixture == NoiseMixture::kAdditive && opt.scale == NoiseScale::kRelative)
    sigma = opt.lambda * yd.std().item<double>();
  torch::Tensor n;
  if (opt.type == NoiseType::kGaussian) {
    n = random_like(yd, true, opt.mean, sigma);
  } else {
    const double half = std::sqrt(3.0) * sigma;  // U(-a, a) has std a / sqrt(3)
    n = random_like(yd, false, opt.mean - half, opt.mean + half);
  }
  if (decay != 1.0) n.mul_(decay);
  return n;
}

torch::Tensor apply_noise(const torch::Tensor& y, const NoiseOptions& opt, double decay) {
  if (!opt.enabled()) return y;
  auto n = sample_noise(y, opt, decay);
  return opt.mixture == NoiseMixture::kAdditive ? y + n : y * n;
}

std::string to_string(NoiseType t) {
  switch (t) {
    case NoiseType::kNone: return "none";
    case NoiseType::kGaussian: return "gaussian";
    case NoiseType::kUniform: return "uniform";
  }
  return "?";
}
std::string to_string(NoiseMixture m) {
  return m == NoiseMixture::kAdditive ? "additive" : "multiplicative";
}
std::string to_string(NoiseScale s) { return s == NoiseScale::kRelative ? "relative" : "absolute"; }
std::string to_string(NoiseDecay d) { return d == NoiseDecay::kNone ? "none" : "cosine"; }

NoiseType parse_noise_type(const std::string& s) {
  if (s == "gaussian") return NoiseType::kGaussian;
  if (s == "uniform") return NoiseType::kUniform;
  if (s == "none") return NoiseType::kNone;
  throw UsageError("--noise must be gaussian, uniform or none, got '" + s + "'");
}
NoiseMixture parse_noise_mixture(const std::string& s) {
  if (s == "additive") return NoiseMixture::kAdditive;
  if (s == "multiplicative") return NoiseMixture::kMultiplicative;
  throw UsageError("--noise-mixture must be additive or multiplicative, got '" + s + "'");
}
NoiseScale parse_noise_scale(const std::string& s) {
  if (s == "relative") return NoiseScale::kRelative;
  if (s == "absolute") return NoiseScale::kAbsolute;
  throw UsageError("--noise-scale must be relative or absolute, got '" + s + "'");
}
NoiseDecay parse_noise_decay(const std::string& s) {
  if (s == "none") return NoiseDecay::kNone;
  if (s == "cosine") return NoiseDecay::kCosine;
  throw UsageError("--noise-decay must be none or cosine, got '" + s + "'");
}

nlohmann::json noise_to_json(const NoiseOptions& o) {
  return {{"type", to_string(o.type)},     {"mixture", to_string(o.mixture)},
          {"scale", to_string(o.scale)},   {"lambda", o.lambda},
          {"mean", o.mean},                {"decay", to_string(o.decay)},
          {"ops", o.ops},                  {"skip_drop_path", o.skip_drop_path}};
}

NoiseOptions noise_from_json(const nlohmann::json& j) {
  NoiseOptions o;
  if (j.contains("type")) o.type = parse_noise_type(j.at("type").get<std::string>());
  if (j.contains("mixture")) o.mixture = parse_noise_mixture(j.at("mixture").get<std::string>());
  if (j.contains("scale")) o.scale = parse_noise_scale(j.at("scale").get<std::string>());
  if (j.contains("lambda")) o.lambda = j.at("lambda").get<double>();
  if (j.contains("mean")) o.mean = j.at("mean").get<double>();
  if (j.contains("decay")) o.decay = parse_noise_decay(j.at("decay").get<std::string>());
  if (j.contains("ops")) o.ops = j.at("ops").get<std::vector<std::string>>();
  if (j.contains("skip_drop_path")) o.skip_drop_path = j.at("skip_drop_path").get<double>();
  return o;
}

}  // namespace noisydarts
