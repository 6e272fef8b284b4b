#include "noisydarts/mixed_op.h"

#include "noisydarts/fused_ops.h"
#include "noisydarts/ops.h"

namespace noisydarts {

bool NoiseState::changes(const std::string& op, bool training) const {
  return training && !suspended && (options.applies_to(op) || op == "skip_connect");
}

torch::Tensor NoiseState::perturb(const std::string& op, torch::Tensor y, bool training) const {
  if (!changes(op, training)) return y;
  const bool noisy = options.applies_to(op);
  if (op != "skip_connect") return noisy ? apply_noise(y, options, decay) : y;
  return noisy ? apply_noise_drop_path(y, options, decay, options.skip_drop_path) : drop_path(y, options.skip_drop_path);
}

MixedOpImpl::MixedOpImpl(int64_t c_in, int64_t stride, std::vector<std::string> primitives,
                         std::shared_ptr<NoiseState> noise, bool nb201_layout, int64_t partial_channels)
    : primitives_(std::move(primitives)), noise_(std::move(noise)), stride_(stride), partial_(partial_channels) {
  TORCH_CHECK_VALUE(partial_ >= 1 && c_in % partial_ == 0, "partial channels K=", partial_, " must divide the edge's ", c_in, " channels");
  const int64_t c = c_in / partial_;
  if (!nb201_layout) ops_list_ = register_module("_ops", torch::nn::ModuleList());
  for (const auto& p : primitives_) {
    ops_.push_back(make_op(p, c, stride, /*affine=*/false));
    weighted_.push_back(weighted_forward(ops_.back()));
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

torch::Tensor MixedOpImpl::candidate(size_t k, const torch::Tensor& x, bool fused) {
  const auto& name = primitives_[k];
  torch::Tensor y;
  // Pool + BN as one node that keeps only its output (fused_ops.h).
  if (name == "max_pool_3x3" && bn1_ && fused) y = fused_pool_bn(x, true, stride_, *bn1_);
  else if (name == "avg_pool_3x3" && bn2_ && fused) y = fused_pool_bn(x, false, stride_, *bn2_);
  else {
    y = ops_[k].forward(x);
    if (name == "max_pool_3x3" && bn1_) y = bn1_->forward(y);
    else if (name == "avg_pool_3x3" && bn2_) y = bn2_->forward(y);
  }
  return noise_->perturb(name, std::move(y), is_training());
}

torch::Tensor MixedOpImpl::weighed(size_t k, const torch::Tensor& x, const torch::Tensor& w) {
  const auto& name = primitives_[k];
  if (!mix_weight_fold_enabled() || noise_->changes(name, is_training())) return {};
  if (name == "max_pool_3x3" && bn1_) return fused_pool_bn(x, true, stride_, *bn1_, w);
  if (name == "avg_pool_3x3" && bn2_) return fused_pool_bn(x, false, stride_, *bn2_, w);
  return weighted_[k] ? weighted_[k](x, w) : torch::Tensor();
}

torch::Tensor MixedOpImpl::forward(const torch::Tensor& x, const torch::Tensor& weights) {
  if (partial_ == 1) return mix(x, weights);
  const int64_t c = x.size(1), cp = c / partial_;
  auto y = mix(x.narrow(1, 0, cp).contiguous(), weights);
  auto rest = x.narrow(1, cp, c - cp);
  if (stride_ == 2) rest = torch::max_pool2d(rest, {2, 2}, {2, 2});
  return shuffle_channels(torch::cat({y, rest}, 1), partial_);
}

torch::Tensor MixedOpImpl::mix(const torch::Tensor& x, const torch::Tensor& weights) {
  const bool fused = fused_ops_enabled();
  if (noise_->single_op && !noise_->suspended) {
    // gdas: only the chosen op runs; the others add their weights (value 0 in the hard one-hot,
    // gradient 1 to their soft probabilities: the straight-through estimator).
    const int64_t k = weights.argmax().item<int64_t>();
    auto y = weights[k] * candidate(static_cast<size_t>(k), x, fused);
    return y + (weights.sum() - weights[k]);
  }
  torch::Tensor sum;
  std::vector<torch::Tensor> outs;
  std::vector<int64_t> used;
  std::vector<bool> prescaled;
  for (size_t k = 0; k < ops_.size(); ++k) {
    // `none` outputs zeros: its term w * 0 and its contribution to every gradient are exactly
    // zero, so it is skipped (alpha_none still receives its softmax-normalisation gradient).
    if (primitives_[k] == "none") continue;
    if (fused) {
      // An op that takes its weight into its last fused node is added as it is, and gets the
      // sum's gradient itself, uncopied (weighted_sum's `prescaled`).
      torch::Tensor y = weighed(k, x, weights.narrow(0, static_cast<int64_t>(k), 1));
      prescaled.push_back(y.defined());
      used.push_back(static_cast<int64_t>(k));
      outs.push_back(y.defined() ? std::move(y) : candidate(k, x, fused));
      continue;
    }
    torch::Tensor y = candidate(k, x, fused);
    auto term = weights[k] * y;
    sum = sum.defined() ? sum + term : term;
  }
  if (fused && !outs.empty()) {  // one node for the weighted sum (fused_ops.h)
    auto w = static_cast<int64_t>(outs.size()) == weights.size(0)
                 ? weights
                 : weights.index_select(0, torch::tensor(used, torch::TensorOptions().dtype(torch::kLong).device(weights.device())));
    return weighted_sum(w, outs, prescaled);
  }
  if (!sum.defined()) {  // every candidate is `none`
    auto z = ops_[0].forward(x);
    return z * weights[0];
  }
  return sum;
}

torch::Tensor shuffle_channels(const torch::Tensor& y, int64_t groups) {
  if (groups == 1) return y;
  const auto b = y.size(0), c = y.size(1), h = y.size(2), w = y.size(3);
  return y.view({b, groups, c / groups, h, w}).transpose(1, 2).contiguous().view({b, c, h, w});
}

}  // namespace noisydarts
