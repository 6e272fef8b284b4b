// darts-minus (Chu et al., DARTS-, ICLR 2021): an auxiliary skip beta * skip(x) on every edge,
// outside the op weights, with beta decaying linearly over the search (start -> end).
#include "methods.h"

#include "noisydarts/search_network.h"

namespace noisydarts::methods {
namespace {

class DartsMinus final : public SearchMethod {
 public:
  explicit DartsMinus(const SearchConfig& cfg) : SearchMethod(cfg), beta_(cfg.method_settings.darts_minus.beta_start) {}
  std::string name() const override { return "darts-minus"; }
  void shape_network(SearchNetworkOptions& o) const override { o.aux_skip(true); }
  void begin_epoch(SearchNetworkImpl& net, int64_t epoch, int64_t epochs) override {
    const auto& s = cfg_.method_settings.darts_minus;
    beta_ = linear_schedule(s.beta_start, s.beta_end, schedule_progress(epoch, epochs));
    net.noise().aux_skip = beta_;
  }
  nlohmann::json state() const override { return {{"dminus_beta", beta_}}; }
  void load_state(const nlohmann::json& s) override { beta_ = s.at("dminus_beta").get<double>(); }

 private:
  double beta_;
};

}  // namespace

std::shared_ptr<SearchMethod> make_darts_minus(const SearchConfig& cfg) { return std::make_shared<DartsMinus>(cfg); }

}  // namespace noisydarts::methods
