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

/// Passes the .grad() of every parameter (zeros where one got none) through `reduce` and stores
/// the results back as the gradients (data parallelism: the average over the ranks).
void reduce_param_grads(std::vector<torch::Tensor> params, const GradReducer& reduce);

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
  /// One second-order (unrolled) step, SPEC 1.1: the alpha gradient of unrolled_alpha_gradient
  /// (hessian.h) with xi = `xi`, the momentum buffers and hyper-parameters of `sgd`, and the
  /// training batch `train` (the one the following weight step uses). The reported loss and
  /// accuracy are those of the virtual network w'.
  ArchStepResult step_unrolled(const Batch& valid, const Batch& train, torch::optim::SGD& sgd, double xi);
  /// The validation loss and accuracy of the current alphas on `valid` without an update (a
  /// training-mode forward without gradients: the warm-up epochs before the first alpha update).
  ArchStepResult evaluate(const Batch& valid);
  torch::optim::Adam& optimizer() { return *adam_; }
  void set_grad_reducer(GradReducer r) { reduce_ = std::move(r); }
  /// A term added to the architecture loss (the search method's, method.h), a function of the
  /// alphas only; undefined results add nothing. The reported loss stays the validation loss.
  void set_penalty(std::function<torch::Tensor()> p) { penalty_ = std::move(p); }

 private:
  /// Adam step of the alphas with `grads` (averaged across ranks first when `reduce`).
  void apply(std::vector<torch::Tensor> grads, bool reduce);
  SearchNetwork net_;
  std::unique_ptr<torch::optim::Adam> adam_;
  GradReducer reduce_;
  std::function<torch::Tensor()> penalty_;
};

}  // namespace noisydarts
