// sdarts-rs and sdarts-adv (Chen & Hsieh, Stabilizing DARTS with Amended Gradient Estimation on
// Architectural Parameters / SmoothDARTS, ICML 2020): the weight step sees perturbed op weights,
// softmax(alpha) + delta with |delta| <= epsilon (clamped to [0, 1], renormalised per edge),
// so the weights are trained for a neighbourhood of the architecture. rs: delta ~ U(-eps, eps);
// adv: delta from a PGD attack on the weight step's loss. epsilon ramps linearly over the
// search (start -> end). The architecture step is DARTS' (softmax, unperturbed).
#include "methods.h"

#include "noisydarts/data.h"
#include "noisydarts/fused_ops.h"
#include "noisydarts/search_network.h"

namespace noisydarts::methods {
namespace {

/// Each row clamped to [0, 1] and divided by its sum (a row summing to 0 keeps its largest
/// entry at 1).
torch::Tensor clip_rows(torch::Tensor w, const torch::Tensor& before) {
  w = w.clamp(0.0, 1.0);
  auto sum = w.sum(-1, true);
  auto empty = sum.eq(0);
  if (empty.any().item<bool>()) {
    auto hot = torch::zeros_like(w).scatter_(-1, before.argmax(-1, true), 1.0);
    w = torch::where(empty, hot, w);
    sum = w.sum(-1, true);
  }
  return w / sum;
}

class Sdarts : public SearchMethod {
 public:
  Sdarts(const SearchConfig& cfg, bool adversarial)
      : SearchMethod(cfg),
        adversarial_(adversarial),
        epsilon_("sdarts_epsilon", cfg.method_settings.sdarts.epsilon_start, cfg.method_settings.sdarts.epsilon_end) {}
  std::string name() const override { return adversarial_ ? "sdarts-adv" : "sdarts-rs"; }
  torch::Tensor op_weights(size_t i, const torch::Tensor& alpha, ForwardKind kind) const override {
    if (kind != ForwardKind::kAnalysis && i < perturbed_.size() && perturbed_[i].defined()) return perturbed_[i];
    return torch::softmax(alpha, -1);
  }
  void begin_epoch(SearchNetworkImpl&, int64_t epoch, int64_t epochs) override { epsilon_.at(epoch, epochs); }
  nlohmann::json state() const override { return epsilon_.state(); }
  void load_state(const nlohmann::json& s) override { epsilon_.load(s); }

  void before_weight_step(SearchNetworkImpl& net, const Batch& batch) override {
    perturbed_.clear();
    if (epsilon_.value == 0) return;  // radius 0: DARTS' weight step exactly
    std::vector<torch::Tensor> w0;  // the unperturbed op weights (mbv2: disallowed skips 0)
    {
      torch::NoGradGuard g;
      for (size_t i = 0; i < net.arch_names().size(); ++i)
        w0.push_back(net.arch_names()[i].rfind("alphas", 0) == 0 ? net.arch_weights(i).detach() : torch::Tensor());
    }
    std::vector<torch::Tensor> w = random_start(w0);
    if (adversarial_) w = attack(net, batch, w0, std::move(w));
    perturbed_ = std::move(w);
  }
  void after_weight_step() override { perturbed_.clear(); }

 private:
  /// w0 + U(-eps, eps) where w0 > 0, clipped.
  std::vector<torch::Tensor> random_start(const std::vector<torch::Tensor>& w0) const {
    torch::NoGradGuard g;
    std::vector<torch::Tensor> w;
    for (const auto& x : w0) {
      if (!x.defined()) {
        w.emplace_back();
        continue;
      }
      auto d = torch::empty_like(x).uniform_(-epsilon_.value, epsilon_.value) * x.gt(0);
      w.push_back(clip_rows(x + d, x));
    }
    return w;
  }

  /// PGD in the L-infinity ball of radius epsilon around w0, maximising the weight step's loss
  /// (eval mode, as the authors' attack): attack_steps signed-gradient steps of 2 eps / steps
  /// from the random start; kept only when it raises the loss above the unperturbed one.
  std::vector<torch::Tensor> attack(SearchNetworkImpl& net, const Batch& b, const std::vector<torch::Tensor>& w0,
                                    std::vector<torch::Tensor> w) {
    const bool was_training = net.is_training();
    net.eval();
    WeightsFrozen frozen(net.weight_parameters());
    auto loss_with = [&](const std::vector<torch::Tensor>& p) {
      perturbed_ = p;
      return torch::nn::functional::cross_entropy(net.forward(b.x), b.y);
    };
    double before = 0;
    {
      torch::NoGradGuard g;
      before = loss_with(w0).item<double>();
    }
    const int64_t steps = cfg_.method_settings.sdarts.attack_steps;
    const double step = 2.0 * epsilon_.value / static_cast<double>(steps);
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<torch::Tensor> leaves, used;
      for (auto& x : w) {
        if (x.defined()) {
          x = x.detach().requires_grad_(true);
          leaves.push_back(x);
        }
      }
      auto loss = loss_with(w);
      auto grads = torch::autograd::grad({loss}, leaves, {}, false, false, /*allow_unused=*/true);
      torch::NoGradGuard g;
      size_t k = 0;
      for (size_t i = 0; i < w.size(); ++i) {
        if (!w0[i].defined()) continue;
        auto gr = grads[k++];
        auto x = w[i].detach();
        if (gr.defined()) x = x + step * gr.sign();
        w[i] = clip_rows(w0[i] + (x - w0[i]).clamp(-epsilon_.value, epsilon_.value), w0[i]);
      }
    }
    double after = 0;
    {
      torch::NoGradGuard g;
      after = loss_with(w).item<double>();
    }
    if (was_training) net.train();
    if (after < before) return w0;  // the attack did not raise the loss: no perturbation
    return w;
  }

  bool adversarial_;
  LinearSchedule epsilon_;
  std::vector<torch::Tensor> perturbed_;  // per arch parameter, while a weight step runs
};

}  // namespace

std::shared_ptr<SearchMethod> make_sdarts_rs(const SearchConfig& cfg) { return std::make_shared<Sdarts>(cfg, false); }
std::shared_ptr<SearchMethod> make_sdarts_adv(const SearchConfig& cfg) { return std::make_shared<Sdarts>(cfg, true); }

}  // namespace noisydarts::methods
