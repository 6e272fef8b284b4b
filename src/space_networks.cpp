#include "noisydarts/space_networks.h"

#include <algorithm>
#include <limits>

#include "noisydarts/error.h"
#include "noisydarts/ops.h"
#include "noisydarts/profile.h"

namespace noisydarts {
namespace nn = torch::nn;

namespace {

nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t stride = 1, int64_t groups = 1, bool bias = false) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, k).stride(stride).padding(k / 2).groups(groups).bias(bias));
}
nn::BatchNorm2d bn(int64_t c, bool affine = true) { return nn::BatchNorm2d(nn::BatchNorm2dOptions(c).affine(affine)); }

// Multiply-adds of one convolution applied to `x` (its input), added to *macs.
void count(int64_t* macs, const nn::Conv2d& c, const torch::Tensor& x) {
  if (macs) *macs += module_macs(*c, x.size(2), x.size(3));
}

torch::Tensor act(const torch::Tensor& x, bool swish) { return swish ? torch::silu(x) : torch::relu(x); }

// The NB201 network layout: N cells of C, a residual block to 2C, N cells, a block to 4C, N cells.
std::vector<std::pair<bool, int64_t>> nb201_plan(int64_t c, int64_t n) {
  std::vector<std::pair<bool, int64_t>> plan;  // (is reduction block, output channels)
  for (int stage = 0; stage < 3; ++stage) {
    if (stage > 0) plan.emplace_back(true, c << stage);
    for (int64_t i = 0; i < n; ++i) plan.emplace_back(false, c << stage);
  }
  return plan;
}

void check_nb201_options(int64_t c, int64_t n) {
  TORCH_CHECK_VALUE(c >= 1, "NAS-Bench-201 channels must be >= 1, got ", c);
  TORCH_CHECK_VALUE(n >= 1, "NAS-Bench-201 cells per stage (--layers) must be >= 1, got ", n);
}

}  // namespace

// ------------------------------------------------------------------------------------------
// NAS-Bench-201
// ------------------------------------------------------------------------------------------

ResNetBasicBlockImpl::ResNetBasicBlockImpl(int64_t c_in, int64_t c_out) {
  auto a = register_module("conv_a", ReLUConvBN(c_in, c_out, 3, 2, 1, /*affine=*/true));
  auto b = register_module("conv_b", ReLUConvBN(c_out, c_out, 3, 1, 1, /*affine=*/true));
  conv_a = nn::AnyModule(a);
  conv_b = nn::AnyModule(b);
  conv_a_module = a;
  conv_b_module = b;
  // ceil_mode: odd sizes (e.g. 15 px) pool to the size of the stride-2 convolution's output.
  downsample = register_module("downsample", nn::Sequential(nn::AvgPool2d(nn::AvgPool2dOptions(2).stride(2).ceil_mode(true)),
                                                            conv(c_in, c_out, 1)));
}

torch::Tensor ResNetBasicBlockImpl::forward(const torch::Tensor& x, int64_t* macs) {
  auto a = conv_a.forward(x);
  auto b = conv_b.forward(a);
  auto r = downsample->forward(x);
  if (macs) {
    *macs += module_macs(*conv_a_module, x.size(2), x.size(3)) + module_macs(*conv_b_module, a.size(2), a.size(3)) +
             module_macs(*downsample[1], r.size(2), r.size(3));
  }
  return r + b;
}

Nb201SearchCellImpl::Nb201SearchCellImpl(int64_t c, const std::vector<std::string>& primitives,
                                         std::shared_ptr<NoiseState> noise) {
  auto dict = register_module("edges", nn::ModuleDict());
  for (const auto& [j, i] : nb201_edges()) {
    edges_.emplace_back(c, 1, primitives, noise, /*nb201_layout=*/true);
    dict->update(std::vector<std::pair<std::string, std::shared_ptr<nn::Module>>>{{std::to_string(j) + "<-" + std::to_string(i), edges_.back().ptr()}});
  }
}

torch::Tensor Nb201SearchCellImpl::forward(const torch::Tensor& x, const torch::Tensor& weights) {
  std::vector<torch::Tensor> nodes{x};
  const auto& e = nb201_edges();
  for (size_t k = 0; k < e.size(); ++k) {
    auto y = edges_[k]->forward(nodes[e[k].second], weights[static_cast<int64_t>(k)]);
    if (static_cast<int>(nodes.size()) == e[k].first) nodes.push_back(y);
    else nodes[e[k].first] = nodes[e[k].first] + y;
  }
  return nodes.back();
}

Nb201SearchNetworkImpl::Nb201SearchNetworkImpl(SearchNetworkOptions o) : SearchNetworkImpl(std::move(o)) {
  const auto& op = options_;
  check_nb201_options(op.channels(), op.layers());
  for (const auto& p : op.primitives())
    if (std::find(nb201_primitives().begin(), nb201_primitives().end(), p) == nb201_primitives().end())
      throw ConfigError("op '" + p + "' is not a NAS-Bench-201 op (none, skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3)");
  const int64_t c = op.channels();
  stem_ = register_module("stem", nn::Sequential(conv(op.in_channels(), c, 3), bn(c)));
  cells_ = register_module("cells", nn::ModuleList());
  int64_t c_prev = c;
  for (const auto& [reduction, c_out] : nb201_plan(c, op.layers())) {
    if (reduction) {
      blocks_.emplace_back(c_prev, c_out);
      cells_->push_back(blocks_.back());
    } else {
      cell_list_.emplace_back(c_out, op.primitives(), noise_);
      cells_->push_back(cell_list_.back());
    }
    kinds_.push_back(reduction ? 1 : 0);
    c_prev = c_out;
  }
  lastact_ = register_module("lastact", nn::Sequential(bn(c_prev), nn::ReLU()));
  classifier_ = register_module("classifier", nn::Linear(c_prev, op.num_classes()));
  add_arch_parameter("alphas", static_cast<int64_t>(nb201_edges().size()));
}

torch::Tensor Nb201SearchNetworkImpl::forward(const torch::Tensor& x) {
  const auto w = arch_weights(0);
  auto h = stem_->forward(x);
  size_t ci = 0, bi = 0;
  for (int kind : kinds_) h = kind ? blocks_[bi++]->forward(h) : cell_list_[ci++]->forward(h, w);
  h = lastact_->forward(h);
  return classifier_->forward(torch::adaptive_avg_pool2d(h, {1, 1}).flatten(1));
}

Genotype Nb201SearchNetworkImpl::genotype() const {
  torch::NoGradGuard g;
  return derive_nb201(arch_weights(0, /*as_double=*/true).detach().cpu(), options_.primitives());
}

EvalBody register_nb201_network(nn::Module& owner, const Genotype& g, int64_t c, int64_t n, int64_t in_channels,
                                int64_t num_classes) {
  check_nb201_options(c, n);
  struct Cell {
    std::vector<std::pair<nn::AnyModule, std::shared_ptr<nn::Module>>> ops;  // per edge; empty module: none
  };
  struct State {
    nn::Sequential stem{nullptr}, lastact{nullptr};
    nn::Linear classifier{nullptr};
    std::vector<Cell> cells;
    std::vector<ResNetBasicBlock> blocks;
    std::vector<int> kinds;
  };
  auto st = std::make_shared<State>();
  st->stem = owner.register_module("stem", nn::Sequential(conv(in_channels, c, 3), bn(c)));
  auto cells = owner.register_module("cells", nn::ModuleList());
  int64_t c_prev = c;
  for (const auto& [reduction, c_out] : nb201_plan(c, n)) {
    if (reduction) {
      st->blocks.emplace_back(c_prev, c_out);
      cells->push_back(st->blocks.back());
    } else {
      // The benchmark's InferCell: every edge (`none` included) in `layers`, node by node.
      auto cell = std::make_shared<nn::Module>("InferCell");
      auto edges = cell->register_module("layers", nn::ModuleList());
      Cell cc;
      for (size_t k = 0; k < nb201_edges().size(); ++k) {
        auto m = make_op(g.normal[k].first, c_out, 1, /*affine=*/true);
        edges->push_back(m.ptr());
        cc.ops.emplace_back(m, g.normal[k].first == "none" ? nullptr : m.ptr());
      }
      st->cells.push_back(std::move(cc));
      cells->push_back(cell);
    }
    st->kinds.push_back(reduction ? 1 : 0);
    c_prev = c_out;
  }
  st->lastact = owner.register_module("lastact", nn::Sequential(bn(c_prev), nn::ReLU()));
  st->classifier = owner.register_module("classifier", nn::Linear(c_prev, num_classes));
  return [st](const torch::Tensor& x, double /*drop_prob*/, int64_t* macs) {
    if (macs) *macs += module_macs(*st->stem, x.size(2), x.size(3));
    auto h = st->stem->forward(x);
    size_t ci = 0, bi = 0;
    for (int kind : st->kinds) {
      if (kind) {
        h = st->blocks[bi++]->forward(h, macs);
        continue;
      }
      auto& cell = st->cells[ci++];
      std::vector<torch::Tensor> nodes{h};
      const auto& e = nb201_edges();
      for (size_t k = 0; k < e.size(); ++k) {
        const auto& in = nodes[e[k].second];
        torch::Tensor y;
        if (cell.ops[k].second) {  // `none` edges add nothing
          if (macs) *macs += module_macs(*cell.ops[k].second, in.size(2), in.size(3));
          y = cell.ops[k].first.forward(in);
        }
        if (static_cast<int>(nodes.size()) == e[k].first) nodes.push_back(y.defined() ? y : torch::zeros_like(in));
        else if (y.defined()) nodes[e[k].first] = nodes[e[k].first] + y;
      }
      h = nodes.back();
    }
    h = st->lastact->forward(h);
    if (macs) *macs += module_macs(*st->classifier, 1, 1);
    return st->classifier->forward(torch::adaptive_avg_pool2d(h, {1, 1}).flatten(1));
  };
}

// ------------------------------------------------------------------------------------------
// MobileNetV2-like chain
// ------------------------------------------------------------------------------------------

SqueezeExciteImpl::SqueezeExciteImpl(int64_t channels, int64_t reduced, bool swish) : swish(swish) {
  conv_reduce = register_module("conv_reduce", conv(channels, reduced, 1, 1, 1, /*bias=*/true));
  conv_expand = register_module("conv_expand", conv(reduced, channels, 1, 1, 1, /*bias=*/true));
}

torch::Tensor SqueezeExciteImpl::forward(const torch::Tensor& x, int64_t* macs) {
  auto s = x.mean({2, 3}, /*keepdim=*/true);
  count(macs, conv_reduce, s);
  s = act(conv_reduce->forward(s), swish);
  count(macs, conv_expand, s);
  return x * torch::sigmoid(conv_expand->forward(s));
}

InvertedResidualImpl::InvertedResidualImpl(int64_t c_in, int64_t c_out, int64_t kernel, int64_t expansion, int64_t stride,
                                           double se_ratio, bool swish, bool affine)
    : swish(swish), residual(stride == 1 && c_in == c_out) {
  const int64_t mid = c_in * expansion;
  conv_pw = register_module("conv_pw", conv(c_in, mid, 1));
  bn1 = register_module("bn1", bn(mid, affine));
  conv_dw = register_module("conv_dw", conv(mid, mid, kernel, stride, mid));
  bn2 = register_module("bn2", bn(mid, affine));
  // timm's rule: the squeeze width is se_ratio times the block's *input* channels.
  if (se_ratio > 0)
    se = register_module("se", SqueezeExcite(mid, std::max<int64_t>(1, static_cast<int64_t>(c_in * se_ratio + 0.5)), swish));
  conv_pwl = register_module("conv_pwl", conv(mid, c_out, 1));
  bn3 = register_module("bn3", bn(c_out, affine));
}

torch::Tensor InvertedResidualImpl::forward(const torch::Tensor& x, double drop_prob, int64_t* macs) {
  count(macs, conv_pw, x);
  auto h = act(bn1->forward(conv_pw->forward(x)), swish);
  count(macs, conv_dw, h);
  h = act(bn2->forward(conv_dw->forward(h)), swish);
  if (se) h = se->forward(h, macs);
  count(macs, conv_pwl, h);
  h = bn3->forward(conv_pwl->forward(h));
  if (!residual) return h;
  if (is_training() && drop_prob > 0) h = drop_path(h, drop_prob);
  return h + x;
}

ModuleRun register_mbv2_stem(nn::Module& owner, nn::ModuleList& blocks, int64_t in_channels, int64_t stride) {
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, "mbv2 stem stride must be 1 or 2, got ", stride);
  auto conv_stem = owner.register_module("conv_stem", conv(in_channels, 32, 3, stride));
  auto bn1 = owner.register_module("bn1", bn(32));
  auto ds = std::make_shared<nn::Module>("DepthwiseSeparableConv");
  auto conv_dw = ds->register_module("conv_dw", conv(32, 32, 3, 1, 32));
  auto ds_bn1 = ds->register_module("bn1", bn(32));
  auto conv_pw = ds->register_module("conv_pw", conv(32, 16, 1));
  auto ds_bn2 = ds->register_module("bn2", bn(16));
  auto stage = nn::ModuleList();
  stage->push_back(ds);
  blocks->push_back(stage);
  return [=](const torch::Tensor& x, int64_t* macs) {
    count(macs, conv_stem, x);
    auto h = torch::relu(bn1->forward(conv_stem->forward(x)));
    count(macs, conv_dw, h);
    h = torch::relu(ds_bn1->forward(conv_dw->forward(h)));
    count(macs, conv_pw, h);
    return ds_bn2->forward(conv_pw->forward(h));
  };
}

ModuleRun register_mbv2_head(nn::Module& owner, int64_t num_classes) {
  const int64_t c_in = mbv2_layout().back().out_channels;
  auto conv_head = owner.register_module("conv_head", conv(c_in, 1280, 1));
  auto bn2 = owner.register_module("bn2", bn(1280));
  auto classifier = owner.register_module("classifier", nn::Linear(1280, num_classes));
  return [=](const torch::Tensor& x, int64_t* macs) {
    count(macs, conv_head, x);
    auto h = torch::relu(bn2->forward(conv_head->forward(x)));
    if (macs) *macs += module_macs(*classifier, 1, 1);
    return classifier->forward(torch::adaptive_avg_pool2d(h, {1, 1}).flatten(1));
  };
}

Mbv2MixedLayerImpl::Mbv2MixedLayerImpl(int64_t c_in, const Mbv2Layer& layer, double se_ratio, bool swish,
                                       std::shared_ptr<NoiseState> noise)
    : skip_(layer.skip_allowed), noise_(std::move(noise)) {
  auto list = register_module("_ops", nn::ModuleList());
  for (const auto& name : mbv2_choices()) {
    int64_t k = 0, e = 0;
    if (!parse_mbv2_choice(name, k, e)) continue;  // skip_connect: no module
    blocks_.emplace_back(c_in, layer.out_channels, k, e, layer.stride, se_ratio, swish, /*affine=*/false);
    list->push_back(blocks_.back());
  }
}

torch::Tensor Mbv2MixedLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& weights) {
  torch::Tensor sum;
  for (size_t k = 0; k < blocks_.size(); ++k) {
    auto term = weights[static_cast<int64_t>(k)] * blocks_[k]->forward(x);
    sum = sum.defined() ? sum + term : term;
  }
  if (skip_) sum = sum + weights[static_cast<int64_t>(blocks_.size())] * noise_->perturb("skip_connect", x, is_training());
  return sum;
}

Mbv2SearchNetworkImpl::Mbv2SearchNetworkImpl(SearchNetworkOptions o) : SearchNetworkImpl(std::move(o)) {
  const auto& op = options_;
  if (op.primitives() != mbv2_choices())
    throw ConfigError("the mbv2 space's candidates are fixed (ir_k{3,5,7}_e{3,6}, skip_connect); do not pass --primitives");
  TORCH_CHECK_VALUE(op.se_ratio() >= 0 && op.se_ratio() < 1, "mbv2 se ratio must be in [0, 1), got ", op.se_ratio());
  blocks_ = register_module("blocks", nn::ModuleList());
  stem_ = register_mbv2_stem(*this, blocks_, op.in_channels(), op.image_size() >= 64 ? 2 : 1);
  layers_ = register_module("layers", nn::ModuleList());
  const auto& layout = mbv2_layout();
  skip_mask_ = torch::zeros({static_cast<int64_t>(layout.size()), static_cast<int64_t>(mbv2_choices().size())}, torch::kBool);
  int64_t c_in = 16;
  for (size_t i = 0; i < layout.size(); ++i) {
    layer_list_.emplace_back(c_in, layout[i], op.se_ratio(), op.swish(), noise_);
    layers_->push_back(layer_list_.back());
    if (!layout[i].skip_allowed) skip_mask_[static_cast<int64_t>(i)][skip_mask_.size(1) - 1] = true;
    c_in = layout[i].out_channels;
  }
  head_ = register_mbv2_head(*this, op.num_classes());
  add_arch_parameter("alphas", static_cast<int64_t>(layout.size()));
  skip_mask_ = register_buffer("skip_mask", skip_mask_);
}

torch::Tensor Mbv2SearchNetworkImpl::arch_weights(size_t i, bool as_double) const {
  const auto a = as_double ? arch_parameters()[i].to(torch::kDouble) : arch_parameters()[i];
  // Disallowed skips at -inf: weight 0 under every softmax-weighted method (the only ones
  // check_method_config lets run on mbv2).
  return method_weights(i, a.masked_fill(skip_mask_.to(a.device()), -std::numeric_limits<double>::infinity()), as_double);
}

torch::Tensor Mbv2SearchNetworkImpl::forward(const torch::Tensor& x) {
  const auto w = arch_weights(0);
  auto h = stem_(x, nullptr);
  for (size_t i = 0; i < layer_list_.size(); ++i) h = layer_list_[i]->forward(h, w[static_cast<int64_t>(i)]);
  return head_(h, nullptr);
}

Genotype Mbv2SearchNetworkImpl::genotype() const {
  torch::NoGradGuard g;
  return derive_mbv2(arch_weights(0, /*as_double=*/true).detach().cpu(), options_.se_ratio(), options_.swish());
}

EvalBody register_mbv2_network(nn::Module& owner, const Genotype& g, int64_t in_channels, int64_t num_classes,
                               int64_t stem_stride) {
  nn::ModuleList blocks = owner.register_module("blocks", nn::ModuleList());
  auto stem = register_mbv2_stem(owner, blocks, in_channels, stem_stride);
  // timm's stage grouping of NoisyDARTS-A (public verify_se.py): layers 0 | 1 | 2-5 | 6-13 | 14-18.
  const std::vector<size_t> stage_starts{0, 1, 2, 6, 14};
  std::vector<InvertedResidual> layers;  // empty holder: skip_connect
  const auto& layout = mbv2_layout();
  int64_t c_in = 16;
  nn::ModuleList stage{nullptr};
  for (size_t i = 0; i < layout.size(); ++i) {
    if (std::find(stage_starts.begin(), stage_starts.end(), i) != stage_starts.end()) {
      stage = nn::ModuleList();
      blocks->push_back(stage);
    }
    int64_t k = 0, e = 0;
    if (parse_mbv2_choice(g.layers[i], k, e)) {
      layers.emplace_back(c_in, layout[i].out_channels, k, e, layout[i].stride, g.se_ratio, g.swish, /*affine=*/true);
      stage->push_back(layers.back());
    } else {
      layers.emplace_back(nullptr);
    }
    c_in = layout[i].out_channels;
  }
  auto head = register_mbv2_head(owner, num_classes);
  return [=](const torch::Tensor& x, double drop_prob, int64_t* macs) mutable {
    auto h = stem(x, macs);
    for (auto& l : layers)
      if (l) h = l->forward(h, drop_prob, macs);
    return head(h, macs);
  };
}

// ------------------------------------------------------------------------------------------

SearchNetwork make_search_network(SearchNetworkOptions options) {
  const std::string space = options.space();
  std::shared_ptr<SearchNetworkImpl> net;
  if (space == "darts") net = std::make_shared<DartsSearchNetworkImpl>(std::move(options));
  else if (space == "nb201") net = std::make_shared<Nb201SearchNetworkImpl>(std::move(options));
  else if (space == "mbv2") net = std::make_shared<Mbv2SearchNetworkImpl>(std::move(options));
  if (net) return SearchNetwork(net);
  throw ConfigError("unknown search network space '" + space + "' (darts, nb201, mbv2)");
}

}  // namespace noisydarts
