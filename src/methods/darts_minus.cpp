// darts-minus (Chu et al., DARTS-, ICLR 2021): an auxiliary skip beta * skip(x) on every edge,
// outside the op weights, with beta decaying linearly over the search (start -> end).
#include "methods.h"

#include "noisydarts/search_network.h"

namespace noisydarts::methods {
namespace {

class DartsMinus final : public SearchMethod {
 public:
  explicit DartsMinus(const SearchConfig& cfg)
      : SearchMethod(cfg), beta_("dminus_beta", cfg.method_settings.darts_minus.beta_start, cfg.method_settings.darts_minus.beta_end) {}
  std::string name() const override { return "darts-minus"; }
  void shape_network(SearchNetworkOptions& o) const override { o.aux_skip(true); }
  void begin_epoch(SearchNetworkImpl& net, int64_t epoch, int64_t epochs) override {
    beta_.at(epoch, epochs);
    net.noise().aux_skip = beta_.value;
  }
  nlohmann::json state() const override { return beta_.state(); }
  void load_state(const nlohmann::json& s) override { beta_.load(s); }

 private:
  LinearSchedule beta_;
};

}  // namespace

std::shared_ptr<SearchMethod> make_darts_minus(const SearchConfig& cfg) { return std::make_shared<DartsMinus>(cfg); }

}  // namespace noisydarts::methods
