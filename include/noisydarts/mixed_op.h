#pragma once
/// The mixed edge of the search cell: softmax(alpha)-weighted sum of every candidate, with the
/// NoisyDARTS noise on the chosen candidates (noise.h).
#include <torch/torch.h>
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
  /// The search-time perturbation of candidate `op`'s output `y`: in training mode and when not
  /// suspended, the noise (on the ops the options name) and, on skip_connect, the skip
  /// drop-path. Otherwise `y` unchanged.
  torch::Tensor perturb(const std::string& op, torch::Tensor y, bool training) const;
};

/// One edge. Registered as `_ops.{k}` (candidates, reference layout) plus `bn1` (after
/// max_pool) and `bn2` (after avg_pool): non-affine BatchNorms that the search network puts
/// after parameter-free pools. `nb201_layout`: NAS-Bench-201's search edge instead (candidates
/// registered directly as `{k}`, no BatchNorm after pools).
class MixedOpImpl : public torch::nn::Module {
 public:
  MixedOpImpl(int64_t c, int64_t stride, std::vector<std::string> primitives,
              std::shared_ptr<NoiseState> noise, bool nb201_layout = false);
  /// `weights`: [num_ops], softmax of this edge's alphas.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& weights);
  const std::vector<std::string>& primitives() const { return primitives_; }

 private:
  std::vector<std::string> primitives_;
  std::vector<torch::nn::AnyModule> ops_;
  torch::nn::ModuleList ops_list_{nullptr};
  torch::nn::BatchNorm2d bn1_{nullptr}, bn2_{nullptr};
  std::shared_ptr<NoiseState> noise_;
  int64_t stride_;
};
TORCH_MODULE(MixedOp);

}  // namespace noisydarts
