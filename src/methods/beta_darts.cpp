// beta-darts (Ye et al., beta-DARTS, CVPR 2022): the beta-decay regulariser lambda * mean over
// edges of logsumexp(alpha), added to the architecture loss, lambda growing linearly over the
// search (start -> end). Softmax op weights.
#include "methods.h"

namespace noisydarts::methods {
namespace {

class BetaDarts final : public SearchMethod {
 public:
  explicit BetaDarts(const SearchConfig& cfg) : SearchMethod(cfg), lambda_(cfg.method_settings.beta_darts.lambda_start) {}
  std::string name() const override { return "beta-darts"; }
  /// lambda * mean over every edge (both cells' rows together) of logsumexp(alpha_row).
  torch::Tensor arch_penalty(const std::vector<torch::Tensor>& alphas) const override {
    std::vector<torch::Tensor> rows;
    for (const auto& a : alphas) rows.push_back(torch::logsumexp(a, -1));
    return lambda_ * torch::cat(rows).mean();
  }
  void begin_epoch(SearchNetworkImpl&, int64_t epoch, int64_t epochs) override {
    const auto& s = cfg_.method_settings.beta_darts;
    lambda_ = linear_schedule(s.lambda_start, s.lambda_end, schedule_progress(epoch, epochs));
  }
  nlohmann::json state() const override { return {{"beta_lambda", lambda_}}; }
  void load_state(const nlohmann::json& s) override { lambda_ = s.at("beta_lambda").get<double>(); }

 private:
  double lambda_;
};

}  // namespace

std::shared_ptr<SearchMethod> make_beta_darts(const SearchConfig& cfg) { return std::make_shared<BetaDarts>(cfg); }

}  // namespace noisydarts::methods
