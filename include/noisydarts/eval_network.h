#pragma once
/// The evaluation network trained from scratch on a genotype. `nb201` genotypes build the
/// NAS-Bench-201 network (C = channels, N = layers cells per stage; no auxiliary head) and `mbv2`
/// genotypes the MobileNetV2-like chain (channels and layers unused; ImageNet style: stem stride
/// 2); see space_networks.h. DARTS cells (SPEC 3): NetworkCIFAR-style
/// (stem 3x3 conv to 3C + BN, L cells) or NetworkImageNet-style (two strided stems, 224 px),
/// affine BatchNorm everywhere, auxiliary head after cell 2L/3, drop-path on non-identity ops.
/// Registered names follow the reference layout (SPEC 6): stem.{0,1} (ImageNet: stem0.*,
/// stem1.*), cells.{i}.preprocess{0,1}.*, cells.{i}._ops.{k}.*, auxiliary_head.features.{j},
/// auxiliary_head.classifier, classifier; so a state dict loads into the reference PyTorch code.
#include <torch/torch.h>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "noisydarts/genotype.h"
#include "noisydarts/ops.h"

namespace noisydarts {

/// Stem and head layout of an evaluation network.
enum class EvalStyle { kCifar, kImageNet };

struct EvalNetworkOptions {
  EvalNetworkOptions(int64_t channels, int64_t num_classes, int64_t layers, Genotype genotype)
      : channels_(channels), num_classes_(num_classes), layers_(layers), genotype_(std::move(genotype)) {}
  TORCH_ARG(int64_t, channels);        ///< C: channels of the first cells (>= 2, even)
  TORCH_ARG(int64_t, num_classes);     ///< classifier outputs (>= 2)
  TORCH_ARG(int64_t, layers);          ///< L: number of cells (>= 1); reductions at L/3, 2L/3
  TORCH_ARG(Genotype, genotype);       ///< the cells; multiplier = concat size
  TORCH_ARG(int64_t, in_channels) = 3; ///< image channels (1 for Fashion-MNIST)
  TORCH_ARG(bool, auxiliary) = false;  ///< build the auxiliary head after cell 2L/3
  TORCH_ARG(EvalStyle, style) = EvalStyle::kCifar;
  TORCH_ARG(double, drop_path_prob) = 0.0;  ///< initial drop-path probability, [0, 1)
};

/// Logits of the classifier and, in training mode with an auxiliary head, of the head
/// (undefined otherwise).
struct EvalOutput {
  torch::Tensor logits;
  torch::Tensor aux_logits;
};

/// One cell built from a genotype (registered as `cells.{i}`).
class EvalCellImpl : public torch::nn::Module {
 public:
  EvalCellImpl(const Genotype& genotype, int64_t c_pp, int64_t c_p, int64_t c, bool reduction,
               bool reduction_prev);
  /// `drop_prob` acts only in training mode and never on identity skips.
  /// `macs`, when given, accumulates the conv/linear multiply-adds of this call per image.
  torch::Tensor forward(const torch::Tensor& s0, const torch::Tensor& s1, double drop_prob,
                        int64_t* macs = nullptr);
  /// forward() from the preprocessed inputs p0 = preprocess(0, s0), p1 = preprocess(1, s1)
  /// (`s0`, `s1` are read for `macs` only, and may be undefined without it): the network computes
  /// the preprocessings that read the same tensor together (fused_relu_pw_bn_group).
  torch::Tensor forward_preprocessed(const torch::Tensor& p0, const torch::Tensor& p1, const torch::Tensor& s0,
                                     const torch::Tensor& s1, double drop_prob, int64_t* macs = nullptr);
  /// Input k's (0 or 1) preprocessing applied to s.
  torch::Tensor preprocess(int k, const torch::Tensor& s);
  /// Input k's preprocessing when it is a 1x1 ReLUConvBN running as a fused node now, else null.
  ReLUConvBNImpl* fused_preprocess(int k) const;
  bool reduction() const { return reduction_; }
  /// Number of nodes concatenated into the output.
  int64_t multiplier() const { return static_cast<int64_t>(concat_.size()); }

 private:
  struct Op {
    std::function<torch::Tensor(const torch::Tensor&)> run;
    /// op(x) * scale[n] with the drop-path scale folded into its last fused node (ops.h
    /// scaled_forward); empty for ops that cannot.
    std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)> run_scaled;
    std::shared_ptr<torch::nn::Module> module;
    bool identity = false;
  };
  bool reduction_;
  std::vector<int> indices_, concat_;
  /// Per state: its position in the output (concat_), or -1; empty when the output is not made of
  /// distinct nodes only (then it is a plain torch::cat).
  std::vector<int> slot_;
  torch::nn::AnyModule preprocess0_, preprocess1_;
  std::shared_ptr<torch::nn::Module> pre0_module_, pre1_module_;
  std::vector<Op> ops_;
};
TORCH_MODULE(EvalCell);

/// Auxiliary classifier (registered as `auxiliary_head`): features.{0..7} = ReLU,
/// AvgPool(5, stride 3; ImageNet: stride 2; no padding counted), 1x1 conv to 128, BN, ReLU,
/// 2x2 conv to 768, BN (CIFAR only), ReLU; then `classifier` Linear(768, classes).
/// Inputs of 8x8 and larger follow the reference exactly (the 2x2 conv output is averaged to 1x1
/// when larger than 1x1); smaller inputs (e.g. 7x7 from 28 px images) are average-pooled
/// adaptively to 2x2 instead of the fixed pool.
class AuxiliaryHeadImpl : public torch::nn::Module {
 public:
  AuxiliaryHeadImpl(int64_t c, int64_t num_classes, EvalStyle style);
  torch::Tensor forward(const torch::Tensor& x, int64_t* macs = nullptr);

 private:
  EvalStyle style_;
  torch::nn::Sequential features_{nullptr};
  torch::nn::Linear classifier_{nullptr};
};
TORCH_MODULE(AuxiliaryHead);

class EvalNetworkImpl : public torch::nn::Module {
 public:
  explicit EvalNetworkImpl(EvalNetworkOptions options);
  /// Logits; auxiliary logits only in training mode with an auxiliary head.
  EvalOutput forward(const torch::Tensor& x);
  /// Like forward(), also adding the conv+linear multiply-adds of the run per image to `macs`.
  EvalOutput forward_counting(const torch::Tensor& x, int64_t& macs);

  /// Drop-path probability used by the next training-mode forwards, [0, 1).
  void set_drop_path_prob(double p);
  double drop_path_prob() const { return drop_path_prob_; }
  const EvalNetworkOptions& options() const { return options_; }
  /// Index of the cell after which the auxiliary head reads (2L/3).
  int64_t auxiliary_position() const { return 2 * options_.layers() / 3; }

 private:
  EvalOutput run(const torch::Tensor& x, int64_t* macs);
  EvalNetworkOptions options_;
  double drop_path_prob_ = 0.0;
  torch::nn::Sequential stem_{nullptr}, stem0_{nullptr}, stem1_{nullptr};
  torch::nn::ModuleList cells_{nullptr};
  std::vector<EvalCell> cell_list_;
  AuxiliaryHead auxiliary_head_{nullptr};
  torch::nn::Linear classifier_{nullptr};
  /// nb201 / mbv2 genotypes: the whole network (space_networks.h); empty for DARTS cells.
  std::function<torch::Tensor(const torch::Tensor&, double, int64_t*)> body_;
};
TORCH_MODULE(EvalNetwork);

/// Parses "cifar" | "imagenet"; throws UsageError otherwise.
EvalStyle parse_eval_style(const std::string& s);
std::string to_string(EvalStyle s);

}  // namespace noisydarts
