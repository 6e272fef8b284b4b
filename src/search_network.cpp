#include "noisydarts/search_network.h"

#include "noisydarts/error.h"
#include "noisydarts/ops.h"
#include "noisydarts/space_networks.h"

#include <algorithm>

namespace noisydarts {
namespace nn = torch::nn;

std::vector<std::string> SearchNetworkOptions::noisydarts_default_primitives() {
  return noisydarts_primitives();
}

SearchCellImpl::SearchCellImpl(int64_t steps, int64_t multiplier, int64_t c_pp, int64_t c_p,
                               int64_t c, bool reduction, bool reduction_prev,
                               const std::vector<std::string>& primitives,
                               std::shared_ptr<NoiseState> noise)
    : reduction_(reduction), steps_(steps), multiplier_(multiplier) {
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
      edges_.emplace_back(c, stride, primitives, noise);
      list->push_back(edges_.back());
    }
  }
}

torch::Tensor SearchCellImpl::forward(const torch::Tensor& s0, const torch::Tensor& s1,
                                      const torch::Tensor& weights) {
  std::vector<torch::Tensor> states{preprocess0_.forward(s0), preprocess1_.forward(s1)};
  size_t offset = 0;
  for (int64_t i = 0; i < steps_; ++i) {
    torch::Tensor s;
    for (size_t j = 0; j < states.size(); ++j) {
      auto y = edges_[offset + j]->forward(states[j], weights[offset + j]);
      s = s.defined() ? s + y : y;
    }
    offset += states.size();
    states.push_back(s);
  }
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

void SearchNetworkImpl::add_arch_parameter(const std::string& name, int64_t rows) {
  const auto k = static_cast<int64_t>(options_.primitives().size());
  arch_.push_back(register_parameter(name, torch::randn({rows, k}) * options_.alpha_init_std()));
  arch_names_.push_back(name);
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
                            op.primitives(), noise_);
    cells_->push_back(cell_list_.back());
    reduction_prev = reduction;
    c_pp = c_p;
    c_p = op.multiplier() * c;
  }
  classifier_ = register_module("classifier", nn::Linear(c_p, op.num_classes()));
  const int64_t s = op.steps();
  add_arch_parameter("alphas_normal", s * (s + 3) / 2);  // sum_{i<s} (i + 2) edges
  add_arch_parameter("alphas_reduce", s * (s + 3) / 2);
}

torch::Tensor DartsSearchNetworkImpl::forward(const torch::Tensor& x) {
  auto w_normal = arch_weights(0);
  auto w_reduce = arch_weights(1);
  auto s0 = stem_->forward(x);
  auto s1 = s0;
  for (auto& cell : cell_list_) {
    auto s2 = cell->forward(s0, s1, cell->reduction() ? w_reduce : w_normal);
    s0 = s1;
    s1 = s2;
  }
  auto pooled = torch::adaptive_avg_pool2d(s1, {1, 1}).flatten(1);
  return classifier_->forward(pooled);
}

Genotype DartsSearchNetworkImpl::genotype() const {
  torch::NoGradGuard g;
  const auto arch = arch_parameters();
  auto wn = torch::softmax(arch[0].detach().to(torch::kCPU, torch::kDouble), -1);
  auto wr = torch::softmax(arch[1].detach().to(torch::kCPU, torch::kDouble), -1);
  return derive_genotype(wn, wr, options_.primitives(), options_.steps(), options_.multiplier());
}

}  // namespace noisydarts
