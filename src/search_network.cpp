#include "noisydarts/search_network.h"

#include "noisydarts/error.h"
#include "noisydarts/fused_ops.h"
#include "noisydarts/ops.h"
#include "noisydarts/space_networks.h"

#include <algorithm>
#include <limits>

namespace noisydarts {
namespace nn = torch::nn;

std::vector<std::string> SearchNetworkOptions::noisydarts_default_primitives() {
  return noisydarts_primitives();
}

SearchCellImpl::SearchCellImpl(int64_t steps, int64_t multiplier, int64_t c_pp, int64_t c_p,
                               int64_t c, bool reduction, bool reduction_prev,
                               const std::vector<std::string>& primitives,
                               std::shared_ptr<NoiseState> noise, int64_t partial_channels, const EdgeOps& edge_ops)
    : reduction_(reduction), steps_(steps), multiplier_(multiplier), channels_(c), noise_(noise) {
  if (reduction_prev) {
    auto m = register_module("preprocess0", FactorizedReduce(c_pp, c, /*affine=*/false));
    preprocess0_ = nn::AnyModule(m);
  } else {
    auto m = register_module("preprocess0", ReLUConvBN(c_pp, c, 1, 1, 0, /*affine=*/false));
    preprocess0_ = nn::AnyModule(m);
  }
  preprocess1_ = nn::AnyModule(
      register_module("preprocess1", ReLUConvBN(c_p, c, 1, 1, 0, /*affine=*/false)));
  auto list = register_module("_ops", nn::ModuleList());
  for (int64_t i = 0; i < steps; ++i) {
    for (int64_t j = 0; j < 2 + i; ++j) {
      const int64_t stride = (reduction && j < 2) ? 2 : 1;
      if (!edge_ops.empty()) {
        const auto& mine = edge_ops.at(edges_.size());
        std::vector<int64_t> cols;
        for (const auto& op : mine)
          cols.push_back(std::find(primitives.begin(), primitives.end(), op) - primitives.begin());
        cols_.push_back(torch::tensor(cols, torch::kLong));
        edges_.emplace_back(c, stride, mine, noise, /*nb201_layout=*/false, partial_channels);
      } else {
        edges_.emplace_back(c, stride, primitives, noise, /*nb201_layout=*/false, partial_channels);
      }
      list->push_back(edges_.back());
    }
  }
}

torch::Tensor SearchCellImpl::forward(const torch::Tensor& s0, const torch::Tensor& s1,
                                      const torch::Tensor& weights, const torch::Tensor& edge_weights) {
  // Each state's input gradients from its edges' fused nodes are added into one buffer, not
  // summed by autograd out of place (fused_ops.h GradSinkScope).
  GradSinkScope sinks;
  std::vector<torch::Tensor> states{sinks.wrap(preprocess0_.forward(s0)), sinks.wrap(preprocess1_.forward(s1))};
  size_t offset = 0;
  const double aux = aux_.empty() ? 0.0 : noise_->aux_skip;
  // With fused ops the output's nodes (the last `multiplier` ones) are summed straight into it
  // (fused_ops.h ChannelConcat): later edges read slices of the output, and there is no
  // second copy of the nodes and no concatenation.
  std::unique_ptr<ChannelConcat> cat;
  if (fused_ops_enabled()) cat = std::make_unique<ChannelConcat>(multiplier_);
  for (int64_t i = 0; i < steps_; ++i) {
    std::vector<torch::Tensor> ys;
    for (size_t j = 0; j < states.size(); ++j) {
      const size_t e = offset + j;
      auto y = edges_[e]->forward(states[j], cols_.empty() ? weights[e] : weights[e].index_select(0, cols_[e].to(weights.device())));
      if (edge_weights.defined()) y = edge_weights[e] * y;
      if (aux != 0) y = y + aux * (aux_[e] ? aux_[e]->forward(states[j]) : states[j]);
      ys.push_back(std::move(y));
    }
    offset += states.size();
    const int64_t slot = i - (steps_ - multiplier_);
    torch::Tensor s;
    if (cat && slot >= 0) {
      s = cat->place(slot, ys);
    } else {
      s = ys[0];
      for (size_t k = 1; k < ys.size(); ++k) s = s + ys[k];
    }
    states.push_back(i + 1 < steps_ ? sinks.wrap(s) : s);  // the last node feeds no edge
  }
  if (cat) return cat->output();
  return torch::cat(std::vector<torch::Tensor>(states.end() - multiplier_, states.end()), 1);
}

SearchNetworkImpl::SearchNetworkImpl(SearchNetworkOptions o)
    : options_(std::move(o)), noise_(std::make_shared<NoiseState>()) {
  const auto& op = options_;
  TORCH_CHECK_VALUE(op.num_classes() >= 2, "num_classes must be >= 2, got ", op.num_classes());
  TORCH_CHECK_VALUE(op.in_channels() >= 1, "in_channels must be >= 1, got ", op.in_channels());
  TORCH_CHECK_VALUE(!op.primitives().empty(), "the op list is empty");
  op.noise().validate();
  noise_->options = op.noise();
}

void SearchNetworkImpl::add_arch_parameter(const std::string& name, int64_t rows, int64_t cols) {
  const auto k = cols < 0 ? static_cast<int64_t>(options_.primitives().size()) : cols;
  arch_.push_back(register_parameter(name, torch::randn({rows, k}) * options_.alpha_init_std()));
  arch_names_.push_back(name);
}

void SearchNetworkImpl::set_method(std::shared_ptr<SearchMethod> m) {
  method_ = std::move(m);
  noise_->single_op = method_ && method_->single_op();
}

std::vector<torch::Tensor> SearchNetworkImpl::op_alphas() const {
  std::vector<torch::Tensor> out;
  for (size_t i = 0; i < arch_.size(); ++i)
    if (arch_names_[i].rfind("alphas", 0) == 0) out.push_back(arch_[i]);
  return out;
}

torch::Tensor SearchNetworkImpl::method_weights(size_t i, const torch::Tensor& a, bool as_double) const {
  if (as_double) {
    auto d = a.to(torch::kDouble);
    return method_ ? method_->derivation_weights(d) : torch::softmax(d, -1);
  }
  if (!method_) return torch::softmax(a, -1);
  const ForwardKind kind = noise_->suspended ? ForwardKind::kAnalysis : is_training() ? ForwardKind::kSearch : ForwardKind::kEval;
  return method_->op_weights(i, a, kind);
}

torch::Tensor& SearchNetworkImpl::arch_parameter(const std::string& name) {
  for (size_t i = 0; i < arch_names_.size(); ++i)
    if (arch_names_[i] == name) return arch_[i];
  throw ConfigError("this " + options_.space() + " search network has no architecture parameter '" + name + "'");
}

std::vector<torch::Tensor> SearchNetworkImpl::weight_parameters() {
  std::vector<torch::Tensor> out;
  for (auto& p : named_parameters(/*recurse=*/true)) {
    if (std::find(arch_names_.begin(), arch_names_.end(), p.key()) != arch_names_.end()) continue;
    out.push_back(p.value());
  }
  return out;
}

DartsSearchNetworkImpl::DartsSearchNetworkImpl(SearchNetworkOptions o) : SearchNetworkImpl(std::move(o)) {
  const auto& op = options_;
  TORCH_CHECK_VALUE(op.channels() >= 2 && op.channels() % 2 == 0,
                    "channels must be even and >= 2, got ", op.channels());
  TORCH_CHECK_VALUE(op.layers() >= 1, "layers must be >= 1, got ", op.layers());
  TORCH_CHECK_VALUE(op.steps() >= 1 && op.multiplier() >= 1 && op.multiplier() <= op.steps(),
                    "need 1 <= multiplier <= steps, got steps ", op.steps(), " multiplier ",
                    op.multiplier());
  for (const auto& p : op.primitives())
    if (!is_known_op(p)) throw ConfigError("unknown op '" + p + "' in the primitive list");

  const int64_t c_stem = op.stem_multiplier() * op.channels();
  stem_ = register_module(
      "stem", nn::Sequential(nn::Conv2d(nn::Conv2dOptions(op.in_channels(), c_stem, 3).padding(1).bias(false)),
                             nn::BatchNorm2d(c_stem)));
  cells_ = register_module("cells", nn::ModuleList());
  int64_t c_pp = c_stem, c_p = c_stem, c = op.channels();
  bool reduction_prev = false;
  const int64_t L = op.layers();
  for (int64_t i = 0; i < L; ++i) {
    const bool reduction = (i == L / 3 || i == 2 * L / 3);
    if (reduction) c *= 2;
    cell_list_.emplace_back(op.steps(), op.multiplier(), c_pp, c_p, c, reduction, reduction_prev,
                            op.primitives(), noise_, op.partial_channels(), reduction ? op.edge_ops_reduce() : op.edge_ops_normal());
    cells_->push_back(cell_list_.back());
    reduction_prev = reduction;
    c_pp = c_p;
    c_p = op.multiplier() * c;
  }
  classifier_ = register_module("classifier", nn::Linear(c_p, op.num_classes()));
  const int64_t s = op.steps();
  const int64_t edges = s * (s + 3) / 2;  // sum_{i<s} (i + 2) edges
  add_arch_parameter("alphas_normal", edges);
  add_arch_parameter("alphas_reduce", edges);
  for (int r = 0; r < 2; ++r) {
    const EdgeOps& eo = r ? op.edge_ops_reduce() : op.edge_ops_normal();
    if (eo.empty()) continue;
    TORCH_CHECK_VALUE(static_cast<int64_t>(eo.size()) == edges, "per-edge op sets: ", eo.size(), " lists for ", edges, " edges");
    const auto& prim = op.primitives();
    dead_[r] = torch::ones({edges, static_cast<int64_t>(prim.size())}, torch::kBool);
    for (int64_t e = 0; e < edges; ++e)
      for (const auto& name : eo[static_cast<size_t>(e)]) {
        const auto k = std::find(prim.begin(), prim.end(), name) - prim.begin();
        TORCH_CHECK_VALUE(k < static_cast<int64_t>(prim.size()), "edge op ", name, " is not in the op set");
        dead_[r][e][k] = false;
      }
  }
  // The parts only some methods have come after the alphas, so that everything else draws
  // the same initial values as a DARTS network of the same seed.
  if (op.edge_norm()) {
    add_arch_parameter("betas_normal", edges, 1);
    add_arch_parameter("betas_reduce", edges, 1);
  }
  if (op.aux_skip()) {
    auto aux_list = register_module("aux_skip", nn::ModuleList());
    for (auto& cell : cell_list_) {
      std::vector<FactorizedReduce> aux;
      for (int64_t i = 0; i < s; ++i)
        for (int64_t j = 0; j < 2 + i; ++j) {
          if (cell->reduction() && j < 2) {
            aux.emplace_back(cell->channels(), cell->channels(), /*affine=*/false);
            aux_list->push_back(aux.back());
          } else {
            aux.emplace_back(nullptr);
          }
        }
      cell->set_aux_skip(std::move(aux));
    }
  }
}

torch::Tensor DartsSearchNetworkImpl::edge_weights(bool reduce, bool as_double) const {
  if (!options_.edge_norm()) return {};
  auto b = arch_parameters()[reduce ? 3 : 2].flatten();
  if (as_double) b = b.to(torch::kDouble);
  std::vector<torch::Tensor> parts;
  int64_t offset = 0;
  for (int64_t i = 0; i < options_.steps(); ++i) {
    parts.push_back(torch::softmax(b.narrow(0, offset, i + 2), 0));
    offset += i + 2;
  }
  return torch::cat(parts);
}

torch::Tensor DartsSearchNetworkImpl::arch_weights(size_t i, bool as_double) const {
  const auto a = arch_parameters()[i];
  if (i >= 2) return edge_weights(i == 3, as_double).unsqueeze(1);  // betas: [edges, 1]
  const auto& dead = dead_[i];
  auto w = method_weights(i, dead.defined() ? a.masked_fill(dead.to(a.device()), -std::numeric_limits<double>::infinity()) : a, as_double);
  // The derivation ranks an edge by its op weight times its edge weight (pc-darts).
  if (as_double && options_.edge_norm()) w = w * edge_weights(i == 1, true).unsqueeze(1);
  return w;
}

std::vector<torch::Tensor> DartsSearchNetworkImpl::op_alphas() const {
  std::vector<torch::Tensor> out;
  for (size_t i = 0; i < 2; ++i) {
    const auto a = arch_parameters()[i];
    if (!dead_[i].defined()) {
      out.push_back(a);
      continue;
    }
    const auto live = dead_[i].logical_not().to(a.device());
    out.push_back(a.masked_select(live).view({a.size(0), -1}));  // every S1 edge has 2 ops
  }
  return out;
}

torch::Tensor DartsSearchNetworkImpl::forward(const torch::Tensor& x) {
  auto w_normal = arch_weights(0);
  auto w_reduce = arch_weights(1);
  auto e_normal = edge_weights(false), e_reduce = edge_weights(true);
  auto s0 = stem_->forward(x);
  auto s1 = s0;
  for (auto& cell : cell_list_) {
    auto s2 = cell->reduction() ? cell->forward(s0, s1, w_reduce, e_reduce) : cell->forward(s0, s1, w_normal, e_normal);
    s0 = s1;
    s1 = s2;
  }
  auto pooled = torch::adaptive_avg_pool2d(s1, {1, 1}).flatten(1);
  return classifier_->forward(pooled);
}

Genotype DartsSearchNetworkImpl::genotype() const {
  torch::NoGradGuard g;
  auto wn = arch_weights(0, /*as_double=*/true).detach().cpu();
  auto wr = arch_weights(1, /*as_double=*/true).detach().cpu();
  return derive_genotype(wn, wr, options_.primitives(), options_.steps(), options_.multiplier());
}

}  // namespace noisydarts
