#include "noisydarts/method.h"

#include <cmath>
#include <functional>
#include <map>

#include "methods/methods.h"
#include "noisydarts/error.h"
#include "noisydarts/spaces.h"

namespace noisydarts {

namespace {

/// DARTS' own strategy (softmax op weights, no extra term): darts, noisydarts (its noise is the
/// network's NoiseOptions, composable with every method) and rdarts-l2 (a preset: stronger L2).
class SoftmaxMethod final : public SearchMethod {
 public:
  SoftmaxMethod(const SearchConfig& cfg, std::string name) : SearchMethod(cfg), name_(std::move(name)) {}
  std::string name() const override { return name_; }

 private:
  std::string name_;
};

using Factory = std::function<std::shared_ptr<SearchMethod>(const SearchConfig&)>;

const std::vector<std::pair<std::string, Factory>>& registry() {
  auto softmax = [](const char* n) {
    return [n](const SearchConfig& c) -> std::shared_ptr<SearchMethod> { return std::make_shared<SoftmaxMethod>(c, n); };
  };
  static const std::vector<std::pair<std::string, Factory>> k{
      {"darts", softmax("darts")},
      {"noisydarts", softmax("noisydarts")},
      {"fair-darts", methods::make_fair_darts},
      {"pc-darts", methods::make_pc_darts},
      {"sdarts-rs", methods::make_sdarts_rs},
      {"sdarts-adv", methods::make_sdarts_adv},
      {"darts-minus", methods::make_darts_minus},
      {"beta-darts", methods::make_beta_darts},
      {"gdas", methods::make_gdas},
      {"drnas", methods::make_drnas},
      {"rdarts-l2", softmax("rdarts-l2")},
  };
  return k;
}

bool one_of(const std::string& s, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (s == n) return true;
  return false;
}

}  // namespace

const std::vector<std::string>& method_names() {
  static const std::vector<std::string> k = [] {
    std::vector<std::string> v;
    for (const auto& [n, f] : registry()) v.push_back(n);
    return v;
  }();
  return k;
}

std::string join_names(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

void check_method_config(const SearchConfig& cfg) {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw UsageError(msg);
  };
  const std::string& m = cfg.method.empty() ? cfg.preset : cfg.method;
  bool known = false;
  for (const auto& n : method_names()) known = known || n == m;
  need(known, "--method must be one of " + join_names(method_names()) + ", got '" + m + "'");
  const std::string family = genotype_space(cfg.space);
  // Methods that change the DARTS cell itself (partial channels, edge weights, the auxiliary
  // skip) exist in the DARTS-cell spaces only; mbv2's forward masks the alphas it may not use,
  // which only softmax-weighted methods keep meaningful.
  if (one_of(m, {"pc-darts", "darts-minus"}))
    need(family == "darts", "--method " + m + " changes the DARTS cell: use it with --space darts or darts-s1..s4, not " + cfg.space);
  if (family == "mbv2")
    need(one_of(m, {"darts", "noisydarts", "sdarts-rs", "sdarts-adv", "beta-darts", "rdarts-l2"}),
         "--method " + m + " is not defined on --space mbv2 (softmax-weighted methods only: darts, noisydarts, sdarts-rs, "
         "sdarts-adv, beta-darts, rdarts-l2)");
  // Dirichlet concentrations of the ops an S1 edge does not have would be 0 (no distribution).
  if (m == "drnas")
    need(space_edge_ops(cfg.space, false) == nullptr, "--method drnas needs every edge to hold the whole op set: not --space " + cfg.space);
  // Sampled op weights have no unrolled (second-order) step in their papers.
  if (one_of(m, {"gdas", "drnas"}))
    need(cfg.order == "first", "--method " + m + " samples its op weights: --order second is not defined for it (use first)");
  const MethodSettings& s = cfg.method_settings;
  need(s.fair_darts.zero_one_weight >= 0, "--fair-zero-one-weight must be >= 0");
  need(s.fair_darts.threshold > 0 && s.fair_darts.threshold < 1, "--fair-threshold must be in (0, 1)");
  need(s.pc_darts.k >= 1 && s.pc_darts.k <= 64, "--pc-k must be in [1, 64], got " + std::to_string(s.pc_darts.k));
  if (m == "pc-darts")
    need(cfg.channels % s.pc_darts.k == 0,
         "--pc-k " + std::to_string(s.pc_darts.k) + " must divide --channels " + std::to_string(cfg.channels));
  need(s.sdarts.epsilon_start >= 0 && s.sdarts.epsilon_end >= 0 && s.sdarts.epsilon_start <= 1 && s.sdarts.epsilon_end <= 1,
       "--sdarts-epsilon-start/--sdarts-epsilon-end must be in [0, 1]");
  need(s.sdarts.attack_steps >= 1 && s.sdarts.attack_steps <= 100, "--sdarts-attack-steps must be in [1, 100]");
  need(std::isfinite(s.darts_minus.beta_start) && std::isfinite(s.darts_minus.beta_end), "--dminus-beta-start/end must be finite");
  need(s.beta_darts.lambda_start >= 0 && s.beta_darts.lambda_end >= 0, "--beta-lambda-start/end must be >= 0");
  need(s.gdas.tau_start > 0 && s.gdas.tau_end > 0, "--gdas-tau-start/end must be > 0");
  need(s.drnas.reg == "l2" || s.drnas.reg == "kl", "--drnas-reg must be l2 or kl, got '" + s.drnas.reg + "'");
  need(s.drnas.reg_weight >= 0, "--drnas-reg-weight must be >= 0");
}

double schedule_progress(int64_t epoch, int64_t epochs) {
  return std::min(1.0, std::max(0.0, static_cast<double>(epoch) / static_cast<double>(std::max<int64_t>(epochs, 1))));
}

double schedule_progress_inclusive(int64_t epoch, int64_t epochs) {
  if (epochs <= 1) return 0.0;
  return std::min(1.0, std::max(0.0, static_cast<double>(epoch) / static_cast<double>(epochs - 1)));
}

int64_t first_arch_epoch(const SearchConfig& cfg) {
  return static_cast<int64_t>(std::llround(cfg.arch_warmup * static_cast<double>(cfg.epochs)));
}

torch::Tensor SearchMethod::op_weights(size_t, const torch::Tensor& alpha, ForwardKind) const {
  return torch::softmax(alpha, -1);
}

torch::Tensor SearchMethod::derivation_weights(const torch::Tensor& alpha) const { return torch::softmax(alpha, -1); }

torch::Tensor SearchMethod::arch_penalty(const std::vector<torch::Tensor>&) const { return {}; }

void SearchMethod::before_weight_step(SearchNetworkImpl&, const Batch&) {}

void SearchMethod::begin_epoch(SearchNetworkImpl&, int64_t, int64_t) {}

void SearchMethod::load_state(const nlohmann::json&) {}

std::shared_ptr<SearchMethod> make_search_method(const SearchConfig& cfg) {
  const std::string& m = cfg.method.empty() ? cfg.preset : cfg.method;
  for (const auto& [n, f] : registry())
    if (n == m) return f(cfg);
  throw UsageError("--method must be one of " + join_names(method_names()) + ", got '" + m + "'");
}

}  // namespace noisydarts
