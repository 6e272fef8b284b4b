#pragma once
/// The building blocks and networks of the NAS-Bench-201 and mbv2 spaces (SPEC 2.2, 2.3):
/// their search networks (SearchNetworkImpl) and the bodies of their evaluation networks
/// (EvalNetworkImpl builds them for `nb201` and `mbv2` genotypes). docs/spaces.md.
#include <torch/torch.h>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "noisydarts/genotype.h"
#include "noisydarts/mixed_op.h"
#include "noisydarts/search_network.h"
#include "noisydarts/spaces.h"

namespace noisydarts {

// ---- NAS-Bench-201 ----------------------------------------------------------------------

/// The residual reduction block between NB201 stages: conv_a = ReLU-conv3x3(stride 2)-BN,
/// conv_b = ReLU-conv3x3-BN, downsample = AvgPool(2, 2) then 1x1 conv; output conv_b(conv_a(x))
/// + downsample(x). Affine BN (as in the benchmark, also in the search network).
struct ResNetBasicBlockImpl : torch::nn::Module {
  ResNetBasicBlockImpl(int64_t c_in, int64_t c_out);
  torch::Tensor forward(const torch::Tensor& x, int64_t* macs = nullptr);
  torch::nn::AnyModule conv_a, conv_b;
  std::shared_ptr<torch::nn::Module> conv_a_module, conv_b_module;
  torch::nn::Sequential downsample{nullptr};
};
TORCH_MODULE(ResNetBasicBlock);

/// One NB201 search cell: node j = sum over i < j of mixed edge j<-i (registered `edges.j<-i`,
/// candidates `edges.j<-i.{k}` as in the benchmark's search code).
class Nb201SearchCellImpl : public torch::nn::Module {
 public:
  Nb201SearchCellImpl(int64_t c, const std::vector<std::string>& primitives, std::shared_ptr<NoiseState> noise);
  /// `weights`: [6, num_ops].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& weights);

 private:
  std::vector<MixedOp> edges_;
};
TORCH_MODULE(Nb201SearchCell);

class Nb201SearchNetworkImpl : public SearchNetworkImpl {
 public:
  explicit Nb201SearchNetworkImpl(SearchNetworkOptions options);
  torch::Tensor forward(const torch::Tensor& x) override;
  Genotype genotype() const override;

 private:
  torch::nn::Sequential stem_{nullptr}, lastact_{nullptr};
  torch::nn::ModuleList cells_{nullptr};
  std::vector<Nb201SearchCell> cell_list_;
  std::vector<ResNetBasicBlock> blocks_;  // reductions, in cells_ between the stages
  std::vector<int> kinds_;                // per cells_ entry: 0 = cell, 1 = reduction block
  torch::nn::Linear classifier_{nullptr};
};

// ---- MobileNetV2-like chain ---------------------------------------------------------------

/// Squeeze-excite (timm's names): conv_reduce (with bias), act, conv_expand (with bias), sigmoid
/// gate on the global average of x.
struct SqueezeExciteImpl : torch::nn::Module {
  SqueezeExciteImpl(int64_t channels, int64_t reduced, bool swish);
  torch::Tensor forward(const torch::Tensor& x, int64_t* macs = nullptr);
  torch::nn::Conv2d conv_reduce{nullptr}, conv_expand{nullptr};
  bool swish;
};
TORCH_MODULE(SqueezeExcite);

/// Inverted bottleneck (timm's names): conv_pw 1x1 to c_in*e, bn1, act; conv_dw k x k stride s,
/// bn2, act; squeeze-excite `se` (conv_reduce to round(c_in*se_ratio), act, conv_expand,
/// sigmoid gate) when se_ratio > 0; conv_pwl 1x1 to c_out, bn3; plus x when stride 1 and
/// c_in == c_out (the residual path gets drop-path in training).
struct InvertedResidualImpl : torch::nn::Module {
  InvertedResidualImpl(int64_t c_in, int64_t c_out, int64_t kernel, int64_t expansion, int64_t stride,
                       double se_ratio, bool swish, bool affine);
  torch::Tensor forward(const torch::Tensor& x, double drop_prob = 0, int64_t* macs = nullptr);
  torch::nn::Conv2d conv_pw{nullptr}, conv_dw{nullptr}, conv_pwl{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  SqueezeExcite se{nullptr};
  bool swish, residual;
};
TORCH_MODULE(InvertedResidual);

/// A function of (x, macs) applying registered modules.
using ModuleRun = std::function<torch::Tensor(const torch::Tensor&, int64_t*)>;
/// The fixed stem of the chain, affine BN: conv_stem 3x3 (stride 1 or 2) to 32, bn1, ReLU
/// (registered on `owner`), then the depthwise-separable block (conv_dw 3x3, bn1, ReLU, conv_pw
/// to 16, bn2) appended to `blocks` as stage 0 (blocks.0.0).
ModuleRun register_mbv2_stem(torch::nn::Module& owner, torch::nn::ModuleList& blocks, int64_t in_channels, int64_t stride);
/// The fixed head on `owner`: conv_head 1x1 320 -> 1280, bn2, ReLU, global average pool,
/// `classifier` Linear(1280, num_classes).
ModuleRun register_mbv2_head(torch::nn::Module& owner, int64_t num_classes);

/// One mixed layer of the chain: softmax-weighted sum of the six inverted bottlenecks and, where
/// the layout allows it, the (noisy) skip connection. Registered as `_ops.{k}`.
class Mbv2MixedLayerImpl : public torch::nn::Module {
 public:
  Mbv2MixedLayerImpl(int64_t c_in, const Mbv2Layer& layer, double se_ratio, bool swish,
                     std::shared_ptr<NoiseState> noise);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& weights);

 private:
  std::vector<InvertedResidual> blocks_;
  bool skip_;
  std::shared_ptr<NoiseState> noise_;
};
TORCH_MODULE(Mbv2MixedLayer);

class Mbv2SearchNetworkImpl : public SearchNetworkImpl {
 public:
  explicit Mbv2SearchNetworkImpl(SearchNetworkOptions options);
  torch::Tensor forward(const torch::Tensor& x) override;
  Genotype genotype() const override;
  /// Softmax over the allowed choices of each layer (a disallowed skip gets weight 0).
  torch::Tensor arch_weights(size_t i, bool as_double = false) const override;

 private:
  ModuleRun stem_, head_;
  torch::nn::ModuleList blocks_{nullptr}, layers_{nullptr};
  std::vector<Mbv2MixedLayer> layer_list_;
  torch::Tensor skip_mask_;  // [19, 7] true where a skip is not allowed
};

// ---- Evaluation bodies --------------------------------------------------------------------

/// Runs an evaluation body: logits of x, with the drop-path probability and, when `macs` is
/// given, the conv+linear multiply-adds per image added to it.
using EvalBody = std::function<torch::Tensor(const torch::Tensor& x, double drop_prob, int64_t* macs)>;
/// Registers the NB201 network of genotype `g` on `owner` with the benchmark's names (stem,
/// cells.{i}: cells with their 6 edges as `layers.{k}` and residual blocks, lastact, classifier):
/// C channels, N cells per stage.
EvalBody register_nb201_network(torch::nn::Module& owner, const Genotype& g, int64_t c, int64_t n,
                                int64_t in_channels, int64_t num_classes);
/// Registers the mbv2 chain of genotype `g` on `owner` with timm's EfficientNet names
/// (conv_stem, bn1, blocks.{stage}.{i}, conv_head, bn2, classifier); `stem_stride` 2 for
/// ImageNet-size inputs.
EvalBody register_mbv2_network(torch::nn::Module& owner, const Genotype& g, int64_t in_channels,
                               int64_t num_classes, int64_t stem_stride);

}  // namespace noisydarts
