#pragma once
/// The DARTS-family search methods (docs/methods.md). A method is a strategy of the search
/// loop: how the alphas become op weights in a forward, an extra term of the architecture loss,
/// a perturbation of the op weights around the weight step, per-epoch schedules and the weights
/// the derivation ranks. The supernet's shape changes a method needs (partial channels, edge
/// weights, the auxiliary skip) are network options (search_network.h) set from the same
/// configuration. Each method is one file in src/methods/; make_search_method picks it.
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <vector>

#include "noisydarts/config.h"

namespace noisydarts {

struct Batch;
class SearchNetworkImpl;
struct SearchNetworkOptions;

/// What a forward of the supernet is for (the op weights of some methods depend on it).
enum class ForwardKind {
  kSearch,    ///< training mode during the search: stochastic methods draw their weights
  kEval,      ///< eval mode (the supernet's accuracy): deterministic weights
  kAnalysis,  ///< the Hessian analysis and landscapes (noise suspended): deterministic and
              ///< differentiable weights
};

/// Every --method value: darts, noisydarts, fair-darts, pc-darts, sdarts-rs, sdarts-adv,
/// darts-minus, beta-darts, gdas, drnas, rdarts-l2.
const std::vector<std::string>& method_names();
/// "a, b, c" of `names`.
std::string join_names(const std::vector<std::string>& names);
/// Refuses (UsageError, one line naming the option) a method unknown, not defined in the
/// configuration's space or order, or with settings out of range.
void check_method_config(const SearchConfig& cfg);

/// Where a per-epoch schedule stands at the start of epoch `epoch` (0-based) of `epochs`, as a
/// share of the run, so a schedule keeps its shape in a 10-epoch small search and a 50-epoch
/// paper one: epoch / epochs (0 at the first epoch, 1 - 1/epochs at the last: SmoothDARTS',
/// DARTS-' and beta-DARTS' convention).
double schedule_progress(int64_t epoch, int64_t epochs);
/// epoch / (epochs - 1): 0 at the first epoch, 1 at the last (0 in a 1-epoch run; GDAS').
double schedule_progress_inclusive(int64_t epoch, int64_t epochs);
/// start + (end - start) * p.
inline double linear_schedule(double start, double end, double p) { return start + (end - start) * p; }
/// The first epoch whose architecture step updates the alphas (`arch_warmup` share of them).
int64_t first_arch_epoch(const SearchConfig& cfg);

class SearchMethod {
 public:
  explicit SearchMethod(const SearchConfig& cfg) : cfg_(cfg) {}
  virtual ~SearchMethod() = default;
  virtual std::string name() const = 0;

  // ---- The supernet.
  /// The network options the method needs (pc-darts: partial channels and edge weights;
  /// darts-minus: the auxiliary skip). Default: none.
  virtual void shape_network(SearchNetworkOptions& options) const {}
  /// Op weights of the rows of architecture parameter `i` (`alpha`: [rows, ops]) for a forward
  /// of kind `kind`. Default softmax.
  virtual torch::Tensor op_weights(size_t i, const torch::Tensor& alpha, ForwardKind kind) const;
  /// The deterministic op weights the derivation ranks, the margins use and metrics.jsonl logs
  /// (softmax unless the method defines otherwise). Default softmax.
  virtual torch::Tensor derivation_weights(const torch::Tensor& alpha) const;
  /// Whether a forward runs only the op of largest weight on each edge (gdas' hard sampling).
  virtual bool single_op() const { return false; }

  // ---- Architecture step.
  /// The method's term added to the architecture loss (undefined: none), a function of the
  /// alphas; its gradient joins the validation loss' gradient (also with --order second).
  virtual torch::Tensor arch_penalty(const std::vector<torch::Tensor>& alphas) const;

  // ---- Weight step.
  /// Called before / after each weight step (sdarts: perturb the op weights around it).
  virtual void before_weight_step(SearchNetworkImpl& net, const Batch& batch);
  virtual void after_weight_step() {}

  // ---- Schedules.
  /// Called at the start of every epoch, before its first step (schedules, the network's
  /// auxiliary skip coefficient).
  virtual void begin_epoch(SearchNetworkImpl& net, int64_t epoch, int64_t epochs);
  /// The method's current schedule values, e.g. {"gdas_tau": 4.2}: stored in the checkpoint
  /// (state/load_state, a round trip) and logged in metrics.jsonl each epoch.
  virtual nlohmann::json state() const { return nlohmann::json::object(); }
  virtual void load_state(const nlohmann::json& s);
  /// Extra per-epoch metrics of the network's current alphas (default: none).
  virtual nlohmann::json epoch_log(SearchNetworkImpl& net) const { return nlohmann::json::object(); }

 protected:
  SearchConfig cfg_;
};

/// The method of `cfg.method` (empty: `cfg.preset`).
std::shared_ptr<SearchMethod> make_search_method(const SearchConfig& cfg);

}  // namespace noisydarts
