#include "noisydarts/noise.h"

#include <algorithm>
#include <cmath>

#include "noisydarts/error.h"

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

torch::Tensor sample_noise(const torch::Tensor& y, const NoiseOptions& opt, double decay) {
  torch::NoGradGuard no_grad;
  const auto yd = y.detach();
  double sigma = opt.lambda;
  if (opt.mixture == NoiseMixture::kAdditive && opt.scale == NoiseScale::kRelative)
    sigma = opt.lambda * yd.std().item<double>();
  torch::Tensor n;
  if (opt.type == NoiseType::kGaussian) {
    n = torch::randn_like(yd).mul_(sigma).add_(opt.mean);
  } else {
    const double half = std::sqrt(3.0) * sigma;  // U(-a, a) has std a / sqrt(3)
    n = torch::rand_like(yd).mul_(2.0 * half).add_(opt.mean - half);
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
