#pragma once
/// Search networks (supernets) of every search space (spaces.h). SearchNetworkImpl is the
/// interface the search loop, the architect and the Hessian analysis use; make_search_network
/// builds the one of a space:
/// - DARTS (SPEC 1.1, 2.1): stem, L search cells of mixed edges, classifier, and the
///   architecture parameters alphas_normal / alphas_reduce. Module names follow the reference
///   layout (SPEC 6): stem.{0,1}, cells.{i}.preprocess{0,1}, cells.{i}._ops.{edge}, classifier.
/// - NAS-Bench-201 (SPEC 2.2): stem, 3 stages of N cells with residual reduction blocks between
///   them, lastact, classifier; one `alphas` [6, 5] shared by every cell.
/// - mbv2 (SPEC 2.3): fixed stem and depthwise-separable block, 19 mixed layers, head; one
///   `alphas` [19, 7].
#include <torch/torch.h>
#include <memory>
#include <string>
#include <vector>

#include "noisydarts/genotype.h"
#include "noisydarts/method.h"
#include "noisydarts/mixed_op.h"
#include "noisydarts/ops.h"
#include "noisydarts/spaces.h"

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
  /// Genotype family (spaces.h genotype_space): darts | nb201 | mbv2. nb201 reads `channels`
  /// (C, benchmark 16) and `layers` (N cells per stage, benchmark 5); mbv2 ignores both.
  TORCH_ARG(std::string, space) = "darts";
  TORCH_ARG(double, se_ratio) = 0;     ///< mbv2: squeeze-excite ratio of the candidates (0: none)
  TORCH_ARG(bool, swish) = false;      ///< mbv2: swish instead of ReLU in the candidates
  TORCH_ARG(int64_t, image_size) = 32; ///< mbv2: the stem has stride 2 only for images >= 64 px
  /// DARTS cells (method.h): pc-darts' partial channels (1/K of an edge's channels go through
  /// its mixed op; 1: all), pc-darts' edge weights (`betas_normal`/`betas_reduce` [edges, 1],
  /// softmax over each node's inputs) and darts-minus' auxiliary skip on every edge (identity,
  /// or FactorizedReduce on stride 2, registered as `aux_skip.{n}` after the alphas).
  TORCH_ARG(int64_t, partial_channels) = 1;
  TORCH_ARG(bool, edge_norm) = false;
  TORCH_ARG(bool, aux_skip) = false;
  /// DARTS cells whose edges have their own candidates (space_edge_ops: RobustDARTS' S1): edge
  /// e of a normal / reduction cell holds only these ops (registered `_ops.0`, `_ops.1`, ... as
  /// the reference's); its alpha row keeps a column per `primitives` op, the others at -inf.
  /// Empty: every edge has `primitives`.
  TORCH_ARG(EdgeOps, edge_ops_normal) = {};
  TORCH_ARG(EdgeOps, edge_ops_reduce) = {};

  static std::vector<std::string> noisydarts_default_primitives();
};

/// One search cell (registered as `cells.{i}`).
class SearchCellImpl : public torch::nn::Module {
 public:
  SearchCellImpl(int64_t steps, int64_t multiplier, int64_t c_pp, int64_t c_p, int64_t c,
                 bool reduction, bool reduction_prev, const std::vector<std::string>& primitives,
                 std::shared_ptr<NoiseState> noise, int64_t partial_channels = 1, const EdgeOps& edge_ops = {});
  /// `weights`: [num_edges, num_ops] op weights of the shared alphas; `edge_weights` (pc-darts,
  /// else undefined): [num_edges] weight of each edge's output.
  torch::Tensor forward(const torch::Tensor& s0, const torch::Tensor& s1,
                        const torch::Tensor& weights, const torch::Tensor& edge_weights = {});
  bool reduction() const { return reduction_; }
  int64_t channels() const { return channels_; }
  /// darts-minus: the auxiliary skip of each edge (FactorizedReduce on stride-2 edges, an
  /// undefined module for the identity); its coefficient is NoiseState::aux_skip.
  void set_aux_skip(std::vector<FactorizedReduce> aux) { aux_ = std::move(aux); }

 private:
  bool reduction_;
  int64_t steps_, multiplier_, channels_;
  torch::nn::AnyModule preprocess0_;
  torch::nn::AnyModule preprocess1_;
  std::vector<MixedOp> edges_;
  std::vector<FactorizedReduce> aux_;
  std::shared_ptr<NoiseState> noise_;
  std::vector<torch::Tensor> cols_;  // per edge: its ops' columns of the weight table (edge_ops)
};
TORCH_MODULE(SearchCell);

/// What every search network offers: the logits, its weights and architecture parameters, the
/// genotype of its current alphas and the noise state of its mixed ops.
class SearchNetworkImpl : public torch::nn::Module {
 public:
  explicit SearchNetworkImpl(SearchNetworkOptions options);
  ~SearchNetworkImpl() override = default;
  /// Logits [B, num_classes]. Noise and skip drop-path act only in training mode.
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
  /// The genotype derived from the current alphas (SPEC 1.1; spaces' own rules).
  virtual Genotype genotype() const = 0;

  /// Network weights w (everything except the alphas), in registration order.
  std::vector<torch::Tensor> weight_parameters();
  /// The architecture parameters, in arch_names() order (DARTS: alphas_normal, alphas_reduce;
  /// nb201, mbv2: alphas), each [rows, candidates].
  std::vector<torch::Tensor> arch_parameters() const { return arch_; }
  const std::vector<std::string>& arch_names() const { return arch_names_; }
  /// The architecture parameter registered as `name`; throws ConfigError when there is none.
  torch::Tensor& arch_parameter(const std::string& name);
  /// DARTS' two alphas (arch_parameter("alphas_normal"/"alphas_reduce")).
  torch::Tensor& alphas_normal() { return arch_parameter("alphas_normal"); }
  torch::Tensor& alphas_reduce() { return arch_parameter("alphas_reduce"); }
  /// The op weights the forward uses for arch parameter `i` (the method's: softmax, sigmoid,
  /// a Gumbel or Dirichlet sample in a training-mode forward; mbv2: disallowed skips 0);
  /// `as_double`: the method's deterministic derivation weights in double precision (for the
  /// genotype, the margins and the logs; pc-darts: times the edge weights).
  virtual torch::Tensor arch_weights(size_t i, bool as_double = false) const {
    return method_weights(i, arch_[i], as_double);
  }
  /// The op alphas the method's loss term sees (method.h arch_penalty): every `alphas*`
  /// parameter; for per-edge op sets (S1) the [rows, 2] table of each edge's own ops.
  virtual std::vector<torch::Tensor> op_alphas() const;
  /// The search method shaping the forward (method.h); none: softmax, as DARTS.
  void set_method(std::shared_ptr<SearchMethod> m);
  SearchMethod* method() const { return method_.get(); }
  /// Candidate names of the columns of every arch parameter.
  const std::vector<std::string>& candidates() const { return options_.primitives(); }

  /// Sets the noise decay factor for the coming forwards (noise_decay_factor of noise.h).
  void set_noise_decay(double decay) { noise_->decay = decay; }
  const NoiseState& noise() const { return *noise_; }
  NoiseState& noise() { return *noise_; }
  const SearchNetworkOptions& options() const { return options_; }
  /// Rows of the first architecture parameter (DARTS: edges of a cell).
  int64_t num_edges() const { return arch_.front().size(0); }

 protected:
  /// Registers an architecture parameter [rows, cols] ~ alpha_init_std * N(0, 1) (cols < 0:
  /// one per candidate).
  void add_arch_parameter(const std::string& name, int64_t rows, int64_t cols = -1);
  /// arch_weights of the (possibly masked) values `a` of arch parameter `i`.
  torch::Tensor method_weights(size_t i, const torch::Tensor& a, bool as_double) const;
  std::shared_ptr<SearchMethod> method_;
  SearchNetworkOptions options_;
  std::shared_ptr<NoiseState> noise_;

 private:
  std::vector<torch::Tensor> arch_;
  std::vector<std::string> arch_names_;
};
TORCH_MODULE(SearchNetwork);

/// The DARTS supernet (also the RobustDARTS spaces S1-S4, which only change the op set).
class DartsSearchNetworkImpl : public SearchNetworkImpl {
 public:
  explicit DartsSearchNetworkImpl(SearchNetworkOptions options);
  torch::Tensor forward(const torch::Tensor& x) override;
  Genotype genotype() const override;
  torch::Tensor arch_weights(size_t i, bool as_double = false) const override;
  /// pc-darts: the weight of every edge of a normal (`reduce` false) or reduction cell, softmax
  /// of betas over each node's incoming edges; undefined without edge weights.
  torch::Tensor edge_weights(bool reduce, bool as_double = false) const;
  std::vector<torch::Tensor> op_alphas() const override;

 private:
  torch::Tensor dead_[2];  // per-edge op sets: true where a column is not the edge's op

  torch::nn::Sequential stem_{nullptr};
  torch::nn::ModuleList cells_{nullptr};
  std::vector<SearchCell> cell_list_;
  torch::nn::Linear classifier_{nullptr};
};

/// Builds the search network of `options.space()` (darts | nb201 | mbv2). Throws ConfigError /
/// c10::ValueError on bad options.
SearchNetwork make_search_network(SearchNetworkOptions options);

}  // namespace noisydarts
