#pragma once
/// The architecture step of DARTS (SPEC 1.1): gradient of the validation loss w.r.t. the alphas,
/// then an Adam update of the alphas. First order uses the current weights.
#include <torch/torch.h>
#include <functional>
#include <memory>
#include <vector>

#include "noisydarts/data.h"
#include "noisydarts/search_network.h"

namespace noisydarts {

/// Averages a list of gradients across data-parallel ranks in place (no-op on one process).
using GradReducer = std::function<void(std::vector<torch::Tensor>&)>;

struct ArchitectOptions {
  double lr = 3e-4;
  double beta1 = 0.5, beta2 = 0.999;
  double weight_decay = 1e-3;
};

struct ArchStepResult {
  double loss = 0;     ///< validation loss before the update
  int64_t correct = 0; ///< correct predictions in the validation batch
};

class Architect {
 public:
  Architect(SearchNetwork net, ArchitectOptions opt);
  /// One first-order step on a validation batch: alpha <- Adam(alpha, d L_val / d alpha).
  ArchStepResult step(const Batch& valid);
  torch::optim::Adam& optimizer() { return *adam_; }
  void set_grad_reducer(GradReducer r) { reduce_ = std::move(r); }

 private:
  SearchNetwork net_;
  std::unique_ptr<torch::optim::Adam> adam_;
  GradReducer reduce_;
};

}  // namespace noisydarts
