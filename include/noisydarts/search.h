#pragma once
/// The NoisyDARTS search loop (SPEC 1.1-1.3, 5): one iteration = architecture step on a batch of
/// the architecture half, then a weight step on a batch of the weight half. Writes the run
/// directory documented in docs/run-directory.md.
#include <functional>
#include <string>

#include "noisydarts/config.h"
#include "noisydarts/architect.h"
#include "noisydarts/genotype.h"
#include "noisydarts/hessian.h"
#include "noisydarts/search_network.h"

namespace noisydarts {

struct SearchCallbacks {
  /// Receives human-readable lines (start-up, epoch summaries, the closing summary).
  std::function<void(const std::string&)> info;
  /// Show a live progress line on stderr.
  bool progress = true;
  /// Called by the writer after every epoch with that epoch's metrics.jsonl object (e.g. a
  /// Python progress callback). To stop a run gracefully, call request_stop() (engine.h).
  std::function<void(const nlohmann::json&)> on_epoch;
};

struct SearchResult {
  Genotype genotype;
  double seconds = 0;      ///< wall time of this process' part of the run
  double valid_acc = -1;   ///< final eval-mode accuracy on the architecture half (%), -1 if off
  int64_t epochs_done = 0;
  int64_t stopped_early_at = -1;  ///< epoch at which --early-stop ended the run (-1: did not)
  /// How decisive the genotype is (genotype.json's `margins`): per kept edge (darts), edge
  /// (nb201) or layer (mbv2) `op_margin` (kept op's weight - runner-up's) and, for DARTS
  /// cells, `edge_margin` (kept edge - strongest dropped edge into the node); `threshold` =
  /// 0.1 / K (K candidates per edge), below which a kept op is called undecided.
  nlohmann::json margins;
};

/// The margins of a genotype derived from the softmax tables of one metrics.jsonl line
/// (`alphas_normal`/`alphas_reduce` or `alphas`), for search configuration `cfg`.
nlohmann::json genotype_margins(const nlohmann::json& epoch_metrics, const SearchConfig& cfg);

/// Runs (or, with `resume`, continues) a search. `cfg.out` is the run directory. On resume the
/// configuration stored in the checkpoint is used; only `cfg.out` and, when >= 0, `cfg.threads`
/// come from `cfg`. Throws the
/// Error family on bad input, DivergedError on NaN/Inf loss (last good checkpoint kept).
SearchResult run_search(SearchConfig cfg, bool resume, const SearchCallbacks& cb = {});

struct WeightStepResult {
  double loss = 0;      ///< training loss of the batch (NaN/Inf: nothing was updated)
  int64_t correct = 0;  ///< correct predictions in the batch
};

/// The weight step of a search iteration (SPEC 1.1 step 2): forward in the network's current
/// mode, cross-entropy, backward into the weights only (not the alphas), gradient-norm clip,
/// `sgd` step. When the loss is not finite nothing is updated (the caller stops the run).
WeightStepResult search_weight_step(SearchNetwork& net, torch::optim::SGD& sgd,
                                    const std::vector<torch::Tensor>& weights, const Batch& batch,
                                    double grad_clip, const GradReducer& reduce = {});

/// The (freshly initialised) search network a configuration describes, for inputs of `shape`
/// (channels, height, classes are used): the space, op set, noise and sizes of `cfg`.
SearchNetwork build_search_network(const SearchConfig& cfg, const DataShape& shape);

/// Path of the newest checkpoint in a run directory, or "" when there is none.
std::string latest_checkpoint(const std::string& run_dir);

/// A search checkpoint opened for analysis (analyze, landscape): its stored configuration, the
/// search network holding the checkpoint's weights, alphas and BatchNorm statistics (training
/// mode, on `device`), and the first batches of the architecture half in fixed order without
/// augmentation (batch 0 is the one the search's Hessian eigenvalue is computed on).
struct SearchSnapshot {
  std::string file;  ///< the checkpoint read
  SearchConfig cfg;
  int64_t epoch = 0, step = 0;
  SearchNetwork net{nullptr};
  torch::Device device{torch::kCPU};
  std::vector<Batch> batches;
};

/// Opens a search checkpoint (a .pt file or a run directory: its latest checkpoint). `threads`
/// < 0 and empty `device` keep the run's; `batches` (>= 1, at most one pass) architecture-half
/// batches are read. Throws CheckpointError / ConfigError / DataError with one-line messages.
SearchSnapshot open_search_checkpoint(const std::string& path, int threads = -1, const std::string& device = "",
                                      int64_t batches = 1);

struct AnalyzeOptions {
  int iters = 0;          ///< power-iteration steps (0: the run's hessian_iters)
  double tol = 1e-3;
  int threads = -1;       ///< < 0: the run's thread count
  std::string device;     ///< empty: the run's device
};

struct AnalyzeResult {
  std::string checkpoint;     ///< the file analysed
  int64_t epoch = 0, step = 0;
  int64_t batch_size = 0;
  EigenResult eigen;
  Genotype genotype;          ///< derived from the checkpoint's alphas
  double seconds = 0;
};

/// The Hessian analysis of a search checkpoint (a .pt file or a run directory: its latest
/// checkpoint): the dominant eigenvalue of the validation loss w.r.t. the alphas on the same
/// batch the search logs it on (first batch of the architecture half, fixed order). Equals the
/// `hessian_eigenvalue` the search wrote for that epoch (same batch, weights, seed, threads).
AnalyzeResult analyze_checkpoint(const std::string& path, const AnalyzeOptions& opt = {});

}  // namespace noisydarts
