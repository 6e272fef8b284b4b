#pragma once
/// The NoisyDARTS search loop (SPEC 1.1-1.3, 5): one iteration = architecture step on a batch of
/// the architecture half, then a weight step on a batch of the weight half. Writes the run
/// directory documented in docs/run-directory.md.
#include <functional>
#include <string>

#include "noisydarts/config.h"
#include "noisydarts/genotype.h"

namespace noisydarts {

struct SearchCallbacks {
  /// Receives human-readable lines (start-up, epoch summaries, the closing summary).
  std::function<void(const std::string&)> info;
  /// Show a live progress line on stderr.
  bool progress = true;
};

struct SearchResult {
  Genotype genotype;
  double seconds = 0;      ///< wall time of this process' part of the run
  double valid_acc = -1;   ///< final eval-mode accuracy on the architecture half (%), -1 if off
  int64_t epochs_done = 0;
};

/// Runs (or, with `resume`, continues) a search. `cfg.out` is the run directory. On resume the
/// configuration stored in the checkpoint is used; only `cfg.out` and, when >= 0, `cfg.threads`
/// come from `cfg`. Throws the
/// Error family on bad input, DivergedError on NaN/Inf loss (last good checkpoint kept).
SearchResult run_search(SearchConfig cfg, bool resume, const SearchCallbacks& cb = {});

/// Path of the newest checkpoint in a run directory, or "" when there is none.
std::string latest_checkpoint(const std::string& run_dir);

}  // namespace noisydarts
