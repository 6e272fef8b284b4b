// beta-darts (Ye et al., beta-DARTS, CVPR 2022): the beta-decay regulariser lambda * mean over
// edges of logsumexp(alpha), added to the architecture loss, lambda growing linearly over the
// search (start -> end). Softmax op weights.
#include "methods.h"

namespace noisydarts::methods {
namespace {

class BetaDarts final : public SearchMethod {
 public:
  explicit BetaDarts(const SearchConfig& cfg)
      : SearchMethod(cfg), lambda_("beta_lambda", cfg.method_settings.beta_darts.lambda_start, cfg.method_settings.beta_darts.lambda_end) {}
  std::string name() const override { return "beta-darts"; }
  /// lambda * mean over every edge (both cells' rows together) of logsumexp(alpha_row).
  torch::Tensor arch_penalty(const std::vector<torch::Tensor>& alphas) const override {
    std::vector<torch::Tensor> rows;
    for (const auto& a : alphas) rows.push_back(torch::logsumexp(a, -1));
    return lambda_.value * torch::cat(rows).mean();
  }
  void begin_epoch(SearchNetworkImpl&, int64_t epoch, int64_t epochs) override { lambda_.at(epoch, epochs); }
  nlohmann::json state() const override { return lambda_.state(); }
  void load_state(const nlohmann::json& s) override { lambda_.load(s); }

 private:
  LinearSchedule lambda_;
};

}  // namespace

std::shared_ptr<SearchMethod> make_beta_darts(const SearchConfig& cfg) { return std::make_shared<BetaDarts>(cfg); }

}  // namespace noisydarts::methods
