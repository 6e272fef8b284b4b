#pragma once
/// The NoisyDARTS noise (paper section 3; SPEC 1.2). Everything about the noise lives here:
/// its options, its schedule and the one function that applies it.
#include <torch/torch.h>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace noisydarts {

enum class NoiseType { kNone, kGaussian, kUniform };
enum class NoiseMixture { kAdditive, kMultiplicative };
/// kRelative: sigma = lambda * std(op output) (one scalar over the whole batch tensor);
/// kAbsolute: sigma = lambda.
enum class NoiseScale { kRelative, kAbsolute };
enum class NoiseDecay { kNone, kCosine };

struct NoiseOptions {
  NoiseType type = NoiseType::kGaussian;
  NoiseMixture mixture = NoiseMixture::kAdditive;
  /// Additive noise defaults to relative scale; multiplicative noise always uses lambda as an
  /// absolute std (SPEC 1.2).
  NoiseScale scale = NoiseScale::kRelative;
  double lambda = 0.2;   ///< std factor (relative) or std (absolute); >= 0
  double mean = 0.0;     ///< mu; normally 0 (additive) or 1 (multiplicative)
  NoiseDecay decay = NoiseDecay::kNone;
  /// Candidate ops whose output gets the noise; NoisyDARTS uses only the skip connection.
  std::vector<std::string> ops{"skip_connect"};
  /// Drop-path probability on the skip branch during search (reference code: 0.3); training only.
  double skip_drop_path = 0.0;

  bool enabled() const { return type != NoiseType::kNone; }
  bool applies_to(const std::string& op) const;
  /// Throws UsageError on out-of-range values (names the option).
  void validate() const;
};

/// The cosine decay factor (1 + cos(pi * epoch / total_epochs)) / 2 for kCosine, else 1.
/// `epoch` may be fractional; clamped to [0, total_epochs].
double noise_decay_factor(const NoiseOptions& opt, double epoch, double total_epochs);

/// The noise term n for a skip output `y` (no gradient: computed under NoGradGuard from
/// y.detach()). Gaussian: n ~ N(mu, sigma^2); uniform: mu + U(-sqrt(3) sigma, sqrt(3) sigma)
/// (same mean and std). Scaled as a whole (mean included) by `decay`.
torch::Tensor sample_noise(const torch::Tensor& y, const NoiseOptions& opt, double decay);

/// Applies the noise to an op output: y + n (additive) or y * n (multiplicative), with n from
/// sample_noise. Returns `y` unchanged when the noise is disabled. The caller decides training
/// vs eval (eval mode never calls this). The gradient w.r.t. y is exactly 1 (additive) or n
/// (multiplicative); nothing flows into n or sigma.
torch::Tensor apply_noise(const torch::Tensor& y, const NoiseOptions& opt, double decay);

/// drop_path(apply_noise(y, opt, decay), drop_prob) (the skip connection's perturbation in
/// NoisyDARTS' recipe): with additive noise, the fused ops on and y's images of an even size on
/// the CPU in float, one pass that writes the noisy, dropped output and one autograd node (d out
/// / d y = mask / keep); the same random draws in the same order (the noise's, then the mask)
/// and the same bits as the two steps, which it runs otherwise.
torch::Tensor apply_noise_drop_path(const torch::Tensor& y, const NoiseOptions& opt, double decay, double drop_prob);

std::string to_string(NoiseType t);
std::string to_string(NoiseMixture m);
std::string to_string(NoiseScale s);
std::string to_string(NoiseDecay d);
NoiseType parse_noise_type(const std::string& s);        ///< gaussian|uniform|none
NoiseMixture parse_noise_mixture(const std::string& s);  ///< additive|multiplicative
NoiseScale parse_noise_scale(const std::string& s);      ///< relative|absolute
NoiseDecay parse_noise_decay(const std::string& s);      ///< none|cosine

nlohmann::json noise_to_json(const NoiseOptions& o);
NoiseOptions noise_from_json(const nlohmann::json& j);

}  // namespace noisydarts
