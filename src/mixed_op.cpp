#include "noisydarts/mixed_op.h"

#include "noisydarts/fused_ops.h"
#include "noisydarts/ops.h"

namespace noisydarts {

torch::Tensor NoiseState::perturb(const std::string& op, torch::Tensor y, bool training) const {
  if (!training || suspended) return y;
  if (options.applies_to(op)) y = apply_noise(y, options, decay);
  if (op == "skip_connect") y = drop_path(y, options.skip_drop_path);
  return y;
}

MixedOpImpl::MixedOpImpl(int64_t c, int64_t stride, std::vector<std::string> primitives,
                         std::shared_ptr<NoiseState> noise, bool nb201_layout)
    : primitives_(std::move(primitives)), noise_(std::move(noise)), stride_(stride) {
  if (!nb201_layout) ops_list_ = register_module("_ops", torch::nn::ModuleList());
  for (const auto& p : primitives_) {
    ops_.push_back(make_op(p, c, stride, /*affine=*/false));
    if (nb201_layout) {
      register_module(std::to_string(ops_.size() - 1), ops_.back().ptr());
      continue;
    }
    ops_list_->push_back(ops_.back().ptr());
    if (p == "max_pool_3x3")
      bn1_ = register_module("bn1", torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(c).affine(false)));
    if (p == "avg_pool_3x3")
      bn2_ = register_module("bn2", torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(c).affine(false)));
  }
}

torch::Tensor MixedOpImpl::forward(const torch::Tensor& x, const torch::Tensor& weights) {
  torch::Tensor sum;
  const bool fused = fused_ops_enabled();
  std::vector<torch::Tensor> outs;
  std::vector<int64_t> used;
  for (size_t k = 0; k < ops_.size(); ++k) {
    const auto& name = primitives_[k];
    // `none` outputs zeros: its term w * 0 and its contribution to every gradient are exactly
    // zero, so it is skipped (alpha_none still receives its softmax-normalisation gradient).
    if (name == "none") continue;
    torch::Tensor y;
    // Pool + BN as one node that keeps only its output (fused_ops.h).
    if (name == "max_pool_3x3" && bn1_ && fused) y = fused_pool_bn(x, true, stride_, *bn1_);
    else if (name == "avg_pool_3x3" && bn2_ && fused) y = fused_pool_bn(x, false, stride_, *bn2_);
    else {
      y = ops_[k].forward(x);
      if (name == "max_pool_3x3" && bn1_) y = bn1_->forward(y);
      else if (name == "avg_pool_3x3" && bn2_) y = bn2_->forward(y);
    }
    y = noise_->perturb(name, std::move(y), is_training());
    if (fused) {
      used.push_back(static_cast<int64_t>(k));
      outs.push_back(std::move(y));
      continue;
    }
    auto term = weights[k] * y;
    sum = sum.defined() ? sum + term : term;
  }
  if (fused && !outs.empty()) {  // one node for the weighted sum (fused_ops.h)
    auto w = static_cast<int64_t>(outs.size()) == weights.size(0)
                 ? weights
                 : weights.index_select(0, torch::tensor(used, torch::TensorOptions().dtype(torch::kLong).device(weights.device())));
    return weighted_sum(w, outs);
  }
  if (!sum.defined()) {  // every candidate is `none`
    auto z = ops_[0].forward(x);
    return z * weights[0];
  }
  return sum;
}

}  // namespace noisydarts
