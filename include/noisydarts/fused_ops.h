#pragma once
/// Fused, memory-lean forms of the candidate ops (issue 9: the search network; issue 20: the
/// evaluation network, affine BN and drop-path; docs/bench.md).
///
/// The search supernet runs every candidate of every edge, so its cost is the saved activations
/// and the backward of the depthwise (separable and dilated) convolutions; the evaluation network
/// is made of the same chains. The fused forms compute exactly the same function as the module
/// chains they replace, with:
/// - one autograd node per `ReLU -> depthwise conv -> 1x1 conv -> BN` chain that saves only its
///   input (the edge's input, shared by every candidate) and its output; the intermediates are
///   recomputed in the backward (a depthwise forward, the cheapest part);
/// - BatchNorm differentiated from x_hat and 1/std, so the pre-normalisation tensor is never
///   kept; affine BN (gamma, beta) and a per-image scale (drop-path) are applied in the same pass,
///   and where x_hat can be recovered exactly enough from the output the node keeps the output
///   (shared with its consumers) instead of x_hat;
/// - own CPU kernels for the depthwise convolution (any kernel size, stride, dilation, with the
///   ReLU folded into the input read and its mask into the input-gradient write) and the 1x1
///   convolution, deterministic and independent of the thread count;
/// - pools followed by BN saving nothing but their output (indices recomputed).
/// Weight gradients are computed only for weights that require grad at forward time (the
/// architecture step freezes the weights, see WeightsFrozen). A backward that must itself be
/// differentiable (create_graph, the Hessian analysis) recomputes the chain with ATen's ops and
/// differentiates that, so double backward stays exact. Other devices and dtypes than CPU float
/// use ATen's convolutions inside the same fused nodes.
#include <torch/torch.h>

namespace noisydarts {

/// Process-wide switch (default on). Off: the search ops run their module chains op by op, as
/// the reference does (tests compare the two; `bench search-step --no-fused` measures it).
void set_fused_ops(bool on);
bool fused_ops_enabled();

/// Process-wide switch (default on) for the AVX-512 forms of the own kernels (masked row
/// copies, register-blocked 1x1 and depthwise loops), used when the CPU has AVX-512F. Off: the
/// portable loops every other CPU runs (tests compare the two on AVX-512 machines).
/// `avx512_kernels_active()`: whether the AVX-512 forms run now (switch on and CPU able).
void set_avx512_kernels(bool on);
bool avx512_kernels_active();

/// Process-wide switch (default on) for the AVX2 + FMA forms of the kernels that have one (the
/// 1x1 convolution, the depthwise taps and weight gradient, the max pool's input gradient), used
/// where the AVX-512 forms do not run (the CPU lacks AVX-512, or set_avx512_kernels(false)).
/// Off: the portable loops. `avx2_kernels_active()`: whether they run now.
void set_avx2_kernels(bool on);
bool avx2_kernels_active();

/// Process-wide switch (default on) for the 1x1 convolutions' weight gradient through the BLAS
/// sgemm that LibTorch loaded (OpenBLAS on Debian; looked up at run time), per group of 4
/// images with the groups summed in a fixed order, where the own AVX-512 kernel does not run
/// (no AVX-512, or set_avx512_kernels(false); AVX2 CPUs use it too). Off, or no sgemm in the
/// process: the own portable kernel. `blas_gemm_active()`: whether the BLAS path runs now.
void set_blas_gemm(bool on);
bool blas_gemm_active();

/// Process-wide switch (default on) for the direct form of the same-padded stride-1 depthwise
/// planes on AVX-512 (masked loads of the unpadded plane instead of a padded phase copy; the same
/// values bit for bit). Off: the phase layout everywhere (for tests and benchmarks).
void set_direct_depthwise(bool on);

/// Depthwise 2-D convolution of NCHW `x` with weight [C, 1, k, k]; `relu_input` convolves
/// relu(x) instead of x. CPU float uses the own kernel, anything else ATen.
torch::Tensor depthwise_conv2d(const torch::Tensor& x, const torch::Tensor& w, int64_t stride,
                               int64_t pad, int64_t dilation, bool relu_input = false);
/// Gradients of depthwise_conv2d: d/dx (times the ReLU mask when `relu_input`) and d/dw.
/// Undefined tensors for the ones not asked for.
std::pair<torch::Tensor, torch::Tensor> depthwise_conv2d_backward(
    const torch::Tensor& grad_out, const torch::Tensor& x, const torch::Tensor& w, int64_t stride,
    int64_t pad, int64_t dilation, bool relu_input, bool need_input, bool need_weight);

/// `BN(conv1x1(depthwise(relu(x))))`, differentiable in x, w_dw and w_pw (and in BN's weight and
/// bias when it is affine: the evaluation network's chains). `bn`'s running statistics (and
/// batch count) are updated as its forward would. `scale` (optional, [N]): each image's output
/// is multiplied by scale[n] (the evaluation network's drop-path, mask / keep, folded in).
/// `mix_weight` (optional, one element, non-affine `bn` and no `scale` only): the output is
/// multiplied by it, differentiably (a mixed edge's weight of this op, taken as the BN's gamma:
/// the edge's sum then needs no product of its own, weighted_sum's `prescaled`).
torch::Tensor fused_relu_dw_pw_bn(const torch::Tensor& x, const torch::Tensor& w_dw,
                                  const torch::Tensor& w_pw, torch::nn::BatchNorm2dImpl& bn,
                                  int64_t stride, int64_t pad, int64_t dilation,
                                  const torch::Tensor& scale = {}, const torch::Tensor& mix_weight = {});

/// `BN(conv1x1(relu(x)))` (the cells' 1x1 preprocessing), differentiable in x and w_pw.
torch::Tensor fused_relu_pw_bn(const torch::Tensor& x, const torch::Tensor& w_pw, torch::nn::BatchNorm2dImpl& bn);

/// Process-wide switch (default on) for fused_relu_pw_bn_group's single node. Off: its members
/// run one by one (`bench --no-group` measures the difference).
void set_grouped_1x1(bool on);

/// One member of fused_relu_pw_bn_group: a 1x1 weight [C_k, C_in, 1, 1] and its BN.
struct PwBn {
  torch::Tensor weight;
  torch::nn::BatchNorm2dImpl* bn = nullptr;
};

/// `BN_k(conv1x1_k(relu(x)))` for every member k, as one node: the 1x1s that read the same
/// tensor (a cell's output feeds the next cell's preprocess1 and the one after's preprocess0)
/// run as one 1x1 convolution of the stacked weights, so x is read once in the forward, and the
/// backward writes one input gradient instead of one per member plus their sum. The same
/// function as fused_relu_pw_bn per member (each BN's statistics are its own channels'); the
/// outputs are channel slices of one tensor. Members whose BNs differ in options or mode run
/// one by one instead.
std::vector<torch::Tensor> fused_relu_pw_bn_group(const torch::Tensor& x, const std::vector<PwBn>& members);

/// FactorizedReduce (BN affine or not): `BN(cat(w1 * relu(x)[::2, ::2], w2 * relu(x)[1::2, 1::2]))`
/// (1x1 convolutions; the second half zero-padded for odd sizes), differentiable in x, w1, w2.
torch::Tensor fused_factorized_reduce(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w2,
                                      torch::nn::BatchNorm2dImpl& bn);

/// `sum_k w[k] * ys[k]` as one node (the mixed edge's output): no per-op products are kept.
/// `prescaled[k]` (optional, one flag per term): ys[k] carries its weight already (a chain's
/// `mix_weight`): added with coefficient 1, its gradient is the output's gradient itself (one
/// tensor shared by every such term, never written), and w[k]'s gradient comes through ys[k]'s
/// own graph, not through this node.
torch::Tensor weighted_sum(const torch::Tensor& w, const std::vector<torch::Tensor>& ys,
                           const std::vector<bool>& prescaled = {});

/// `BN(pool3x3(x))` for max (`max_pool == true`) or average (count_include_pad false) pooling,
/// padding 1, differentiable in x; times `mix_weight` (optional, one element, differentiable: a
/// mixed edge's weight, as in fused_relu_dw_pw_bn).
torch::Tensor fused_pool_bn(const torch::Tensor& x, bool max_pool, int64_t stride,
                            torch::nn::BatchNorm2dImpl& bn, const torch::Tensor& mix_weight = {});

/// `pool3x3(x)` for max or average (count_include_pad false) pooling, padding 1, without BN (the
/// evaluation network's pools), differentiable in x; saves only x. Ties of the max go to the
/// first tap, as ATen's indices do.
torch::Tensor fused_pool(const torch::Tensor& x, bool max_pool, int64_t stride);

/// `cat(parts, 1)` of equal-shaped [N, C, H, W] parts built in place (the evaluation cell's
/// output): `place(p, t)` copies part p into its channel slice of the output and returns that
/// slice, to be used instead of t by t's other consumers (the slice shares the output's memory,
/// so no second copy of the part is kept); `output()`, once every part is placed, is the whole,
/// differentiable in every placed slice. The own kernels read such slices without copying them.
class ChannelConcat {
 public:
  explicit ChannelConcat(int64_t parts);
  torch::Tensor place(int64_t slot, const torch::Tensor& part) { return place(slot, std::vector<torch::Tensor>{part}); }
  /// place(slot, summands[0] + summands[1] + ...) with the sum (added in that order) written
  /// straight into the slice: no tensor of its own (a cell's node, the sum of its edges).
  torch::Tensor place(int64_t slot, const std::vector<torch::Tensor>& summands);
  torch::Tensor output() const;

 private:
  torch::Tensor buffer_;
  std::vector<torch::Tensor> placed_;
  int64_t width_ = 0;
};

/// drop_path's `x * mask / keep` (mask [N, 1, ..., 1] of 0 and 1, broadcast over each image) as
/// one node: one pass forward and one backward, the same roundings as ATen's mul and div
/// (bitwise), only the mask saved. ATen's form without fused ops or off the own kernels.
torch::Tensor fused_drop_path(const torch::Tensor& x, const torch::Tensor& mask, double keep);
/// fused_drop_path's backward: `g / keep * mask` (differentiable when grad mode is on).
torch::Tensor drop_path_grad(const torch::Tensor& g, const torch::Tensor& mask, double keep);

/// In-place accumulation of input gradients. While a scope is alive (on its thread), wrap(x)
/// returns x as a node of its own: the fused nodes then made from the result
/// (fused_relu_dw_pw_bn with a depthwise convolution, fused_pool_bn) add their gradient for it
/// into one buffer, plane by plane, instead of each returning a new tensor that autograd would
/// sum out of place, and the node's backward hands the buffer on (plus whatever gradient reached
/// it the usual way). Same gradients to float rounding (the terms' order differs). wrap returns x
/// itself when fused ops or the sinks are off, under no_grad, or when x needs no gradient or is
/// not a CPU float tensor. A search cell wraps its states (search_network.cpp).
class GradSinkScope {
 public:
  GradSinkScope();
  ~GradSinkScope();
  GradSinkScope(const GradSinkScope&) = delete;
  GradSinkScope& operator=(const GradSinkScope&) = delete;
  torch::Tensor wrap(const torch::Tensor& x);

 private:
  std::shared_ptr<void> table_;
};
/// On by default; off: wrap returns its input (benchmarks, tests: `bench --no-grad-sinks`).
void set_grad_sinks(bool on);

/// Process-wide switch (default on): a search edge's separable and dilated convolutions take the
/// edge's weight into their last fused node (fused_relu_dw_pw_bn's `mix_weight`, weighted_sum's
/// `prescaled`). Off: the weighted sum multiplies them (`bench --no-weight-fold`).
void set_mix_weight_fold(bool on);
/// The switch above, and fused ops on.
bool mix_weight_fold_enabled();

/// While alive, every parameter in `params` has requires_grad false (restored on destruction):
/// a forward run under it builds no weight-gradient paths.
class WeightsFrozen {
 public:
  explicit WeightsFrozen(std::vector<torch::Tensor> params);
  ~WeightsFrozen();
  WeightsFrozen(const WeightsFrozen&) = delete;
  WeightsFrozen& operator=(const WeightsFrozen&) = delete;

 private:
  std::vector<torch::Tensor> params_;
  std::vector<bool> was_;
};

}  // namespace noisydarts
