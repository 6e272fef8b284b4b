#pragma once
/// Second-order DARTS (SPEC 1.1, the "unrolled" architecture gradient) and the curvature analysis
/// of the validation loss w.r.t. the alphas (dominant Hessian eigenvalue, as in RobustDARTS).
///
/// Conventions shared by everything here:
/// - "the alphas" are SearchNetwork::arch_parameters() ({alphas_normal, alphas_reduce}) and
///   "the weights" SearchNetwork::weight_parameters(); vectors of tensors follow that order.
/// - The network's weights and buffers (BatchNorm running statistics) are left exactly as they
///   were: temporary weights are written in place and copied back, buffers are restored. Only the
///   random generators advance (noise and drop-path draws), which checkpoints store.
#include <torch/torch.h>
#include <functional>
#include <vector>

#include "noisydarts/architect.h"
#include "noisydarts/data.h"
#include "noisydarts/search_network.h"

namespace noisydarts {

/// Copies every buffer of a module on construction and writes the copies back on destruction.
class BufferRestore {
 public:
  explicit BufferRestore(torch::nn::Module& m);
  ~BufferRestore();
  BufferRestore(const BufferRestore&) = delete;
  BufferRestore& operator=(const BufferRestore&) = delete;

 private:
  std::vector<torch::Tensor> live_, saved_;
};

/// Turns the network's noise and skip drop-path off for the guard's lifetime.
class NoiseSuspend {
 public:
  explicit NoiseSuspend(NoiseState& s) : s_(s), was_(s.suspended) { s_.suspended = true; }
  ~NoiseSuspend() { s_.suspended = was_; }
  NoiseSuspend(const NoiseSuspend&) = delete;
  NoiseSuspend& operator=(const NoiseSuspend&) = delete;

 private:
  NoiseState& s_;
  bool was_;
};

/// Records the state of the default generator of `device` (and of the CPU) so that a later
/// forward can replay exactly the same noise and drop-path draws.
class RngFork {
 public:
  explicit RngFork(torch::Device device);
  void replay() const;  ///< puts the generators back to the recorded state

 private:
  torch::Device device_;
  torch::Tensor cpu_, dev_;
};

/// d loss / d inputs; zeros for inputs outside the graph (e.g. alphas_normal when every cell is
/// a reduction cell).
std::vector<torch::Tensor> grads_or_zero(const torch::Tensor& loss, const std::vector<torch::Tensor>& inputs,
                                         bool retain_graph = false, bool create_graph = false);
/// sqrt(sum of squares) over all tensors.
double global_norm(const std::vector<torch::Tensor>& ts);

/// The mixed second derivative d/d alpha (grad_w L(w, alpha) . v) by central differences
/// (SPEC 1.1): (grad_alpha L(w + eps v) - grad_alpha L(w - eps v)) / (2 eps) with
/// eps = r / ||v||, on one batch in the network's current mode. Both passes see the same noise
/// draws. `reduce` (data-parallel) averages each gradient across ranks.
std::vector<torch::Tensor> finite_difference_mixed_hvp(SearchNetwork& net, const Batch& batch,
                                                       const std::vector<torch::Tensor>& v, double r = 0.01,
                                                       const GradReducer& reduce = {});

struct UnrolledOptions {
  double xi = 0.025;          ///< virtual step size (the search uses the current weight lr)
  double momentum = 0.9;      ///< SGD momentum of the weight optimiser
  double weight_decay = 3e-4; ///< SGD weight decay of the weight optimiser
  double fd_r = 0.01;         ///< finite-difference radius: eps = fd_r / ||v||
};

struct UnrolledGradient {
  std::vector<torch::Tensor> alpha_grad;  ///< d L_val(w', alpha) / d alpha - xi * H v
  double valid_loss = 0;                  ///< L_val(w', alpha) on the batch
  int64_t correct = 0;                    ///< correct predictions of the virtual network
};

/// The second-order ("unrolled") architecture gradient of SPEC 1.1:
///   w' = w - xi * (momentum * buf + grad_w L_train(w, alpha) + wd * w)   (the next SGD step)
///   g  = grad_alpha L_val(w', alpha) - xi * FD-HVP(L_train at w, v = grad_w' L_val(w', alpha)).
/// `momentum_buffers` are the SGD buffers in weight order (undefined tensors or an empty vector
/// mean "no momentum yet"). Gradient clipping is not applied to the virtual step.
UnrolledGradient unrolled_alpha_gradient(SearchNetwork& net, const Batch& valid, const Batch& train,
                                         const std::vector<torch::Tensor>& momentum_buffers,
                                         const UnrolledOptions& opt, const GradReducer& reduce = {});

/// Exact Hessian-vector product d^2 L / d alpha^2 . v of the cross-entropy on `batch` (double
/// backward), with the network's noise suspended. For tests and the analysis.
std::vector<torch::Tensor> alpha_hessian_vector_product(SearchNetwork& net, const Batch& batch,
                                                        const std::vector<torch::Tensor>& v);

struct EigenOptions {
  int max_iters = 20;   ///< power-iteration steps
  double tol = 1e-3;    ///< stop when the Rayleigh quotient changes by less than tol * |lambda|
  uint64_t seed = 0;    ///< start vector (own generator: the global ones are not touched)
};

struct EigenResult {
  double eigenvalue = 0;               ///< Rayleigh quotient v.Hv of the last unit vector
  int iterations = 0;
  bool converged = false;
  std::vector<torch::Tensor> vector;   ///< unit eigenvector estimate, shaped like the alphas
};

/// A Hessian-vector product v -> H v over vectors shaped like the alphas.
using AlphaHvp = std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>&)>;

/// Exact products with the Hessian of the cross-entropy on `batch` w.r.t. the alphas: one forward
/// (training mode, noise and drop-path suspended, buffers restored) and one create-graph backward
/// now, one double backward per call. Alphas outside the graph have zero rows.
AlphaHvp alpha_hvp_on_batch(SearchNetwork& net, const Batch& batch);

/// The `k` eigenpairs of largest magnitude of a symmetric operator, by power iteration with
/// deflation: the n-th iteration runs in the orthogonal complement of the first n - 1 vectors, so
/// the vectors are orthonormal. Start vectors are drawn from `opt.seed` (own generator) in the
/// shapes of `like`. With k = 1 this is hessian_dominant_eigenvalue's iteration.
std::vector<EigenResult> top_eigenpairs(const AlphaHvp& hvp, const std::vector<torch::Tensor>& like, int k,
                                        const EigenOptions& opt = {});

/// Dominant eigenvalue (largest magnitude) of the Hessian of the cross-entropy on `batch` w.r.t.
/// all alphas together, by power iteration on exact Hessian-vector products. One forward and one
/// create-graph backward, then one double backward per iteration. Training mode (batch
/// statistics, as in the search) with the noise and drop-path suspended, so that every product
/// is taken of the same deterministic function; buffers restored afterwards.
EigenResult hessian_dominant_eigenvalue(SearchNetwork& net, const Batch& batch, const EigenOptions& opt = {});

}  // namespace noisydarts
