#include "noisydarts/ops.h"

#include <algorithm>

#include "noisydarts/error.h"
#include "noisydarts/fused_ops.h"

namespace noisydarts {
namespace nn = torch::nn;

const std::vector<std::string>& all_op_names() {
  static const std::vector<std::string> k{
      "none",         "max_pool_3x3", "avg_pool_3x3", "skip_connect",
      "sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7", "dil_conv_3x3",
      "dil_conv_5x5", "conv_7x1_1x7", "nor_conv_1x1", "nor_conv_3x3", "noise"};
  return k;
}

bool is_known_op(const std::string& name) {
  const auto& k = all_op_names();
  return std::find(k.begin(), k.end(), name) != k.end();
}

const std::vector<std::string>& noisydarts_primitives() {
  static const std::vector<std::string> k{"max_pool_3x3", "avg_pool_3x3", "skip_connect",
                                          "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
                                          "dil_conv_5x5"};
  return k;
}

const std::vector<std::string>& darts_primitives() {
  static const std::vector<std::string> k{"none",         "max_pool_3x3", "avg_pool_3x3",
                                          "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                                          "dil_conv_3x3", "dil_conv_5x5"};
  return k;
}

namespace {
nn::BatchNorm2d bn(int64_t c, bool affine) {
  return nn::BatchNorm2d(nn::BatchNorm2dOptions(c).affine(affine));
}
nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad,
                int64_t dilation = 1, int64_t groups = 1) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, k)
                        .stride(stride)
                        .padding(pad)
                        .dilation(dilation)
                        .groups(groups)
                        .bias(false));
}
nn::ReLU relu() { return nn::ReLU(nn::ReLUOptions(false)); }

// Sequential wrapper registering its layers as `op.{j}` like the reference's modules.
struct SeqOpImpl : nn::Module {
  explicit SeqOpImpl(nn::Sequential s) : op(register_module("op", std::move(s))) {}
  torch::Tensor forward(const torch::Tensor& x) { return op->forward(x); }
  nn::Sequential op;
};
TORCH_MODULE(SeqOp);

// Pools have no parameters; the reference registers them directly as `_ops.{k}`.
struct MaxPoolOpImpl : nn::Module {
  explicit MaxPoolOpImpl(int64_t stride) : stride(stride) {}
  torch::Tensor forward(const torch::Tensor& x) {
    if (fused_ops_enabled()) return fused_pool(x, /*max_pool=*/true, stride);
    return torch::max_pool2d(x, {3, 3}, {stride, stride}, {1, 1});
  }
  int64_t stride;
};
TORCH_MODULE(MaxPoolOp);

struct AvgPoolOpImpl : nn::Module {
  explicit AvgPoolOpImpl(int64_t stride) : stride(stride) {}
  torch::Tensor forward(const torch::Tensor& x) {
    // count_include_pad = false: border averages divide by the valid pixels only.
    if (fused_ops_enabled()) return fused_pool(x, /*max_pool=*/false, stride);
    return torch::avg_pool2d(x, {3, 3}, {stride, stride}, {1, 1}, false, false);
  }
  int64_t stride;
};
TORCH_MODULE(AvgPoolOp);

// RobustDARTS' `noise` candidate (space S4): N(0, 1) of the (strided) output shape, ignoring x.
struct NoiseOpImpl : nn::Module {
  explicit NoiseOpImpl(int64_t stride) : stride(stride) {}
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t h = (x.size(2) + stride - 1) / stride, w = (x.size(3) + stride - 1) / stride;
    return torch::randn({x.size(0), x.size(1), h, w}, x.options());
  }
  int64_t stride;
};
TORCH_MODULE(NoiseOp);

// The separable / dilated convolutions: same modules and names as SeqOp, but with
// fused_ops_enabled() the forward runs each `ReLU, depthwise, 1x1, BN` chain as one fused node
// (fused_ops.h), non-affine BN in the search network, affine in the evaluation network.
struct ConvChainOpImpl : nn::Module {
  struct Chain {
    std::shared_ptr<nn::Conv2dImpl> dw, pw;
    std::shared_ptr<nn::BatchNorm2dImpl> bn;
    int64_t stride, pad, dilation;
  };
  ConvChainOpImpl(int64_t c, int64_t k, int64_t stride, int64_t dilation, int chains, bool affine) {
    nn::Sequential s;
    const int64_t pad = (k / 2) * dilation;
    // Weights are drawn in the order SeqOp's Sequential(...) argument list drew them (GCC
    // evaluates arguments right to left: last chain first, 1x1 before depthwise), so a seed
    // gives the same initial network as before the fused form existed.
    chains_.resize(static_cast<size_t>(chains));
    for (int i = chains - 1; i >= 0; --i) {
      auto pw = conv(c, c, 1, 1, 0).ptr();
      auto dw = conv(c, c, k, i == 0 ? stride : 1, pad, dilation, c).ptr();
      chains_[static_cast<size_t>(i)] = Chain{dw, pw, bn(c, affine).ptr(), i == 0 ? stride : 1, pad, dilation};
    }
    for (const auto& ch : chains_) {
      s->push_back(relu());
      s->push_back(nn::Conv2d(ch.dw));
      s->push_back(nn::Conv2d(ch.pw));
      s->push_back(nn::BatchNorm2d(ch.bn));
    }
    op = register_module("op", s);
  }
  torch::Tensor forward(const torch::Tensor& x) { return forward_scaled(x, {}); }
  // The op's output times scale[n] per image (drop-path folded into the last chain); `scale`
  // undefined: none.
  torch::Tensor forward_scaled(const torch::Tensor& x, const torch::Tensor& scale) { return run(x, scale, {}); }
  // The op's output times the one-element `w` (a mixed edge's weight; non-affine BN only),
  // folded into the last chain as its BN's gamma.
  torch::Tensor forward_weighted(const torch::Tensor& x, const torch::Tensor& w) { return run(x, {}, w); }
  bool affine() const { return chains_.back().bn->options.affine(); }
  torch::Tensor run(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& w) {
    if (!fused_ops_enabled()) {
      auto y = op->forward(x);
      if (w.defined()) y = y * w.reshape({});
      return scale.defined() ? y * scale.view({-1, 1, 1, 1}) : y;
    }
    auto y = x;
    for (size_t i = 0; i < chains_.size(); ++i) {
      const auto& ch = chains_[i];
      const bool last = i + 1 == chains_.size();
      y = fused_relu_dw_pw_bn(y, ch.dw->weight, ch.pw->weight, *ch.bn, ch.stride, ch.pad, ch.dilation,
                              last ? scale : torch::Tensor(), last ? w : torch::Tensor());
    }
    return y;
  }
  nn::Sequential op{nullptr};
  std::vector<Chain> chains_;
};
TORCH_MODULE(ConvChainOp);

struct IdentityOpImpl : nn::Module {
  torch::Tensor forward(const torch::Tensor& x) { return x; }
};
TORCH_MODULE(IdentityOp);
}  // namespace

ReLUConvBNImpl::ReLUConvBNImpl(int64_t c_in, int64_t c_out, int64_t k, int64_t stride,
                               int64_t pad, bool affine, bool bias) {
  conv_ = nn::Conv2d(nn::Conv2dOptions(c_in, c_out, k).stride(stride).padding(pad).bias(bias)).ptr();
  bn_ = bn(c_out, affine).ptr();
  op = register_module("op", nn::Sequential(relu(), nn::Conv2d(conv_), nn::BatchNorm2d(bn_)));
  fusable_ = !bias && k == 1 && stride == 1 && pad == 0;
}

bool ReLUConvBNImpl::runs_fused() const { return fusable_ && fused_ops_enabled(); }

torch::Tensor ReLUConvBNImpl::forward(const torch::Tensor& x) {
  if (runs_fused()) return fused_relu_pw_bn(x, conv_->weight, *bn_);
  return op->forward(x);
}

FactorizedReduceImpl::FactorizedReduceImpl(int64_t c_in, int64_t c_out, bool affine) {
  TORCH_CHECK_VALUE(c_out % 2 == 0, "FactorizedReduce needs an even c_out, got ", c_out);
  conv_1 = register_module("conv_1", conv(c_in, c_out / 2, 1, 2, 0));
  conv_2 = register_module("conv_2", conv(c_in, c_out / 2, 1, 2, 0));
  bn = register_module("bn", noisydarts::bn(c_out, affine));
}

torch::Tensor FactorizedReduceImpl::forward(const torch::Tensor& x) {
  if (fused_ops_enabled()) return fused_factorized_reduce(x, conv_1->weight, conv_2->weight, *bn);
  auto r = torch::relu(x);
  using torch::indexing::Slice;
  auto shifted = r.index({Slice(), Slice(), Slice(1, torch::indexing::None), Slice(1, torch::indexing::None)});
  auto a = conv_1->forward(r);
  auto b = conv_2->forward(shifted);
  // Odd sizes: the shifted branch is one pixel smaller; pad it so both halves align (the
  // reference fails there, we keep odd inputs such as 7x7 working).
  if (b.size(2) != a.size(2) || b.size(3) != a.size(3))
    b = torch::constant_pad_nd(b, {0, a.size(3) - b.size(3), 0, a.size(2) - b.size(2)});
  return bn->forward(torch::cat({a, b}, 1));
}

torch::Tensor ZeroImpl::forward(const torch::Tensor& x) {
  using torch::indexing::Slice;
  if (stride == 1) return x.mul(0.);
  return x.index({Slice(), Slice(), Slice(torch::indexing::None, torch::indexing::None, stride),
                  Slice(torch::indexing::None, torch::indexing::None, stride)})
      .mul(0.);
}

torch::nn::AnyModule make_op(const std::string& name, int64_t c, int64_t stride, bool affine) {
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "op stride must be 1 or 2, got ", stride);
  auto sep = [&](int64_t k) {
    const int64_t p = k / 2;
    return nn::AnyModule(SeqOp(nn::Sequential(
        relu(), conv(c, c, k, stride, p, 1, c), conv(c, c, 1, 1, 0), bn(c, affine), relu(),
        conv(c, c, k, 1, p, 1, c), conv(c, c, 1, 1, 0), bn(c, affine))));
  };
  auto dil = [&](int64_t k) {
    const int64_t p = (k / 2) * 2;
    return nn::AnyModule(SeqOp(nn::Sequential(relu(), conv(c, c, k, stride, p, 2, c),
                                              conv(c, c, 1, 1, 0), bn(c, affine))));
  };
  // The separable and dilated convolutions: fusable chains (same modules and names as sep/dil).
  if (name == "sep_conv_3x3") return nn::AnyModule(ConvChainOp(c, 3, stride, 1, 2, affine));
  if (name == "sep_conv_5x5") return nn::AnyModule(ConvChainOp(c, 5, stride, 1, 2, affine));
  if (name == "sep_conv_7x7") return nn::AnyModule(ConvChainOp(c, 7, stride, 1, 2, affine));
  if (name == "dil_conv_3x3") return nn::AnyModule(ConvChainOp(c, 3, stride, 2, 1, affine));
  if (name == "dil_conv_5x5") return nn::AnyModule(ConvChainOp(c, 5, stride, 2, 1, affine));
  if (name == "none") return nn::AnyModule(Zero(stride));
  if (name == "max_pool_3x3") return nn::AnyModule(MaxPoolOp(stride));
  if (name == "avg_pool_3x3") return nn::AnyModule(AvgPoolOp(stride));
  if (name == "skip_connect")
    return stride == 1 ? nn::AnyModule(IdentityOp()) : nn::AnyModule(FactorizedReduce(c, c, affine));
  if (name == "sep_conv_3x3") return sep(3);
  if (name == "sep_conv_5x5") return sep(5);
  if (name == "sep_conv_7x7") return sep(7);
  if (name == "dil_conv_3x3") return dil(3);
  if (name == "dil_conv_5x5") return dil(5);
  // NAS-Bench-201's convolutions: ReLU, k x k conv (stride, same padding), BN; as in the
  // benchmark's code the convolution has a bias exactly when the BN is not affine (search).
  if (name == "nor_conv_1x1") return nn::AnyModule(ReLUConvBN(c, c, 1, stride, 0, affine, !affine));
  if (name == "nor_conv_3x3") return nn::AnyModule(ReLUConvBN(c, c, 3, stride, 1, affine, !affine));
  if (name == "noise") return nn::AnyModule(NoiseOp(stride));
  if (name == "conv_7x1_1x7") {
    return nn::AnyModule(SeqOp(nn::Sequential(
        relu(),
        nn::Conv2d(nn::Conv2dOptions(c, c, {1, 7}).stride({1, stride}).padding({0, 3}).bias(false)),
        nn::Conv2d(nn::Conv2dOptions(c, c, {7, 1}).stride({stride, 1}).padding({3, 0}).bias(false)),
        bn(c, affine))));
  }
  throw ConfigError("unknown op '" + name + "'");
}

std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)> scaled_forward(
    const torch::nn::AnyModule& op) {
  auto chain = std::dynamic_pointer_cast<ConvChainOpImpl>(op.ptr());
  if (!chain) return {};
  return [chain](const torch::Tensor& x, const torch::Tensor& scale) { return chain->forward_scaled(x, scale); };
}

std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)> weighted_forward(
    const torch::nn::AnyModule& op) {
  auto chain = std::dynamic_pointer_cast<ConvChainOpImpl>(op.ptr());
  if (!chain || chain->affine()) return {};
  return [chain](const torch::Tensor& x, const torch::Tensor& w) { return chain->forward_weighted(x, w); };
}

namespace {
// 1 - p for a drop-path probability p in (0, 1).
double drop_path_keep(double p) {
  TORCH_CHECK_VALUE(p < 1.0, "drop-path probability must be in [0, 1), got ", p);
  return 1.0 - p;
}
}  // namespace

torch::Tensor drop_path_scale(int64_t n, double p, const torch::TensorOptions& options) {
  if (p <= 0.0) return {};
  const double keep = drop_path_keep(p);
  // The same draws as drop_path's [N, 1, 1, 1] mask.
  return torch::empty({n}, options).bernoulli_(keep).div_(keep);
}

torch::Tensor drop_path(const torch::Tensor& x, double p) {
  if (p <= 0.0) return x;
  const double keep = drop_path_keep(p);
  auto mask = torch::empty({x.size(0), 1, 1, 1}, x.options()).bernoulli_(keep);
  return fused_drop_path(x, mask, keep);  // x * mask / keep in one node (fused_ops.h)
}

}  // namespace noisydarts
