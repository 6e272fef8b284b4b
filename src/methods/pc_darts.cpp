// pc-darts (Xu et al., PC-DARTS, ICLR 2020): partial channel connections and edge normalisation,
// both in the supernet (SearchNetworkOptions::partial_channels/edge_norm), a warm-up before the
// alpha updates (the preset's arch_warmup) and the derivation ranking edges by op weight times
// edge weight (DartsSearchNetworkImpl::arch_weights). Softmax op weights.
#include "methods.h"

#include "noisydarts/search_network.h"

namespace noisydarts::methods {
namespace {

class PcDarts final : public SearchMethod {
 public:
  using SearchMethod::SearchMethod;
  std::string name() const override { return "pc-darts"; }
  void shape_network(SearchNetworkOptions& o) const override {
    o.partial_channels(cfg_.method_settings.pc_darts.k).edge_norm(cfg_.method_settings.pc_darts.edge_norm);
  }
};

}  // namespace

std::shared_ptr<SearchMethod> make_pc_darts(const SearchConfig& cfg) { return std::make_shared<PcDarts>(cfg); }

}  // namespace noisydarts::methods
