// gdas (Dong & Yang, GDAS, CVPR 2019): a hard Gumbel-softmax sample of one op per edge in every
// search forward (straight-through gradient), only the sampled op run (NoiseState::single_op),
// the temperature tau annealed linearly over the search (start -> end).
#include "methods.h"

#include "noisydarts/search_network.h"

namespace noisydarts::methods {
namespace {

class Gdas final : public SearchMethod {
 public:
  explicit Gdas(const SearchConfig& cfg)
      : SearchMethod(cfg), tau_("gdas_tau", cfg.method_settings.gdas.tau_start, cfg.method_settings.gdas.tau_end, /*inclusive=*/true) {}
  std::string name() const override { return "gdas"; }
  bool single_op() const override { return true; }
  torch::Tensor op_weights(size_t, const torch::Tensor& alpha, ForwardKind kind) const override {
    if (kind == ForwardKind::kAnalysis) return torch::softmax(alpha, -1);
    if (kind == ForwardKind::kEval) {  // the op each edge would keep
      torch::NoGradGuard g;
      return torch::zeros_like(alpha).scatter_(-1, alpha.argmax(-1, true), 1.0);
    }
    return gumbel_hard(alpha, tau_.value);
  }
  void begin_epoch(SearchNetworkImpl&, int64_t epoch, int64_t epochs) override { tau_.at(epoch, epochs); }
  nlohmann::json state() const override { return tau_.state(); }
  void load_state(const nlohmann::json& s) override { tau_.load(s); }

  /// probs = softmax((log_softmax(alpha) + g) / tau), g ~ Gumbel(0, 1) (redrawn while any value
  /// is infinite); returns one_hot(argmax probs) - probs.detach() + probs.
  static torch::Tensor gumbel_hard(const torch::Tensor& alpha, double tau) {
    const auto logp = torch::log_softmax(alpha, -1);
    for (;;) {
      torch::Tensor g;
      {
        torch::NoGradGuard ng;
        g = -torch::empty_like(alpha).exponential_().log();
      }
      auto probs = torch::softmax((logp + g) / tau, -1);
      {
        torch::NoGradGuard ng;
        if (torch::isinf(g).any().item<bool>() || !torch::isfinite(probs).all().item<bool>()) continue;
      }
      auto hot = torch::zeros_like(probs).scatter_(-1, probs.detach().argmax(-1, true), 1.0);
      return hot - probs.detach() + probs;
    }
  }

 private:
  LinearSchedule tau_;
};

}  // namespace

std::shared_ptr<SearchMethod> make_gdas(const SearchConfig& cfg) { return std::make_shared<Gdas>(cfg); }

}  // namespace noisydarts::methods
