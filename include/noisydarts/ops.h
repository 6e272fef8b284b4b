#pragma once
/// Candidate operations of the DARTS cell space (SPEC 2.1). Registered submodule names follow
/// the reference implementation so state dicts interoperate with PyTorch (SPEC 6).
#include <torch/torch.h>
#include <functional>
#include <string>
#include <vector>

namespace noisydarts {

/// Every op name this library can build.
const std::vector<std::string>& all_op_names();
/// True when `name` is in all_op_names().
bool is_known_op(const std::string& name);
/// NoisyDARTS' 7 candidates (no `none`), in the reference order.
const std::vector<std::string>& noisydarts_primitives();
/// DARTS' 8 candidates (`none` first), in the reference order.
const std::vector<std::string>& darts_primitives();

/// ReLU -> conv(k, stride, pad) -> BN, registered as `op.{0,1,2}`.
struct ReLUConvBNImpl : torch::nn::Module {
  /// `bias`: the convolution has a bias (NAS-Bench-201's search ops: bias = !affine).
  ReLUConvBNImpl(int64_t c_in, int64_t c_out, int64_t k, int64_t stride, int64_t pad, bool affine,
                 bool bias = false);
  /// With fused_ops_enabled() a 1x1 (no bias, stride 1; BN affine or not) runs as one fused node
  /// (fused_ops.h); otherwise module by module.
  torch::Tensor forward(const torch::Tensor& x);
  /// Whether forward() runs as the fused node now (fused_relu_pw_bn), so that it can join others
  /// on the same input in one fused_relu_pw_bn_group; its weight and BN are then conv_weight()
  /// and batch_norm().
  bool runs_fused() const;
  const torch::Tensor& conv_weight() const { return conv_->weight; }
  torch::nn::BatchNorm2dImpl& batch_norm() const { return *bn_; }
  torch::nn::Sequential op{nullptr};

 private:
  std::shared_ptr<torch::nn::Conv2dImpl> conv_;
  std::shared_ptr<torch::nn::BatchNorm2dImpl> bn_;
  bool fusable_ = false;
};
TORCH_MODULE(ReLUConvBN);

/// ReLU, two 1x1 stride-2 convs (on x and on x shifted by one pixel), concat, BN.
/// Registered as `conv_1`, `conv_2`, `bn`.
struct FactorizedReduceImpl : torch::nn::Module {
  FactorizedReduceImpl(int64_t c_in, int64_t c_out, bool affine);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Conv2d conv_1{nullptr}, conv_2{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
};
TORCH_MODULE(FactorizedReduce);

/// `none`: zeros of the (strided) output shape.
struct ZeroImpl : torch::nn::Module {
  explicit ZeroImpl(int64_t stride) : stride(stride) {}
  torch::Tensor forward(const torch::Tensor& x);
  int64_t stride;
};
TORCH_MODULE(Zero);

/// Builds candidate `name` with `c` channels and `stride` (1 or 2). `affine` selects affine BN
/// (evaluation network) or non-affine (search network). Throws ConfigError for unknown names.
torch::nn::AnyModule make_op(const std::string& name, int64_t c, int64_t stride, bool affine);

/// For an op made by make_op that can fold a per-image output scale into its last fused node
/// (the separable and dilated convolutions): a function (x, scale) -> op(x) * scale[n]; for
/// other ops an empty function. With fused ops off it runs the modules, then multiplies.
std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)> scaled_forward(
    const torch::nn::AnyModule& op);

/// For an op made by make_op with non-affine BN that can fold a mixed edge's weight into its
/// last fused node (the search network's separable and dilated convolutions): a function
/// (x, w) -> op(x) * w for a one-element w, differentiable in w (fused_relu_dw_pw_bn's
/// `mix_weight`); for other ops an empty function. With fused ops off it runs the modules, then
/// multiplies.
std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)> weighted_forward(
    const torch::nn::AnyModule& op);

/// Drop-path as a per-image scale [N]: mask / (1 - p), mask ~ Bernoulli(1 - p), drawn exactly as
/// drop_path draws its mask (the same random stream). p == 0: undefined.
torch::Tensor drop_path_scale(int64_t n, double p, const torch::TensorOptions& options);

/// Per-sample drop-path: zeroes each sample with probability p and scales the rest by
/// 1/(1-p). Not in place. p == 0 returns x.
torch::Tensor drop_path(const torch::Tensor& x, double p);

}  // namespace noisydarts
