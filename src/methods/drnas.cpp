// drnas (Chen et al., DrNAS, ICLR 2021): op weights sampled from Dirichlet(ELU(alpha) + 1) by a
// reparameterised draw (normalised Gamma samples, differentiable through ATen's
// _standard_gamma), regularised by L2 on the alphas (the authors' default: the Adam weight decay
// --arch-weight-decay, 1e-3, no loss term) or by reg_weight * the KL divergence to Dirichlet(1).
// Deterministic forwards (eval mode, the Hessian analysis) use the Dirichlet mean; the
// derivation ranks softmax(alpha), as the authors'.
#include "methods.h"

namespace noisydarts::methods {
namespace {

class Drnas final : public SearchMethod {
 public:
  using SearchMethod::SearchMethod;
  std::string name() const override { return "drnas"; }
  static torch::Tensor concentration(const torch::Tensor& alpha) { return torch::elu(alpha) + 1.0; }
  torch::Tensor op_weights(size_t, const torch::Tensor& alpha, ForwardKind kind) const override {
    const auto c = concentration(alpha);
    if (kind != ForwardKind::kSearch) return c / c.sum(-1, true);
    const auto g = at::_standard_gamma(c);
    return g / g.sum(-1, true);
  }
  /// kl: reg_weight * sum over rows of KL(Dir(c) || Dir(1)); l2: none (the Adam weight decay).
  torch::Tensor arch_penalty(const std::vector<torch::Tensor>& alphas) const override {
    const auto& s = cfg_.method_settings.drnas;
    if (s.reg != "kl") return {};
    torch::Tensor r;
    for (const auto& a : alphas) {
      torch::Tensor t;
      {
        const auto c = concentration(a);
        const auto c0 = c.sum(-1);
        const double k = static_cast<double>(a.size(-1));
        // KL(Dir(c) || Dir(1)) = lgamma(c0) - sum lgamma(c) - lgamma(K) + sum (c - 1)(digamma(c) - digamma(c0)).
        t = (torch::lgamma(c0) - torch::lgamma(c).sum(-1) - std::lgamma(k) +
             ((c - 1.0) * (torch::digamma(c) - torch::digamma(c0).unsqueeze(-1))).sum(-1))
                .sum();
      }
      r = r.defined() ? r + t : t;
    }
    return s.reg_weight * r;
  }
};

}  // namespace

std::shared_ptr<SearchMethod> make_drnas(const SearchConfig& cfg) { return std::make_shared<Drnas>(cfg); }

}  // namespace noisydarts::methods
