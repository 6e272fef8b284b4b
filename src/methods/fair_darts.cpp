// fair-darts (Chu et al., Fair DARTS, ECCV 2020): independent sigmoid op weights, a zero-one loss
// pushing every weight toward 0 or 1, and a threshold on the derived ops (docs/methods.md).
#include "methods.h"

#include <algorithm>

#include "noisydarts/search_network.h"

namespace noisydarts::methods {
namespace {

class FairDarts final : public SearchMethod {
 public:
  using SearchMethod::SearchMethod;
  std::string name() const override { return "fair-darts"; }
  torch::Tensor op_weights(size_t, const torch::Tensor& alpha, ForwardKind) const override { return torch::sigmoid(alpha); }
  torch::Tensor derivation_weights(const torch::Tensor& alpha) const override { return torch::sigmoid(alpha); }
  /// zero_one_weight * -mean over every op weight of (sigmoid(alpha) - 0.5)^2.
  torch::Tensor arch_penalty(const std::vector<torch::Tensor>& alphas) const override {
    std::vector<torch::Tensor> flat;
    for (const auto& a : alphas) flat.push_back(a.flatten());
    auto s = torch::sigmoid(torch::cat(flat));
    return -cfg_.method_settings.fair_darts.zero_one_weight * (s - 0.5).pow(2).mean();
  }
  /// How many kept ops of the genotype reach the threshold (the rest are DARTS' top-2 fallback).
  nlohmann::json epoch_log(SearchNetworkImpl& net) const override {
    torch::NoGradGuard g;
    const double t = cfg_.method_settings.fair_darts.threshold;
    const Genotype geno = net.genotype();
    int64_t above = 0, kept = 0;
    const auto& prim = net.candidates();
    for (size_t cell = 0; cell < 2 && cell < net.arch_names().size(); ++cell) {
      if (net.arch_names()[cell].rfind("alphas", 0) != 0) continue;
      const auto w = net.arch_weights(cell, true).cpu();
      const auto& genes = geno.space == "darts" ? (cell == 0 ? geno.normal : geno.reduce) : geno.normal;
      if (geno.space != "darts" && cell > 0) break;
      // Map each kept (op, input) back to its edge: node n's edges start at sum_{m<n} (m + 2).
      for (size_t k = 0; k < genes.size(); ++k) {
        const int64_t node = geno.space == "darts" ? static_cast<int64_t>(k / 2) : -1;
        const int64_t row = geno.space == "darts" ? node * (node + 3) / 2 + genes[k].second : static_cast<int64_t>(k);
        const auto op = std::find(prim.begin(), prim.end(), genes[k].first) - prim.begin();
        ++kept;
        above += w[row][op].item<double>() >= t;
      }
    }
    return {{"fair_kept_above_threshold", above}, {"fair_kept", kept}};
  }
};

}  // namespace

std::shared_ptr<SearchMethod> make_fair_darts(const SearchConfig& cfg) { return std::make_shared<FairDarts>(cfg); }

}  // namespace noisydarts::methods
