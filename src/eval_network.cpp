#include "noisydarts/eval_network.h"
#include "noisydarts/space_networks.h"

#include "noisydarts/error.h"
#include "noisydarts/fused_ops.h"
#include "noisydarts/ops.h"
#include "noisydarts/profile.h"

namespace noisydarts {
namespace nn = torch::nn;

EvalStyle parse_eval_style(const std::string& s) {
  if (s == "cifar") return EvalStyle::kCifar;
  if (s == "imagenet") return EvalStyle::kImageNet;
  throw UsageError("network style must be cifar or imagenet, got '" + s + "'");
}

std::string to_string(EvalStyle s) { return s == EvalStyle::kCifar ? "cifar" : "imagenet"; }

// ------------------------------------------------------------------------------------------
// Cell
// ------------------------------------------------------------------------------------------

EvalCellImpl::EvalCellImpl(const Genotype& genotype, int64_t c_pp, int64_t c_p, int64_t c,
                           bool reduction, bool reduction_prev)
    : reduction_(reduction) {
  if (reduction_prev) {
    auto m = register_module("preprocess0", FactorizedReduce(c_pp, c, /*affine=*/true));
    preprocess0_ = nn::AnyModule(m);
    pre0_module_ = m;
  } else {
    auto m = register_module("preprocess0", ReLUConvBN(c_pp, c, 1, 1, 0, /*affine=*/true));
    preprocess0_ = nn::AnyModule(m);
    pre0_module_ = m;
  }
  auto m1 = register_module("preprocess1", ReLUConvBN(c_p, c, 1, 1, 0, /*affine=*/true));
  preprocess1_ = nn::AnyModule(m1);
  pre1_module_ = m1;

  const auto& edges = reduction ? genotype.reduce : genotype.normal;
  concat_ = reduction ? genotype.reduce_concat : genotype.normal_concat;
  TORCH_CHECK_VALUE(!edges.empty() && edges.size() % 2 == 0,
                    "a cell needs an even, non-zero number of edges, got ", edges.size());
  auto list = register_module("_ops", nn::ModuleList());
  for (const auto& [name, index] : edges) {
    const int64_t stride = (reduction && index < 2) ? 2 : 1;
    nn::AnyModule any = make_op(name, c, stride, /*affine=*/true);
    Op op;
    op.identity = (name == "skip_connect" && stride == 1);
    if (name == "conv_7x1_1x7") {
      // The reference builds this op as a bare nn.Sequential (keys `_ops.{k}.{j}`), not wrapped
      // in an `op` attribute: register the inner Sequential itself.
      // named_children() returns a dict by value: keep it alive while `inner` points into it
      // (found by the AddressSanitizer run, scripts/sanitize.sh).
      const auto children = any.ptr()->named_children();
      auto inner = children.find("op");
      TORCH_INTERNAL_ASSERT(inner != nullptr, "conv_7x1_1x7 without an `op` sequential");
      auto seq = nn::Sequential(std::dynamic_pointer_cast<nn::SequentialImpl>(*inner));
      op.module = seq.ptr();
      op.run = [seq](const torch::Tensor& x) mutable { return seq->forward(x); };
    } else {
      op.module = any.ptr();
      op.run = [any](const torch::Tensor& x) mutable { return any.forward(x); };
      op.run_scaled = scaled_forward(any);
    }
    list->push_back(op.module);
    ops_.push_back(std::move(op));
    indices_.push_back(index);
  }
  // The output's nodes can be written straight into it when they are distinct nodes (not inputs).
  const int states = 2 + static_cast<int>(ops_.size() / 2);
  std::vector<int> slot(static_cast<size_t>(states), -1);
  bool placeable = !concat_.empty();
  for (size_t p = 0; p < concat_.size() && placeable; ++p) {
    const int i = concat_[p];
    placeable = i >= 2 && i < states && slot[static_cast<size_t>(i)] < 0;
    if (placeable) slot[static_cast<size_t>(i)] = static_cast<int>(p);
  }
  if (placeable) slot_ = std::move(slot);
}

torch::Tensor EvalCellImpl::preprocess(int k, const torch::Tensor& s) {
  return k == 0 ? preprocess0_.forward(s) : preprocess1_.forward(s);
}

ReLUConvBNImpl* EvalCellImpl::fused_preprocess(int k) const {
  auto* m = (k == 0 ? pre0_module_ : pre1_module_)->as<ReLUConvBNImpl>();  // null: FactorizedReduce
  return m && m->runs_fused() ? m : nullptr;
}

torch::Tensor EvalCellImpl::forward(const torch::Tensor& s0, const torch::Tensor& s1,
                                    double drop_prob, int64_t* macs) {
  return forward_preprocessed(preprocess(0, s0), preprocess(1, s1), s0, s1, drop_prob, macs);
}

torch::Tensor EvalCellImpl::forward_preprocessed(const torch::Tensor& p0, const torch::Tensor& p1,
                                                 const torch::Tensor& s0, const torch::Tensor& s1, double drop_prob,
                                                 int64_t* macs) {
  if (macs) {
    *macs += module_macs(*pre0_module_, s0.size(2), s0.size(3));
    *macs += module_macs(*pre1_module_, s1.size(2), s1.size(3));
  }
  std::vector<torch::Tensor> states{p0, p1};
  const bool drop = is_training() && drop_prob > 0.0;
  const bool fold = drop && fused_ops_enabled();  // off: module by module, as the reference does
  // With fused ops the output's nodes are written straight into it (fused_ops.h ChannelConcat):
  // their later consumers keep slices of the output, not a second copy of each node.
  std::unique_ptr<ChannelConcat> cat;
  if (fused_ops_enabled() && !slot_.empty()) cat = std::make_unique<ChannelConcat>(static_cast<int64_t>(concat_.size()));
  for (size_t i = 0; i < ops_.size() / 2; ++i) {
    torch::Tensor h2[2];
    for (size_t k = 2 * i; k < 2 * i + 2; ++k) {
      const auto& in = states.at(static_cast<size_t>(indices_[k]));
      if (macs) *macs += module_macs(*ops_[k].module, in.size(2), in.size(3));
      torch::Tensor h;
      if (fold && !ops_[k].identity && ops_[k].run_scaled)  // drop-path folded into the op's last node
        h = ops_[k].run_scaled(in, drop_path_scale(in.size(0), drop_prob, in.options()));
      else {
        h = ops_[k].run(in);
        if (drop && !ops_[k].identity) h = drop_path(h, drop_prob);
      }
      h2[k - 2 * i] = std::move(h);
    }
    // The node's sum, written straight into its slice of the output when it has one.
    const int slot = cat ? slot_[states.size()] : -1;
    states.push_back(slot >= 0 ? cat->place(slot, {h2[0], h2[1]}) : h2[0] + h2[1]);
  }
  if (cat) return cat->output();
  std::vector<torch::Tensor> out;
  out.reserve(concat_.size());
  for (int i : concat_) out.push_back(states.at(static_cast<size_t>(i)));
  return torch::cat(out, 1);
}

// ------------------------------------------------------------------------------------------
// Auxiliary head
// ------------------------------------------------------------------------------------------

AuxiliaryHeadImpl::AuxiliaryHeadImpl(int64_t c, int64_t num_classes, EvalStyle style)
    : style_(style) {
  const int64_t pool_stride = style == EvalStyle::kCifar ? 3 : 2;
  auto conv = [](int64_t in, int64_t out, int64_t k) {
    return nn::Conv2d(nn::Conv2dOptions(in, out, k).bias(false));
  };
  nn::Sequential f;
  f->push_back(nn::ReLU());
  f->push_back(nn::AvgPool2d(nn::AvgPool2dOptions(5).stride(pool_stride).padding(0).count_include_pad(false)));
  f->push_back(conv(c, 128, 1));
  f->push_back(nn::BatchNorm2d(128));
  f->push_back(nn::ReLU());
  f->push_back(conv(128, 768, 2));
  // The reference's ImageNet head has no BatchNorm after the 2x2 conv.
  if (style == EvalStyle::kCifar) f->push_back(nn::BatchNorm2d(768));
  f->push_back(nn::ReLU());
  features_ = register_module("features", f);
  classifier_ = register_module("classifier", nn::Linear(768, num_classes));
}

torch::Tensor AuxiliaryHeadImpl::forward(const torch::Tensor& x, int64_t* macs) {
  // Walk the Sequential by hand so that inputs smaller than 8x8 can be pooled adaptively.
  auto y = torch::relu(x);
  if (y.size(2) >= 8 && y.size(3) >= 8) {
    y = features_->begin()[1].forward(y);
  } else {
    y = torch::adaptive_avg_pool2d(y, {2, 2});
  }
  for (auto it = features_->begin() + 2; it != features_->end(); ++it) {
    if (macs) {
      if (auto* c = it->ptr()->as<nn::Conv2d>()) *macs += module_macs(*c, y.size(2), y.size(3));
    }
    y = it->forward(y);
  }
  if (y.size(2) != 1 || y.size(3) != 1) y = torch::adaptive_avg_pool2d(y, {1, 1});
  if (macs) *macs += module_macs(*classifier_, 1, 1);
  return classifier_->forward(y.flatten(1));
}

// ------------------------------------------------------------------------------------------
// Network
// ------------------------------------------------------------------------------------------

EvalNetworkImpl::EvalNetworkImpl(EvalNetworkOptions o) : options_(std::move(o)) {
  const auto& op = options_;
  TORCH_CHECK_VALUE(op.num_classes() >= 2, "num_classes must be >= 2, got ", op.num_classes());
  TORCH_CHECK_VALUE(op.in_channels() >= 1, "in_channels must be >= 1, got ", op.in_channels());
  validate_genotype(op.genotype());
  set_drop_path_prob(op.drop_path_prob());
  if (op.genotype().space == "nb201") {
    body_ = register_nb201_network(*this, op.genotype(), op.channels(), op.layers(), op.in_channels(), op.num_classes());
    return;
  }
  if (op.genotype().space == "mbv2") {
    body_ = register_mbv2_network(*this, op.genotype(), op.in_channels(), op.num_classes(),
                                  op.style() == EvalStyle::kImageNet ? 2 : 1);
    return;
  }
  TORCH_CHECK_VALUE(op.channels() >= 2 && op.channels() % 2 == 0,
                    "channels must be even and >= 2, got ", op.channels());
  TORCH_CHECK_VALUE(op.layers() >= 1, "layers must be >= 1, got ", op.layers());

  const int64_t C = op.channels();
  auto conv = [](int64_t in, int64_t out, int64_t k, int64_t stride) {
    return nn::Conv2d(nn::Conv2dOptions(in, out, k).stride(stride).padding(k / 2).bias(false));
  };
  int64_t c_pp, c_p, c = C;
  bool reduction_prev;
  if (op.style() == EvalStyle::kCifar) {
    const int64_t c_stem = 3 * C;
    stem_ = register_module("stem", nn::Sequential(conv(op.in_channels(), c_stem, 3, 1), nn::BatchNorm2d(c_stem)));
    c_pp = c_p = c_stem;
    reduction_prev = false;
  } else {
    // Three stride-2 convolutions: 224 -> 112 -> 56 (s0) -> 28 (s1).
    stem0_ = register_module("stem0", nn::Sequential(conv(op.in_channels(), C / 2, 3, 2), nn::BatchNorm2d(C / 2),
                                                     nn::ReLU(), conv(C / 2, C, 3, 2), nn::BatchNorm2d(C)));
    stem1_ = register_module("stem1", nn::Sequential(nn::ReLU(), conv(C, C, 3, 2), nn::BatchNorm2d(C)));
    c_pp = c_p = C;
    reduction_prev = true;
  }
  cells_ = register_module("cells", nn::ModuleList());
  const int64_t L = op.layers();
  int64_t c_aux = 0;
  for (int64_t i = 0; i < L; ++i) {
    const bool reduction = (i == L / 3 || i == 2 * L / 3);
    if (reduction) c *= 2;
    cell_list_.emplace_back(op.genotype(), c_pp, c_p, c, reduction, reduction_prev);
    cells_->push_back(cell_list_.back());
    reduction_prev = reduction;
    c_pp = c_p;
    c_p = cell_list_.back()->multiplier() * c;
    if (i == auxiliary_position()) c_aux = c_p;
  }
  if (op.auxiliary())
    auxiliary_head_ = register_module("auxiliary_head", AuxiliaryHead(c_aux, op.num_classes(), op.style()));
  classifier_ = register_module("classifier", nn::Linear(c_p, op.num_classes()));
}

void EvalNetworkImpl::set_drop_path_prob(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "drop-path probability must be in [0, 1), got ", p);
  drop_path_prob_ = p;
}

EvalOutput EvalNetworkImpl::forward(const torch::Tensor& x) { return run(x, nullptr); }

EvalOutput EvalNetworkImpl::forward_counting(const torch::Tensor& x, int64_t& macs) {
  return run(x, &macs);
}

EvalOutput EvalNetworkImpl::run(const torch::Tensor& x, int64_t* macs) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) == options_.in_channels(),
                    "expected input [batch, ", options_.in_channels(), ", H, W], got ", x.sizes());
  if (body_) {
    EvalOutput out;
    out.logits = body_(x, drop_path_prob_, macs);
    return out;
  }
  torch::Tensor s0, s1;
  if (stem_) {
    if (macs) *macs += module_macs(*stem_, x.size(2), x.size(3));
    s0 = s1 = stem_->forward(x);
  } else {
    if (macs) *macs += module_macs(*stem0_, x.size(2), x.size(3));
    s0 = stem0_->forward(x);
    if (macs) *macs += module_macs(*stem1_, s0.size(2), s0.size(3));
    s1 = stem1_->forward(s0);
  }
  EvalOutput out;
  // The 1x1 preprocessings that read s1 run as one fused node (fused_relu_pw_bn_group): this
  // cell's preprocess1, the next cell's preprocess0 (its s0 is this s1; kept in next_p0 until
  // then) and, on the CIFAR stem (s0 is s1), this cell's preprocess0.
  torch::Tensor next_p0;
  for (size_t i = 0; i < cell_list_.size(); ++i) {
    auto& cell = cell_list_[i];
    torch::Tensor p0 = std::move(next_p0), p1;
    next_p0 = torch::Tensor();
    if (ReLUConvBNImpl* pre1 = cell->fused_preprocess(1)) {
      std::vector<PwBn> group{{pre1->conv_weight(), &pre1->batch_norm()}};
      ReLUConvBNImpl* own0 = !p0.defined() && s0.is_same(s1) ? cell->fused_preprocess(0) : nullptr;
      ReLUConvBNImpl* next0 = i + 1 < cell_list_.size() ? cell_list_[i + 1]->fused_preprocess(0) : nullptr;
      if (own0) group.push_back({own0->conv_weight(), &own0->batch_norm()});
      if (next0) group.push_back({next0->conv_weight(), &next0->batch_norm()});
      auto parts = fused_relu_pw_bn_group(s1, group);
      p1 = parts[0];
      if (own0) p0 = parts[1];
      if (next0) next_p0 = parts.back();
    } else {
      p1 = cell->preprocess(1, s1);
    }
    if (!p0.defined()) p0 = cell->preprocess(0, s0);
    // Once preprocessed, the inputs are not needed while the cell runs (without macs, which reads
    // their sizes): released, so that inference frees them; s1 is kept only when the next
    // cell's preprocess0 has still to read it. (Training keeps what its nodes saved anyway.)
    if (!macs) {
      s0 = torch::Tensor();
      if (next_p0.defined()) s1 = torch::Tensor();
    }
    auto s2 = cell->forward_preprocessed(p0, p1, s0, s1, drop_path_prob_, macs);
    s0 = s1;
    s1 = s2;
    if (static_cast<int64_t>(i) == auxiliary_position() && auxiliary_head_ && is_training())
      out.aux_logits = auxiliary_head_->forward(s1, macs);
  }
  // Adaptive pooling equals the reference's AvgPool2d(7) at 224 px and its global pool on CIFAR.
  auto pooled = torch::adaptive_avg_pool2d(s1, {1, 1}).flatten(1);
  if (macs) *macs += module_macs(*classifier_, 1, 1);
  out.logits = classifier_->forward(pooled);
  return out;
}

}  // namespace noisydarts
