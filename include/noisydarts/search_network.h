#pragma once
/// The DARTS search network (supernet): stem, L search cells of mixed edges, classifier, and the
/// architecture parameters alphas_normal / alphas_reduce (SPEC 1.1, 2.1). Module names follow
/// the reference layout (SPEC 6): stem.{0,1}, cells.{i}.preprocess{0,1}, cells.{i}._ops.{edge},
/// classifier, alphas_normal, alphas_reduce.
#include <torch/torch.h>
#include <memory>
#include <string>
#include <vector>

#include "noisydarts/genotype.h"
#include "noisydarts/mixed_op.h"

namespace noisydarts {

struct SearchNetworkOptions {
  SearchNetworkOptions(int64_t channels, int64_t num_classes, int64_t layers)
      : channels_(channels), num_classes_(num_classes), layers_(layers) {}
  TORCH_ARG(int64_t, channels);       ///< C: channels of the first cells (>= 2, even)
  TORCH_ARG(int64_t, num_classes);    ///< classifier outputs (>= 2)
  TORCH_ARG(int64_t, layers);         ///< L: number of cells (>= 1); reductions at L/3, 2L/3
  TORCH_ARG(int64_t, in_channels) = 3;  ///< image channels
  TORCH_ARG(int64_t, steps) = 4;      ///< intermediate nodes per cell
  TORCH_ARG(int64_t, multiplier) = 4; ///< nodes concatenated into the output
  TORCH_ARG(int64_t, stem_multiplier) = 3;
  TORCH_ARG(std::vector<std::string>, primitives) = noisydarts_default_primitives();
  TORCH_ARG(NoiseOptions, noise) = {};
  TORCH_ARG(double, alpha_init_std) = 1e-3;  ///< alphas ~ alpha_init_std * N(0, 1)

  static std::vector<std::string> noisydarts_default_primitives();
};

/// One search cell (registered as `cells.{i}`).
class SearchCellImpl : public torch::nn::Module {
 public:
  SearchCellImpl(int64_t steps, int64_t multiplier, int64_t c_pp, int64_t c_p, int64_t c,
                 bool reduction, bool reduction_prev, const std::vector<std::string>& primitives,
                 std::shared_ptr<NoiseState> noise);
  /// `weights`: [num_edges, num_ops] softmax of the shared alphas.
  torch::Tensor forward(const torch::Tensor& s0, const torch::Tensor& s1,
                        const torch::Tensor& weights);
  bool reduction() const { return reduction_; }

 private:
  bool reduction_;
  int64_t steps_, multiplier_;
  torch::nn::AnyModule preprocess0_;
  torch::nn::AnyModule preprocess1_;
  std::vector<MixedOp> edges_;
};
TORCH_MODULE(SearchCell);

class SearchNetworkImpl : public torch::nn::Module {
 public:
  explicit SearchNetworkImpl(SearchNetworkOptions options);
  /// Logits [B, num_classes]. Noise and skip drop-path act only in training mode.
  torch::Tensor forward(const torch::Tensor& x);

  /// Network weights w (everything except the alphas), in registration order.
  std::vector<torch::Tensor> weight_parameters();
  /// {alphas_normal, alphas_reduce}, each [num_edges, num_ops].
  std::vector<torch::Tensor> arch_parameters() { return {alphas_normal_, alphas_reduce_}; }
  torch::Tensor& alphas_normal() { return alphas_normal_; }
  torch::Tensor& alphas_reduce() { return alphas_reduce_; }

  /// The genotype derived from the current alphas (SPEC 1.1).
  Genotype genotype() const;
  /// Sets the noise decay factor for the coming forwards (noise_decay_factor of noise.h).
  void set_noise_decay(double decay) { noise_->decay = decay; }
  const NoiseState& noise() const { return *noise_; }
  NoiseState& noise() { return *noise_; }
  const SearchNetworkOptions& options() const { return options_; }
  int64_t num_edges() const;

 private:
  SearchNetworkOptions options_;
  std::shared_ptr<NoiseState> noise_;
  torch::nn::Sequential stem_{nullptr};
  torch::nn::ModuleList cells_{nullptr};
  std::vector<SearchCell> cell_list_;
  torch::nn::Linear classifier_{nullptr};
  torch::Tensor alphas_normal_, alphas_reduce_;
};
TORCH_MODULE(SearchNetwork);

}  // namespace noisydarts
