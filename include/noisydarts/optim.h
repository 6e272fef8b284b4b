#pragma once
/// The weight update of the search and training loops as one pass (issue 20, docs/bench.md).
#include <torch/torch.h>

namespace noisydarts {

/// `torch::nn::utils::clip_grad_norm_(params, max_norm)` followed by `sgd.step()`, in two
/// parallel passes over the parameters (their squared gradients summed; then each element's
/// clip, weight decay, momentum and update) instead of about seven LibTorch operations per
/// parameter. The same arithmetic per element (weight decay and update as fused multiply-adds,
/// the momentum's product rounded before its sum, as LibTorch's CPU kernels), with the momentum
/// buffers kept in `sgd`'s own state (checkpoints are unchanged); the total norm is summed in
/// another order than LibTorch's per-parameter norms (double partial sums over fixed chunks, so
/// it does not depend on the thread count), so the clip factor may differ in its last bit.
/// Parameters without a gradient are skipped. Anything else than CPU float parameters, or SGD
/// options other than plain momentum (nesterov, dampening), runs the two LibTorch calls instead.
/// Returns the total gradient norm (before clipping).
double clip_and_sgd_step(torch::optim::SGD& sgd, const std::vector<torch::Tensor>& params, double max_norm);

}  // namespace noisydarts
