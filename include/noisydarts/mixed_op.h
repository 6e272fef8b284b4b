#pragma once
/// The mixed edge of the search cell: softmax(alpha)-weighted sum of every candidate, with the
/// NoisyDARTS noise on the chosen candidates (noise.h).
#include <torch/torch.h>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "noisydarts/noise.h"

namespace noisydarts {

/// Noise state shared by every mixed op of one network: the options and the current decay
/// factor (set once per epoch by the searcher).
struct NoiseState {
  NoiseOptions options;
  double decay = 1.0;
  /// While true, training-mode forwards draw no noise and no skip drop-path (the Hessian
  /// analysis measures the deterministic loss; see hessian.h). Set through NoiseSuspend.
  bool suspended = false;
  /// gdas (method.h): a forward runs only the op of largest weight on each edge; the other
  /// candidates add their (zero) weights, so their alphas still get the straight-through
  /// gradient. Ignored while suspended.
  bool single_op = false;
  /// darts-minus: coefficient of the auxiliary skip of every edge (0: not computed).
  double aux_skip = 0;
  /// The search-time perturbation of candidate `op`'s output `y`: in training mode and when not
  /// suspended, the noise (on the ops the options name) and, on skip_connect, the skip
  /// drop-path. Otherwise `y` unchanged.
  torch::Tensor perturb(const std::string& op, torch::Tensor y, bool training) const;
  /// Whether perturb can change candidate `op`'s output (noise or skip drop-path apply).
  bool changes(const std::string& op, bool training) const;
};

/// One edge. Registered as `_ops.{k}` (candidates, reference layout) plus `bn1` (after
/// max_pool) and `bn2` (after avg_pool): non-affine BatchNorms that the search network puts
/// after parameter-free pools. `nb201_layout`: NAS-Bench-201's search edge instead (candidates
/// registered directly as `{k}`, no BatchNorm after pools). `partial_channels` K > 1
/// (pc-darts): the candidates see the first C/K channels, the others bypass them (2x2 max pool
/// on stride 2), and the concatenation is channel-shuffled in K groups.
class MixedOpImpl : public torch::nn::Module {
 public:
  MixedOpImpl(int64_t c, int64_t stride, std::vector<std::string> primitives,
              std::shared_ptr<NoiseState> noise, bool nb201_layout = false, int64_t partial_channels = 1);
  /// `weights`: [num_ops], the op weights of this edge's alphas.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& weights);
  const std::vector<std::string>& primitives() const { return primitives_; }

 private:
  std::vector<std::string> primitives_;
  std::vector<torch::nn::AnyModule> ops_;
  /// Per candidate: weighted_forward(op) (ops.h), empty where the op cannot take its weight.
  std::vector<std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>> weighted_;
  torch::nn::ModuleList ops_list_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr}, bn2_{nullptr};
  std::shared_ptr<NoiseState> noise_;
  int64_t stride_;
  int64_t partial_ = 1;
  /// Candidate k's output for x (pool + BN, the search-time perturbation).
  torch::Tensor candidate(size_t k, const torch::Tensor& x, bool fused);
  /// Candidate k's output for x times its weight `w` (one element), where the op takes the
  /// weight into its last fused node (pool + BN, the separable and dilated convolutions) and
  /// the noise leaves it alone; otherwise undefined (fused ops only).
  torch::Tensor weighed(size_t k, const torch::Tensor& x, const torch::Tensor& w);
  /// The weighted sum of the candidates on x.
  torch::Tensor mix(const torch::Tensor& x, const torch::Tensor& weights);
};

/// y [B, C, H, W] with its channels regrouped: view as [B, groups, C/groups, H, W], swap the
/// two channel axes (pc-darts).
torch::Tensor shuffle_channels(const torch::Tensor& y, int64_t groups);
TORCH_MODULE(MixedOp);

}  // namespace noisydarts
