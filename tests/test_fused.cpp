// The fused search ops (fused_ops.h) against the module-by-module forms they replace: values,
// gradients, running statistics, double backward and thread independence.
#include <gtest/gtest.h>

#include <array>
#include <limits>
#include <set>
#include <torch/torch.h>

#include "noisydarts/architect.h"
#include "noisydarts/eval_network.h"
#include "noisydarts/genotype.h"
#include "noisydarts/fused_ops.h"
#include "noisydarts/hessian.h"
#include "noisydarts/mixed_op.h"
#include "noisydarts/ops.h"
#include "noisydarts/optim.h"
#include "noisydarts/search_network.h"

using namespace noisydarts;
namespace nn = torch::nn;

namespace {

// Restores the process-wide switch after a test.
struct FusedSwitch {
  explicit FusedSwitch(bool on) : was(fused_ops_enabled()) { set_fused_ops(on); }
  ~FusedSwitch() { set_fused_ops(was); }
  bool was;
};

// Runs a block with the AVX-512 (or AVX2) kernel forms and the BLAS 1x1 weight gradient on, or
// all off (the portable loops, the own weight-gradient kernel): both are checked.
struct Avx512Switch {
  explicit Avx512Switch(bool on) { set_avx512_kernels(on), set_avx2_kernels(on), set_blas_gemm(on); }
  ~Avx512Switch() { set_avx512_kernels(true), set_avx2_kernels(true), set_blas_gemm(true); }
};

// Runs a block with the phase layout instead of the direct form of the stride-1 planes.
struct DirectOff {
  DirectOff() { set_direct_depthwise(false); }
  ~DirectOff() { set_direct_depthwise(true); }
};

// The ways the kernels run: the best forms of this CPU (AVX-512 with the own AVX-512 1x1
// weight gradient; on AVX2 CPUs the same as mode 3), the AVX2 forms with the BLAS 1x1 weight
// gradient (what AVX2 CPUs without AVX-512 run), the portable loops with the BLAS weight
// gradient, the portable loops throughout.
const std::vector<int> kKernelModes{0, 3, 1, 2};
const char* kernel_mode_name(int m) {
  return m == 0 ? "best" : m == 3 ? "AVX2+BLAS" : m == 1 ? "portable+BLAS" : "portable";
}
struct KernelMode {
  explicit KernelMode(int m) { set_avx512_kernels(m == 0), set_avx2_kernels(m == 0 || m == 3), set_blas_gemm(m != 2); }
  ~KernelMode() { set_avx512_kernels(true), set_avx2_kernels(true), set_blas_gemm(true); }
};

struct ThreadCount {
  explicit ThreadCount(int n) : was(at::get_num_threads()) { at::set_num_threads(n); }
  ~ThreadCount() { at::set_num_threads(was); }
  int was;
};

void expect_close(const torch::Tensor& a, const torch::Tensor& b, double rtol, const std::string& what) {
  ASSERT_TRUE(a.defined() && b.defined()) << what;
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double scale = std::max(1.0, b.abs().max().item<double>());
  const double err = (a - b).abs().max().item<double>();
  EXPECT_LE(err, rtol * scale) << what << ": max error " << err << " at scale " << scale;
}

// The same shapes and weights through the own kernel (CPU float) and ATen (double, the
// reference): depthwise forward and both gradients.
void check_depthwise(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t s, int64_t d, bool relu) {
  torch::manual_seed(k * 100 + s * 10 + d);
  const int64_t pad = (k / 2) * d;
  auto x = torch::randn({n, c, h, w});
  auto wt = torch::randn({c, 1, k, k});
  auto xd = x.to(torch::kDouble).requires_grad_();
  auto wd = wt.to(torch::kDouble).requires_grad_();
  auto ref = torch::conv2d(relu ? torch::relu(xd) : xd, wd, {}, {s, s}, {pad, pad}, {d, d}, c);
  auto y = depthwise_conv2d(x, wt, s, pad, d, relu);
  const std::string tag = "k" + std::to_string(k) + " s" + std::to_string(s) + " d" + std::to_string(d) +
                          " " + std::to_string(h) + "x" + std::to_string(w) + (relu ? " relu" : "");
  expect_close(y.to(torch::kDouble), ref.detach(), 1e-5, tag + " forward");
  auto g = torch::randn(ref.sizes(), torch::kDouble);
  auto refg = torch::autograd::grad({ref}, {xd, wd}, {g});
  auto got = depthwise_conv2d_backward(g.to(torch::kFloat), x, wt, s, pad, d, relu, true, true);
  expect_close(got.first.to(torch::kDouble), refg[0], 1e-5, tag + " grad input");
  expect_close(got.second.to(torch::kDouble), refg[1], 1e-5, tag + " grad weight");
  auto only_w = depthwise_conv2d_backward(g.to(torch::kFloat), x, wt, s, pad, d, relu, false, true);
  EXPECT_FALSE(only_w.first.defined());
  EXPECT_TRUE(torch::equal(only_w.second, got.second)) << tag;
}

}  // namespace

TEST(Fused, DepthwiseKernelMatchesATenForEveryGeometryOfTheSpaces) {
  for (const bool avx512 : {true, false}) {
    SCOPED_TRACE(avx512 ? "AVX-512 forms" : "portable loops");
    Avx512Switch sw(avx512);
    for (int64_t k : {3, 5, 7})
      for (int64_t s : {1, 2})
        for (int64_t d : {1, 2}) check_depthwise(3, 4, 9, 9, k, s, d, d == 2);
    // Odd, non-square and tiny planes (7x7 after two reductions, 1x1 at the end of deep nets),
    // and rows longer than one 16-float register (28, 33).
    check_depthwise(2, 3, 7, 11, 5, 2, 2, true);
    check_depthwise(2, 3, 14, 6, 3, 1, 1, false);
    check_depthwise(2, 3, 1, 1, 3, 1, 1, true);
    check_depthwise(2, 3, 2, 2, 5, 2, 2, true);
    check_depthwise(2, 2, 28, 28, 5, 1, 2, true);
    check_depthwise(2, 2, 33, 31, 3, 2, 1, true);
  }
}

TEST(Fused, OneByOneChainWithAnyChannelCountMatchesTheModules) {
  // ReLU, 1x1 convolution, BN (the cells' preprocess) with output counts that are not multiples
  // of the kernel's 8-output blocks (so that its 4- and 1-output blocks run too, both ways) and
  // planes that end inside a 32-pixel block.
  // The weight gradient's AVX-512 kernel: input counts around its 16-lane vectors and 48-input
  // tiles (5, 3, 16, 6, 13, 50), output counts around its 8- and 4-output blocks.
  for (const int mode : kKernelModes)
    for (const auto& shape : std::vector<std::array<int64_t, 4>>{{5, 11, 7, 7}, {3, 9, 5, 13}, {16, 8, 28, 28}, {6, 20, 14, 14}, {13, 36, 6, 6}, {50, 13, 5, 7}}) {
      const std::string tag = std::string(kernel_mode_name(mode)) + " " + std::to_string(shape[0]) + "->" +
                              std::to_string(shape[1]) + " " + std::to_string(shape[2]) + "x" + std::to_string(shape[3]);
      KernelMode sw(mode);
      torch::manual_seed(23);
      auto w = torch::randn({shape[1], shape[0], 1, 1}).requires_grad_();
      auto x = torch::randn({3, shape[0], shape[2], shape[3]}).requires_grad_();
      for (const bool affine : {false, true}) {
      auto bn = nn::BatchNorm2d(nn::BatchNorm2dOptions(shape[1]).affine(affine));
      auto bn2 = nn::BatchNorm2d(nn::BatchNorm2dOptions(shape[1]).affine(affine));
      bn2->to(torch::kDouble);
      std::vector<torch::Tensor> ins{x, w}, ins2;
      auto xd = x.detach().to(torch::kDouble).requires_grad_(), wd = w.detach().to(torch::kDouble).requires_grad_();
      ins2 = {xd, wd};
      if (affine) {
        torch::NoGradGuard ng;
        bn->weight.uniform_(-1.5, 1.5), bn->bias.uniform_(-1, 1);
        bn2->weight.copy_(bn->weight), bn2->bias.copy_(bn->bias);
        ins.insert(ins.end(), {bn->weight, bn->bias});
        ins2.insert(ins2.end(), {bn2->weight, bn2->bias});
      }
      auto y = fused_relu_pw_bn(x, w, *bn);
      auto ref = bn2->forward(torch::conv2d(torch::relu(xd), wd));
      const std::string t = tag + (affine ? " affine" : "");
      expect_close(y.to(torch::kDouble), ref.detach(), 1e-5, t + " forward");
      auto g = torch::randn(y.sizes());
      auto ga = torch::autograd::grad({y}, ins, {g});
      auto gb = torch::autograd::grad({ref}, ins2, {g.to(torch::kDouble)});
      const char* names[] = {" grad input", " grad weight", " grad BN weight", " grad BN bias"};
      for (size_t i = 0; i < ga.size(); ++i) expect_close(ga[i].to(torch::kDouble), gb[i], 1e-4, t + names[i]);
      expect_close(bn->running_var.to(torch::kDouble), bn2->running_var, 1e-5, tag + " running var");
      expect_close(bn->running_mean.to(torch::kDouble), bn2->running_mean, 1e-5, tag + " running mean");
      }
    }
}

TEST(Fused, GroupedOneByOnesOnOneInputEqualTheirSeparateNodes) {
  // The cells' 1x1 preprocessings that read the same tensor, as one node: each output, the
  // gradients of x, of every weight and BN parameter, and every BN's running statistics and
  // batch count equal the members run one by one (fused_relu_pw_bn); widths that are not
  // multiples of the kernel's 8-output blocks; training and evaluation mode; members whose BNs
  // differ (momentum) run one by one and still give the same.
  for (const bool affine : {true, false})
    for (const bool training : {true, false})
      for (const bool same_momentum : {true, false}) {
        const std::string tag = std::string(affine ? "affine" : "plain") + (training ? " training" : " eval") +
                                (same_momentum ? "" : " mixed momentum");
        const std::vector<int64_t> widths{6, 11, 8};
        torch::manual_seed(31);
        auto x = torch::randn({4, 20, 9, 9}).requires_grad_();
        std::vector<nn::BatchNorm2d> bns, twins;
        std::vector<torch::Tensor> ws;
        std::vector<PwBn> members;
        for (size_t k = 0; k < widths.size(); ++k) {
          auto o = nn::BatchNorm2dOptions(widths[k]).affine(affine);
          if (!same_momentum && k == 1) o.momentum(0.3);
          bns.emplace_back(o), twins.emplace_back(o);
          ws.push_back(torch::randn({widths[k], 20, 1, 1}).requires_grad_());
          torch::NoGradGuard ng;
          for (auto* b : {&bns[k], &twins[k]}) {
            (*b)->running_mean.uniform_(-0.5, 0.5), (*b)->running_var.uniform_(0.5, 2);
            if (affine) (*b)->weight.fill_(0.5 + 0.25 * k), (*b)->bias.fill_(0.1 * k);
            training ? (*b)->train() : (*b)->eval();
          }
          twins[k]->running_mean.copy_(bns[k]->running_mean), twins[k]->running_var.copy_(bns[k]->running_var);
          members.push_back({ws[k], bns[k].get()});
        }
        auto parts = fused_relu_pw_bn_group(x, members);
        ASSERT_EQ(parts.size(), widths.size()) << tag;
        std::vector<torch::Tensor> ones;
        for (size_t k = 0; k < widths.size(); ++k) ones.push_back(fused_relu_pw_bn(x, ws[k], *twins[k]));
        std::vector<torch::Tensor> ins{x}, ins_twin{x};
        for (size_t k = 0; k < widths.size(); ++k) {
          ins.push_back(ws[k]), ins_twin.push_back(ws[k]);
          if (affine) ins.insert(ins.end(), {bns[k]->weight, bns[k]->bias}), ins_twin.insert(ins_twin.end(), {twins[k]->weight, twins[k]->bias});
        }
        torch::Tensor loss = torch::zeros({}), loss_twin = torch::zeros({});
        for (size_t k = 0; k < widths.size(); ++k) {
          EXPECT_EQ(parts[k].sizes(), ones[k].sizes()) << tag;
          expect_close(parts[k], ones[k], 1e-6, tag + " output " + std::to_string(k));
          auto g = torch::randn(ones[k].sizes());
          loss = loss + (parts[k] * g).sum(), loss_twin = loss_twin + (ones[k] * g).sum();
          expect_close(bns[k]->running_mean, twins[k]->running_mean, 1e-6, tag + " running mean");
          expect_close(bns[k]->running_var, twins[k]->running_var, 1e-6, tag + " running var");
          EXPECT_EQ(bns[k]->num_batches_tracked.item<int64_t>(), training ? 1 : 0) << tag;
          EXPECT_EQ(twins[k]->num_batches_tracked.item<int64_t>(), training ? 1 : 0) << tag;
        }
        auto ga = torch::autograd::grad({loss}, ins), gb = torch::autograd::grad({loss_twin}, ins_twin);
        for (size_t i = 0; i < ga.size(); ++i) expect_close(ga[i], gb[i], 1e-4, tag + " gradient " + std::to_string(i));
        // A member without a gradient (its output unused) still gives the others theirs.
        auto again = fused_relu_pw_bn_group(x, members);
        auto gx = torch::autograd::grad({again[0].sum()}, {x})[0];
        auto gx_one = torch::autograd::grad({fused_relu_pw_bn(x, ws[0], *twins[0]).sum()}, {x})[0];
        expect_close(gx, gx_one, 1e-4, tag + " gradient through one member");
      }
}

TEST(Fused, EvaluationModeWithoutAGraphEqualsTheRecordingNodesBitForBit) {
  // In evaluation mode, where no gradient can be asked (under InferenceMode or NoGradGuard), the
  // fused ops apply BN's running statistics (and gamma, beta) to each plane as their kernel
  // writes it, without an autograd node: the same bits as the recording nodes,
  // for every chain form, the factorized reduction, the pools (with and without BN) and the
  // grouped 1x1s; the BNs' buffers untouched.
  for (const int mode : kKernelModes)
    for (const bool affine : {false, true})
      for (const std::vector<int64_t> hw : {std::vector<int64_t>{10, 10}, std::vector<int64_t>{9, 11}}) {
        KernelMode km(mode);
        const std::string tag = std::string(kernel_mode_name(mode)) + (affine ? " affine " : " plain ") +
                                std::to_string(hw[0]) + "x" + std::to_string(hw[1]);
        torch::manual_seed(17);
        auto bn = nn::BatchNorm2d(nn::BatchNorm2dOptions(7).affine(affine));
        auto bn6 = nn::BatchNorm2d(nn::BatchNorm2dOptions(6).affine(affine));
        auto bn4 = nn::BatchNorm2d(nn::BatchNorm2dOptions(4).affine(affine));
        auto plain = nn::BatchNorm2d(nn::BatchNorm2dOptions(6).affine(false));
        for (auto* b : {&bn, &bn6, &bn4, &plain}) {
          torch::NoGradGuard ng;
          (*b)->running_mean.uniform_(-0.5, 0.5), (*b)->running_var.uniform_(0.5, 2);
          if ((*b)->options.affine()) (*b)->weight.uniform_(0.5, 1.5), (*b)->bias.uniform_(-1, 1);
          (*b)->eval();
        }
        auto x = torch::randn({3, 6, hw[0], hw[1]}).requires_grad_();
        auto w_pw = torch::randn({7, 6, 1, 1}).requires_grad_(), w4 = torch::randn({4, 6, 1, 1}).requires_grad_();
        auto w1 = torch::randn({3, 6, 1, 1}).requires_grad_(), w2 = torch::randn({3, 6, 1, 1}).requires_grad_();
        auto dw3 = torch::randn({6, 1, 3, 3}).requires_grad_(), dw5 = torch::randn({6, 1, 5, 5}).requires_grad_();
        auto scale = torch::tensor({0.f, 1.25f, 1.25f});
        auto run_all = [&](const torch::Tensor& in) {
          std::vector<torch::Tensor> r;
          for (const int64_t stride : {1, 2}) {
            r.push_back(fused_relu_dw_pw_bn(in, dw3, w_pw, *bn, stride, 1, 1));
            r.push_back(fused_relu_dw_pw_bn(in, dw5, w_pw, *bn, stride, 4, 2));
            r.push_back(fused_relu_dw_pw_bn(in, dw3, w_pw, *bn, stride, 1, 1, scale));
            for (const bool max_pool : {true, false})
              r.push_back(fused_pool_bn(in, max_pool, stride, *plain)), r.push_back(fused_pool(in, max_pool, stride));
          }
          r.push_back(fused_relu_pw_bn(in, w_pw, *bn));
          r.push_back(fused_factorized_reduce(in, w1, w2, *bn6));
          for (const auto& part : fused_relu_pw_bn_group(in, {{w_pw, bn.get()}, {w4, bn4.get()}})) r.push_back(part);
          return r;
        };
        const auto recorded = run_all(x);
        ASSERT_TRUE(recorded[0].requires_grad()) << tag << ": the reference run must record its nodes";
        std::vector<std::vector<torch::Tensor>> lean;
        {
          torch::InferenceMode im;
          lean.push_back(run_all(x));
        }
        {
          torch::NoGradGuard ng;
          lean.push_back(run_all(x));
        }
        for (const auto& l : lean) {
          ASSERT_EQ(l.size(), recorded.size()) << tag;
          for (size_t i = 0; i < l.size(); ++i) {
            EXPECT_TRUE(torch::equal(l[i], recorded[i].detach())) << tag << " result " << i;
            EXPECT_FALSE(l[i].requires_grad()) << tag << " result " << i;
          }
        }
        for (auto* b : {&bn, &bn6, &bn4, &plain}) EXPECT_EQ((*b)->num_batches_tracked.item<int64_t>(), 0) << tag;
      }
}

TEST(Fused, SeparableAndDilatedChainsMatchTheModulesIncludingRunningStatistics) {
  // Non-affine BN (the search network) and affine BN (the evaluation network, with random
  // weights and biases so that their gradients are checked too); FactorizedReduce as well.
  // 9 x 11 planes too: odd sides (the factorized reduction's zero-padded odd half); 5 x 37: rows
  // of more than one vector (the AVX-512 subsample and scatter run 32 columns at a time).
  for (const std::vector<int64_t> hw : {std::vector<int64_t>{10, 10}, std::vector<int64_t>{9, 11}, std::vector<int64_t>{5, 37}})
  for (const bool affine : {false, true})
  for (const std::string name : {"sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "skip_connect"})
    for (int64_t stride : {1, 2}) {
      if (name == "skip_connect" && stride == 1) continue;  // the identity
      torch::manual_seed(3);
      auto op = make_op(name, 6, stride, affine);
      auto twin = make_op(name, 6, stride, affine);
      // Same weights in both.
      {
        torch::NoGradGuard ng;
        auto a = op.ptr()->named_parameters(), b = twin.ptr()->named_parameters();
        for (const auto& kv : a) {
          // BN weight and bias. Stride 1: |gamma| in [0.5, 1.5], |beta| <= 1, so the nodes keep
          // their output and recover x_hat from it; stride 2: gamma ~ 1e-3, so they keep x_hat.
          const bool weight = kv.key().size() >= 6 && kv.key().compare(kv.key().size() - 6, 6, "weight") == 0;
          if (kv.value().dim() == 1 && weight) kv.value().uniform_(0.5, 1.5).mul_(stride == 2 ? 1e-3 : 1.0);
          if (kv.value().dim() == 1 && !weight) kv.value().uniform_(-1, 1).mul_(stride == 2 ? 1e-3 : 1.0);
          b[kv.key()].copy_(kv.value());
        }
      }
      auto x = torch::randn({4, 6, hw[0], hw[1]}).requires_grad_();
      auto x2 = x.detach().clone().requires_grad_();
      torch::Tensor y, y2;
      {
        FusedSwitch on(true);
        y = op.forward(x);
      }
      {
        FusedSwitch off(false);
        y2 = twin.forward(x2);
      }
      const std::string tag = name + " stride " + std::to_string(stride) + (affine ? " affine" : "") + " " +
                              std::to_string(hw[0]) + "x" + std::to_string(hw[1]);
      expect_close(y, y2, 1e-5, tag + " forward");
      auto g = torch::randn_like(y);
      auto pa = op.ptr()->parameters(), pb = twin.ptr()->parameters();
      std::vector<torch::Tensor> ia{x}, ib{x2};
      ia.insert(ia.end(), pa.begin(), pa.end());
      ib.insert(ib.end(), pb.begin(), pb.end());
      auto ga = torch::autograd::grad({y}, ia, {g});
      auto gb = torch::autograd::grad({y2}, ib, {g});
      ASSERT_EQ(ga.size(), gb.size());
      for (size_t i = 0; i < ga.size(); ++i) expect_close(ga[i], gb[i], 1e-4, tag + " grad " + std::to_string(i));
      // Running statistics and batch counters advanced identically.
      auto ba = op.ptr()->named_buffers(), bb = twin.ptr()->named_buffers();
      ASSERT_EQ(ba.size(), bb.size());
      for (const auto& kv : ba) {
        if (kv.value().scalar_type() == torch::kLong) EXPECT_TRUE(torch::equal(kv.value(), bb[kv.key()])) << kv.key();
        else expect_close(kv.value(), bb[kv.key()], 1e-5, tag + " buffer " + kv.key());
      }
      // Evaluation mode (running statistics) too.
      op.ptr()->eval();
      twin.ptr()->eval();
      FusedSwitch on(true);
      auto ye = op.forward(x);
      set_fused_ops(false);
      auto ye2 = twin.forward(x2);
      expect_close(ye, ye2, 1e-5, tag + " eval forward");
    }
}

TEST(Fused, DirectDepthwiseFormEqualsThePhaseLayoutBitForBit) {
  // The same-padded stride-1 planes read the unpadded input through masked loads (the direct
  // form) instead of a padded phase copy: forward, input gradient (the gather form) and the
  // chains' recomputation must give the same bits, the weight gradient the same values to
  // float rounding. Planes: square, odd non-square, smaller
  // than the dilated 5x5's reach (3x3, 1x1), longer than 64 outputs (28x28); rows of whole
  // vectors or nearly (16x16, 32x32, 8x32, 14x14, 13x30: the row-block form, 28x28 too).
  if (!avx512_kernels_active()) GTEST_SKIP() << "the direct form runs only with the AVX-512 kernels";
  for (const std::vector<int64_t> hw : {std::vector<int64_t>{10, 10}, {9, 11}, {3, 3}, {1, 1}, {28, 28}, {16, 16}, {32, 32}, {8, 32}, {14, 14}, {13, 30}})
    for (const std::array<int64_t, 2> kd : {std::array<int64_t, 2>{3, 1}, {5, 1}, {3, 2}, {5, 2}}) {
      const int64_t k = kd[0], d = kd[1], pad = (k / 2) * d;
      const std::string tag = "k" + std::to_string(k) + " d" + std::to_string(d) + " " + std::to_string(hw[0]) + "x" +
                              std::to_string(hw[1]);
      torch::manual_seed(k + 10 * d + hw[0]);
      auto x = torch::randn({3, 5, hw[0], hw[1]});
      auto w = torch::randn({5, 1, k, k});
      auto g = torch::randn({3, 5, hw[0], hw[1]});
      for (const bool relu : {false, true}) {
        auto y = depthwise_conv2d(x, w, 1, pad, d, relu);
        auto gr = depthwise_conv2d_backward(g, x, w, 1, pad, d, relu, true, true);
        DirectOff off;
        EXPECT_TRUE(torch::equal(y, depthwise_conv2d(x, w, 1, pad, d, relu))) << tag << " forward";
        const auto gr2 = depthwise_conv2d_backward(g, x, w, 1, pad, d, relu, true, true);
        EXPECT_TRUE(torch::equal(gr.first, gr2.first)) << tag << " input gradient";
        // The weight gradient's sums run over the plane's lanes in another grouping: equal to
        // float rounding, not bit for bit.
        expect_close(gr.second, gr2.second, 1e-5, tag + " weight gradient");
      }
      // The fused chain (ReLU, depthwise, 1x1, BN): output and every gradient, and the 1x1
      // weight gradient alone (its recomputation takes the direct form when the depthwise
      // weight gradient is not asked for).
      auto xr = x.clone().requires_grad_();
      auto wd = w.clone().requires_grad_();
      auto wp = torch::randn({7, 5, 1, 1}).requires_grad_();
      auto bn = nn::BatchNorm2d(nn::BatchNorm2dOptions(7).affine(false));
      auto run = [&](std::vector<torch::Tensor> wrt) {
        auto out = fused_relu_dw_pw_bn(xr, wd, wp, *bn, 1, pad, d, torch::Tensor());
        auto go = torch::ones_like(out).mul_(0.5).add_(out.detach());
        auto grads = torch::autograd::grad({out}, wrt, {go});
        grads.insert(grads.begin(), out.detach());
        return grads;
      };
      const auto all = run({xr, wd, wp}), pw_only = run({wp});
      DirectOff off;
      const auto all2 = run({xr, wd, wp}), pw_only2 = run({wp});
      // {output, x, depthwise weight, 1x1 weight}: the depthwise weight gradient to float rounding
      // (its sums' grouping differs), the rest bit for bit.
      for (size_t i = 0; i < all.size(); ++i)
        if (i == 2) expect_close(all[i], all2[i], 1e-5, tag + " chain depthwise weight gradient");
        else EXPECT_TRUE(torch::equal(all[i], all2[i])) << tag << " chain " << i;
      for (size_t i = 0; i < pw_only.size(); ++i)
        EXPECT_TRUE(torch::equal(pw_only[i], pw_only2[i])) << tag << " chain, 1x1 weight gradient alone " << i;
    }
}

TEST(Fused, DirectPoolsEqualThePhaseLayoutAndATenWithInfiniteWindows) {
  // The stride-1 pools' direct form: forward bit for bit the phase layout's; gradients to float
  // rounding (additions into one input come in another order). A window of -inf only: the
  // gradient goes to its first tap inside the plane, as ATen's indices say.
  if (!avx512_kernels_active()) GTEST_SKIP() << "the direct form runs only with the AVX-512 kernels";
  for (const std::vector<int64_t> hw : {std::vector<int64_t>{9, 7}, {1, 1}, {2, 3}, {28, 28}, {41, 37}})
    for (const bool max_pool : {true, false}) {
      const std::string tag = std::string(max_pool ? "max " : "avg ") + std::to_string(hw[0]) + "x" + std::to_string(hw[1]);
      torch::manual_seed(11);
      auto x = torch::randn({2, 3, hw[0], hw[1]}).mul(2).round();
      if (max_pool && hw[0] >= 9) x.index_put_({0, 1, torch::indexing::Slice(0, 3), torch::indexing::Slice(0, 3)},
                                                -std::numeric_limits<float>::infinity());
      auto xa = x.clone().requires_grad_(), xb = x.clone().requires_grad_();
      auto y = fused_pool(xa, max_pool, 1);
      auto ref = max_pool ? torch::max_pool2d(xb, {3, 3}, {1, 1}, {1, 1})
                          : torch::avg_pool2d(xb, {3, 3}, {1, 1}, {1, 1}, false, false);
      EXPECT_TRUE(torch::equal(y, ref)) << tag << " forward against ATen";
      auto g = torch::randn_like(y);
      auto gx = torch::autograd::grad({y}, {xa}, {g})[0];
      expect_close(gx, torch::autograd::grad({ref}, {xb}, {g})[0], 1e-6, tag + " grad against ATen");
      DirectOff off;
      auto xc = x.clone().requires_grad_();
      auto y2 = fused_pool(xc, max_pool, 1);
      EXPECT_TRUE(torch::equal(y, y2)) << tag << " forward against the phase layout";
      if (max_pool && hw[0] >= 9) continue;  // the phase layout may place a -inf window's gradient in its padding
      expect_close(gx, torch::autograd::grad({y2}, {xc}, {g})[0], 1e-6, tag + " grad against the phase layout");
    }
}

TEST(Fused, PoolsWithBatchNormMatchTheModulesAndMaxPoolTiesGoToTheFirstTap) {
  // 9 x 7 planes: one partial register; 23 x 21: several 64-output passes and a partial one.
  for (const int mode : kKernelModes)
  for (const std::vector<int64_t> hw : {std::vector<int64_t>{9, 7}, std::vector<int64_t>{23, 21}})
  for (bool max_pool : {true, false})
    for (int64_t stride : {1, 2}) {
      KernelMode km(mode);
      torch::manual_seed(5);
      auto bn = nn::BatchNorm2d(nn::BatchNorm2dOptions(3).affine(false));
      auto bn2 = nn::BatchNorm2d(nn::BatchNorm2dOptions(3).affine(false));
      // Rounded values: many ties inside the 3x3 windows.
      auto x = torch::randn({2, 3, hw[0], hw[1]}).mul(2).round().requires_grad_();
      auto x2 = x.detach().clone().requires_grad_();
      auto y = fused_pool_bn(x, max_pool, stride, *bn);
      auto p = max_pool ? torch::max_pool2d(x2, {3, 3}, {stride, stride}, {1, 1})
                        : torch::avg_pool2d(x2, {3, 3}, {stride, stride}, {1, 1}, false, false);
      auto y2 = bn2->forward(p);
      const std::string tag = std::string(max_pool ? "max" : "avg") + " stride " + std::to_string(stride) +
                              " mode " + std::to_string(mode) + " " + std::to_string(hw[0]) + "x" + std::to_string(hw[1]);
      expect_close(y, y2, 1e-5, tag + " forward");
      auto g = torch::randn_like(y);
      expect_close(torch::autograd::grad({y}, {x}, {g})[0], torch::autograd::grad({y2}, {x2}, {g})[0], 1e-5,
                   tag + " grad");
      expect_close(bn->running_var, bn2->running_var, 1e-6, tag + " running var");
    }
}

TEST(Fused, GradientsArrivingAsChannelSlicesGiveTheSameBitsAsContiguousOnes) {
  // A cell's output gradient reaches its states as channel slices (strided images and channels,
  // contiguous planes): the BN backward reads them in place. The same gradients, bit for bit, as
  // from a contiguous copy, for a separable chain and both pools, with a one-element mixing weight
  // as gamma (whose gradient is d gamma summed over the channels) and without.
  for (const int mode : kKernelModes)
  for (const bool folded : {false, true}) {
    KernelMode km(mode);
    torch::manual_seed(23);
    const int64_t c = 5;
    auto bn = nn::BatchNorm2d(nn::BatchNorm2dOptions(c).affine(false));
    auto x = torch::randn({3, c, 9, 9}).requires_grad_();
    auto w_dw = torch::randn({c, 1, 3, 3}).requires_grad_(), w_pw = torch::randn({c, c, 1, 1}).requires_grad_();
    auto mix = torch::rand({4}).add(0.5).requires_grad_();
    const std::string tag = std::string(folded ? "folded" : "plain") + " mode " + std::to_string(mode);
    auto check = [&](const std::function<torch::Tensor()>& f, const std::vector<torch::Tensor>& wrt, const std::string& what) {
      auto y = f();
      const auto g = torch::randn({y.size(0), 3 * c, y.size(2), y.size(3)}).narrow(1, c, c);
      ASSERT_FALSE(g.is_contiguous());
      auto a = torch::autograd::grad({y}, wrt, {g}, false, false, /*allow_unused=*/true);
      auto b = torch::autograd::grad({f()}, wrt, {g.contiguous()}, false, false, true);
      for (size_t i = 0; i < a.size(); ++i) {
        ASSERT_EQ(a[i].defined(), b[i].defined()) << tag << " " << what << " " << i;
        if (a[i].defined()) EXPECT_TRUE(torch::equal(a[i], b[i])) << tag << " " << what << " gradient " << i;
      }
      if (folded) EXPECT_TRUE(a.back().defined() && a.back().abs().sum().item<float>() > 0) << tag << " " << what;
    };
    const torch::Tensor none;
    check([&] { return fused_relu_dw_pw_bn(x, w_dw, w_pw, *bn, 1, 1, 1, none, folded ? mix.narrow(0, 1, 1) : none); },
          {x, w_dw, w_pw, mix}, "chain");
    check([&] { return fused_pool_bn(x, true, 1, *bn, folded ? mix.narrow(0, 2, 1) : none); }, {x, mix}, "max pool");
    check([&] { return fused_pool_bn(x, false, 2, *bn, folded ? mix.narrow(0, 3, 1) : none); }, {x, mix}, "avg pool");
  }
}

TEST(Fused, WeightedSumValuesAndGradients) {
  torch::manual_seed(7);
  auto w = torch::softmax(torch::randn({3}), 0).detach().requires_grad_();
  std::vector<torch::Tensor> ys{torch::randn({2, 4, 5, 5}).requires_grad_(), torch::randn({2, 4, 5, 5}),
                                torch::randn({2, 4, 5, 5}).requires_grad_()};
  auto out = weighted_sum(w, ys);
  auto ref = w[0] * ys[0] + w[1] * ys[1] + w[2] * ys[2];
  expect_close(out, ref, 1e-6, "sum");
  auto g = torch::randn_like(out);
  auto ga = torch::autograd::grad({out}, {w, ys[0], ys[2]}, {g});
  auto gb = torch::autograd::grad({ref}, {w, ys[0], ys[2]}, {g});
  for (size_t i = 0; i < ga.size(); ++i) expect_close(ga[i], gb[i], 1e-5, "grad " + std::to_string(i));
  // The node keeps the op outputs (one reference each) only for the weights' gradient: with the
  // weights frozen (the search's weight step) it keeps none, and the inputs' gradients are the same.
  {
    const auto base = ys[0].use_count();  // the references `out` and `ref` above keep
    auto kept = weighted_sum(w, ys);
    EXPECT_EQ(ys[0].use_count(), base + 1);
    auto wf = w.detach();
    auto frozen = weighted_sum(wf, ys);
    EXPECT_EQ(ys[0].use_count(), base + 1);  // the first node's reference only
    kept.reset();
    EXPECT_EQ(ys[0].use_count(), base);
    auto gf = torch::autograd::grad({frozen}, {ys[0], ys[2]}, {g});
    expect_close(gf[0], gb[1], 1e-6, "grad of an op output, weights frozen");
    expect_close(gf[1], gb[2], 1e-6, "grad of another op output, weights frozen");
  }
  // No graph when nothing needs a gradient.
  torch::NoGradGuard ng;
  EXPECT_FALSE(weighted_sum(w, ys).requires_grad());
}

namespace {
// A small search network's options (C 4, 5 classes, 3 cells, 1 input channel): DARTS' 8 ops
// (with `none`), or NoisyDARTS' 7 with noise 0.2 and skip drop-path 0.3.
SearchNetworkOptions small_search_options(bool darts) {
  SearchNetworkOptions o(4, 5, 3);
  o.in_channels(1);
  if (darts) o.primitives(darts_primitives());
  else {
    NoiseOptions no;
    no.lambda = 0.2;
    no.skip_drop_path = 0.3;
    o.noise(no);
  }
  return o;
}
}  // namespace

TEST(Fused, SearchNetworkFusedEqualsModuleByModule) {
  // DARTS' 8 ops (with `none`) and NoisyDARTS' 7 with noise and skip drop-path: the noise draws
  // happen in the same order either way, so the same seed gives the same network outputs.
  for (const int mode : kKernelModes)
  for (const bool darts : {true, false}) {
    KernelMode sw(mode);
    const SearchNetworkOptions o = small_search_options(darts);
    torch::manual_seed(11);
    auto net = make_search_network(o);
    torch::manual_seed(11);
    auto twin = make_search_network(o);
    auto x = torch::randn({6, 1, 12, 12});
    auto y = torch::randint(0, 5, {6});
    auto run = [&](SearchNetwork& n, bool fused) {
      FusedSwitch sw(fused);
      torch::manual_seed(99);
      auto logits = n->forward(x);
      auto loss = torch::nn::functional::cross_entropy(logits, y);
      auto params = n->arch_parameters();
      auto w = n->weight_parameters();
      params.insert(params.end(), w.begin(), w.end());
      auto g = torch::autograd::grad({loss}, params, {}, false, false, /*allow_unused=*/true);
      return std::make_pair(logits.detach(), g);
    };
    auto a = run(net, true), b = run(twin, false);
    const std::string tag = std::string(darts ? "darts " : "noisydarts ") + kernel_mode_name(mode);
    expect_close(a.first, b.first, 1e-4, tag + " logits");
    ASSERT_EQ(a.second.size(), b.second.size());
    for (size_t i = 0; i < a.second.size(); ++i) {
      if (!a.second[i].defined() || !b.second[i].defined()) {
        EXPECT_EQ(a.second[i].defined(), b.second[i].defined()) << tag << " gradient " << i;
        continue;
      }
      expect_close(a.second[i], b.second[i], 1e-3, tag + " gradient " + std::to_string(i));
    }
  }
}

TEST(Fused, EvaluationNetworkFusedEqualsModuleByModule) {
  // The training step's math (affine BN, auxiliary head, drop-path folded into the chains) and
  // the evaluation mode's: logits, every gradient and the running statistics agree with the
  // module-by-module network. The drop-path masks are drawn in the same order either way.
  for (const int mode : kKernelModes)
  for (const std::string genotype : {"NoisyDARTS_a", "DARTS_V2"}) {
    KernelMode sw(mode);
    EvalNetworkOptions o(6, 5, 5, builtin_genotype(genotype));  // 5 layers: grouped 1x1s before a reduction too
    o.in_channels(1).auxiliary(true).drop_path_prob(0.3);
    torch::manual_seed(5);
    EvalNetwork net(o);
    torch::manual_seed(5);
    EvalNetwork twin(o);
    {
      torch::NoGradGuard ng;  // BN weights and biases away from 1 and 0
      auto a = net->named_parameters(), b = twin->named_parameters();
      for (const auto& kv : a)
        if (kv.value().dim() == 1) {  // every BN weight and bias (and the classifiers' biases)
          kv.value().uniform_(0.5, 1.5);
          b[kv.key()].copy_(kv.value());
        }
    }
    auto x = torch::randn({6, 1, 16, 16});
    auto y = torch::randint(0, 5, {6});
    auto run = [&](EvalNetwork& n, bool fused) {
      FusedSwitch f(fused);
      n->train();
      torch::manual_seed(42);
      auto out = n->forward(x);
      auto loss = torch::nn::functional::cross_entropy(out.logits, y) +
                  0.4 * torch::nn::functional::cross_entropy(out.aux_logits, y);
      auto g = torch::autograd::grad({loss}, n->parameters());
      g.insert(g.begin(), {out.logits.detach(), out.aux_logits.detach()});
      n->eval();
      torch::InferenceMode im;
      g.push_back(n->forward(x).logits);
      return g;
    };
    auto a = run(net, true), b = run(twin, false);
    const std::string tag = genotype + " " + kernel_mode_name(mode);
    ASSERT_EQ(a.size(), b.size());
    expect_close(a[0], b[0], 1e-4, tag + " logits");
    expect_close(a[1], b[1], 1e-4, tag + " auxiliary logits");
    expect_close(a.back(), b.back(), 1e-4, tag + " evaluation-mode logits");
    auto names = net->named_parameters().keys();
    for (size_t i = 2; i + 1 < a.size(); ++i) expect_close(a[i], b[i], 1e-3, tag + " gradient of " + names[i - 2]);
    auto ba = net->named_buffers(), bb = twin->named_buffers();
    for (const auto& kv : ba) {
      if (kv.value().scalar_type() == torch::kLong) EXPECT_TRUE(torch::equal(kv.value(), bb[kv.key()])) << kv.key();
      else expect_close(kv.value(), bb[kv.key()], 1e-5, tag + " buffer " + kv.key());
    }
  }
}

TEST(Fused, ArchitectureStepFreezesTheWeightsAndRestoresThem) {
  SearchNetworkOptions o(4, 5, 2);
  o.in_channels(1);
  torch::manual_seed(13);
  auto net = make_search_network(o);
  torch::manual_seed(13);
  auto twin = make_search_network(o);
  Batch b{torch::randn({4, 1, 8, 8}), torch::randint(0, 5, {4})};
  Architect arch(net, ArchitectOptions{}), arch2(twin, ArchitectOptions{});
  {
    FusedSwitch on(true);
    torch::manual_seed(1);
    arch.step(b);
  }
  {
    FusedSwitch off(false);
    torch::manual_seed(1);
    arch2.step(b);
  }
  for (const auto& p : net->weight_parameters()) {
    EXPECT_TRUE(p.requires_grad());
    EXPECT_FALSE(p.grad().defined());
  }
  auto a = net->arch_parameters(), c = twin->arch_parameters();
  for (size_t i = 0; i < a.size(); ++i) expect_close(a[i], c[i], 1e-6, "alphas after one Adam step");
}

TEST(Fused, DoubleBackwardThroughFusedOpsMatchesTheModules) {
  SearchNetworkOptions o(4, 5, 3);
  o.in_channels(1).primitives(darts_primitives());
  torch::manual_seed(17);
  auto net = make_search_network(o);
  Batch b{torch::randn({4, 1, 8, 8}), torch::randint(0, 5, {4})};
  std::vector<torch::Tensor> v;
  for (const auto& a : net->arch_parameters()) v.push_back(torch::randn_like(a));
  std::vector<torch::Tensor> fused, plain;
  {
    FusedSwitch on(true);
    fused = alpha_hessian_vector_product(net, b, v);
  }
  {
    FusedSwitch off(false);
    plain = alpha_hessian_vector_product(net, b, v);
  }
  ASSERT_EQ(fused.size(), plain.size());
  for (size_t i = 0; i < fused.size(); ++i) expect_close(fused[i], plain[i], 1e-3, "Hv " + std::to_string(i));
  EXPECT_GT(fused[0].abs().max().item<double>(), 0.0);
}

namespace {
struct SinksSwitch {
  explicit SinksSwitch(bool on) { set_grad_sinks(on); }
  ~SinksSwitch() { set_grad_sinks(true); }
};

// The nodes of a graph whose name contains `part`, each counted once.
int64_t count_nodes(const torch::Tensor& root, const std::string& part) {
  std::vector<torch::autograd::Node*> todo{root.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  int64_t n = 0;
  while (!todo.empty()) {
    auto* f = todo.back();
    todo.pop_back();
    if (!f || !seen.insert(f).second) continue;
    if (f->name().find(part) != std::string::npos) ++n;
    for (const auto& e : f->next_edges()) todo.push_back(e.function.get());
  }
  return n;
}
}  // namespace

TEST(Fused, GradientSinksGiveAutogradsGradientsWithoutItsSums) {
  // A search network whose states' input gradients the fused nodes add into one buffer each
  // (fused_ops.h GradSinkScope) against the same network with autograd summing them: equal
  // logits, the same gradients to float rounding (only the order of the terms differs), for a
  // full backward, for the architecture alone (the engine skips the states' sinks it does not
  // need), twice over one retained graph (each backward starts from an empty buffer), and with
  // an input that needs its gradient. Normal and reduction cells (stride 1 and 2: direct and
  // phase forms), noise on the skips (their gradient reaches the state the usual way).
  for (const int mode : {0, 2}) {
    KernelMode km(mode);
    SearchNetworkOptions o(4, 5, 3);
    o.in_channels(1).steps(3).multiplier(2);
    NoiseOptions no;
    no.lambda = 0.2;
    o.noise(no);
    torch::manual_seed(23);
    auto net = make_search_network(o);
    auto x = torch::randn({5, 1, 12, 12}), y = torch::randint(0, 5, {5});
    auto params = net->arch_parameters();
    const size_t n_arch = params.size();
    for (const auto& w : net->weight_parameters()) params.push_back(w);
    struct Run {
      torch::Tensor logits, gx;
      std::vector<torch::Tensor> all, again, arch;
      int64_t sinks = 0;
    };
    auto run = [&](bool sinks) {
      SinksSwitch sw(sinks);
      FusedSwitch fused(true);
      Run r;
      torch::manual_seed(5);
      auto xi = x.clone().requires_grad_();
      auto logits = net->forward(xi);
      auto loss = torch::nn::functional::cross_entropy(logits, y);
      r.logits = logits.detach();
      r.sinks = count_nodes(loss, "SinkFn");
      auto with_x = params;
      with_x.push_back(xi);
      r.all = torch::autograd::grad({loss}, with_x, {}, /*retain_graph=*/true, false, /*allow_unused=*/true);
      r.gx = r.all.back();
      r.all.pop_back();
      r.again = torch::autograd::grad({loss}, params, {}, true, false, true);
      r.arch = torch::autograd::grad({loss}, std::vector<torch::Tensor>(params.begin(), params.begin() + n_arch), {},
                                     false, false, true);
      return r;
    };
    const Run on = run(true), off = run(false);
    const std::string tag = kernel_mode_name(mode);
    EXPECT_EQ(on.sinks, 3 * (2 + 2)) << tag << ": every state of every cell that feeds an edge has a sink";
    EXPECT_EQ(off.sinks, 0) << tag;
    EXPECT_TRUE(torch::equal(on.logits, off.logits)) << tag;
    expect_close(on.gx, off.gx, 1e-5, tag + " input gradient");
    ASSERT_EQ(on.all.size(), params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      ASSERT_TRUE(on.all[i].defined() && off.all[i].defined()) << tag << " gradient " << i;
      expect_close(on.all[i], off.all[i], 1e-5, tag + " gradient " + std::to_string(i));
      EXPECT_TRUE(torch::equal(on.again[i], on.all[i])) << tag << " second backward, gradient " << i;
    }
    for (size_t i = 0; i < n_arch; ++i) {
      expect_close(on.arch[i], off.arch[i], 1e-5, tag + " architecture-only gradient " + std::to_string(i));
      EXPECT_TRUE(torch::equal(on.arch[i], on.all[i])) << tag << " architecture-only gradient " << i;
    }
  }
  // Outside a scope, without a gradient or with the sinks off, wrap is the identity.
  auto t = torch::randn({2, 3, 4, 4}).requires_grad_();
  {
    GradSinkScope scope;
    torch::NoGradGuard ng;
    EXPECT_TRUE(scope.wrap(t).is_same(t));
  }
  {
    GradSinkScope scope;
    SinksSwitch off(false);
    EXPECT_TRUE(scope.wrap(t).is_same(t));
  }
  {
    GradSinkScope outer;
    { GradSinkScope inner; }
    auto u = outer.wrap(t);
    EXPECT_FALSE(u.is_same(t));
    EXPECT_TRUE(torch::equal(u, t));
    GradSinkScope inner;
    EXPECT_TRUE(outer.wrap(t).is_same(t)) << "only the innermost live scope wraps";
  }
}

namespace {
struct FoldSwitch {
  explicit FoldSwitch(bool on) { set_mix_weight_fold(on); }
  ~FoldSwitch() { set_mix_weight_fold(true); }
};
}  // namespace

TEST(Fused, MixingWeightsTakenIntoTheOpsLastNodesEqualTheWeightedSum) {
  // The search edges' separable and dilated convolutions and pools take their edge's weight into
  // their last fused node (as the BN's gamma), and the edge's sum adds them as they are, against
  // the sum multiplying them (set_mix_weight_fold): the same logits, running statistics and
  // gradients to float rounding (each edge's sum rounds differently), for a full backward, for the architecture step (weights frozen:
  // the edges on the stem's output keep no input, only gamma needs a gradient there) and for a
  // Hessian-vector product through it (double backward), with DARTS' ops and NoisyDARTS' noisy
  // skip (never folded: its noise comes after the op), in the best and the portable kernels.
  for (const int mode : {0, 2})
  for (const bool darts : {true, false}) {
    KernelMode km(mode);
    const SearchNetworkOptions o = small_search_options(darts);
    torch::manual_seed(19);
    auto net = make_search_network(o);
    auto x = torch::randn({6, 1, 10, 10});
    auto y = torch::randint(0, 5, {6});
    const auto alphas = net->arch_parameters();
    auto params = alphas;
    for (const auto& w : net->weight_parameters()) params.push_back(w);
    std::vector<torch::Tensor> v;
    for (const auto& a : alphas) v.push_back(torch::randn_like(a));
    std::vector<torch::Tensor> initial;
    for (const auto& b : net->buffers()) initial.push_back(b.clone());
    struct Run {
      torch::Tensor logits;
      std::vector<torch::Tensor> all, arch, hv, stats;
      int64_t folded = 0;
    };
    auto run = [&](bool fold) {
      FoldSwitch fs(fold);
      FusedSwitch fused(true);
      Run r;
      torch::manual_seed(5);
      auto logits = net->forward(x);
      auto loss = torch::nn::functional::cross_entropy(logits, y);
      r.logits = logits.detach();
      r.folded = count_nodes(loss, "SliceBackward");  // one per folded op: its weight, sliced off the edge's, as gamma
      r.all = torch::autograd::grad({loss}, params, {}, false, false, /*allow_unused=*/true);
      {
        WeightsFrozen frozen(net->weight_parameters());
        torch::manual_seed(5);
        auto l2 = torch::nn::functional::cross_entropy(net->forward(x), y);
        r.arch = torch::autograd::grad({l2}, alphas, {}, /*retain_graph=*/true, false);
        auto ga = torch::autograd::grad({l2}, alphas, {}, true, /*create_graph=*/true);
        torch::Tensor dot;
        for (size_t i = 0; i < alphas.size(); ++i) {
          auto t = (ga[i] * v[i]).sum();
          dot = dot.defined() ? dot + t : t;
        }
        r.hv = torch::autograd::grad({dot}, alphas);
      }
      for (const auto& b : net->buffers()) r.stats.push_back(b.clone());
      torch::NoGradGuard ng;
      auto bufs = net->buffers();
      for (size_t i = 0; i < bufs.size(); ++i) bufs[i].copy_(initial[i]);
      return r;
    };
    const Run on = run(true), off = run(false);
    const std::string tag = std::string(darts ? "darts " : "noisydarts ") + kernel_mode_name(mode);
    // Per edge: 4 convolutions and 2 pools (the skip and `none` are not folded); 14 edges per cell.
    EXPECT_EQ(on.folded, 3 * 14 * 6) << tag;
    EXPECT_EQ(off.folded, 0) << tag;
    expect_close(on.logits, off.logits, 1e-5, tag + " logits");
    ASSERT_EQ(on.stats.size(), off.stats.size());
    for (size_t i = 0; i < on.stats.size(); ++i)  // the states differ by rounding after the first sums
      expect_close(on.stats[i].to(torch::kDouble), off.stats[i].to(torch::kDouble), 1e-5, tag + " buffer " + std::to_string(i));
    for (size_t i = 0; i < params.size(); ++i) {
      ASSERT_TRUE(on.all[i].defined() && off.all[i].defined()) << tag << " gradient " << i;
      expect_close(on.all[i], off.all[i], 1e-5, tag + " gradient " + std::to_string(i));
    }
    for (size_t i = 0; i < alphas.size(); ++i) {
      expect_close(on.arch[i], off.arch[i], 1e-5, tag + " architecture gradient " + std::to_string(i));
      expect_close(on.arch[i], on.all[i], 1e-5, tag + " architecture gradient against the full one " + std::to_string(i));
      expect_close(on.hv[i], off.hv[i], 1e-4, tag + " Hessian-vector product " + std::to_string(i));
    }
    EXPECT_GT(on.hv[0].abs().max().item<double>(), 0.0) << tag;
  }
}

TEST(Fused, DropPathNodeEqualsATensMulAndDivBitForBit) {
  // drop_path (the skips' drop-path in a NoisyDARTS search, the evaluation network's pools) as
  // one node against ATen's x * mask / keep: the same values and input gradient, bitwise, for
  // a contiguous tensor and a channel slice, with negative values, zeros, infinities and NaN.
  torch::manual_seed(31);
  auto base = torch::randn({6, 8, 5, 7});
  base[0][4][0][0] = std::numeric_limits<float>::infinity();
  base[1][3][1][1] = std::numeric_limits<float>::quiet_NaN();
  base[2][2][2][2] = -0.f;
  base[4][3][0][1] = -2.f;
  auto mask = torch::tensor({1.f, 0.f, 1.f, 1.f, 0.f, 1.f}).view({6, 1, 1, 1});
  const double keep = 0.7;
  for (const bool slice : {false, true}) {
    auto run = [&](bool fused) {
      FusedSwitch sw(fused);
      auto x = base.clone().requires_grad_();
      auto in = slice ? x.narrow(1, 2, 5) : x;
      auto y = fused_drop_path(in, mask, keep);
      auto g = torch::randn(y.sizes(), torch::Generator(at::detail::createCPUGenerator(7)));
      auto gx = torch::autograd::grad({y}, {x}, {g})[0];
      return std::make_pair(y.detach(), gx);
    };
    auto a = run(true), b = run(false);
    const std::string tag = slice ? "slice" : "contiguous";
    EXPECT_TRUE(torch::equal(a.first.nan_to_num(0, 1, -1), b.first.nan_to_num(0, 1, -1))) << tag << " values";
    EXPECT_TRUE(torch::equal(a.first.isnan(), b.first.isnan())) << tag;
    EXPECT_TRUE(torch::equal(a.first.signbit(), b.first.signbit())) << tag << " signs of zeros";
    EXPECT_TRUE(torch::equal(a.second, b.second)) << tag << " input gradient";
    EXPECT_TRUE(torch::equal(a.first[4], torch::zeros_like(a.first[4]))) << tag << " a dropped image is zero";
    EXPECT_TRUE(a.first[1].isnan().any().item<bool>()) << tag << " NaN * 0 stays NaN";
  }
  // The fused form runs only where it should: a node of its own on CPU float tensors.
  auto x = base.clone().requires_grad_();
  EXPECT_NE(fused_drop_path(x, mask, keep).grad_fn()->name().find("DropPathFn"), std::string::npos);
}

TEST(Fused, ResultsDoNotDependOnTheThreadCount) {
  torch::manual_seed(19);
  auto op = make_op("sep_conv_5x5", 8, 2, false);
  auto x = torch::randn({5, 8, 15, 15}).requires_grad_();
  auto run = [&](int threads) {
    ThreadCount t(threads);
    FusedSwitch on(true);
    auto y = op.forward(x);
    auto params = op.ptr()->parameters();
    params.insert(params.begin(), x);
    auto g = torch::autograd::grad({y.pow(2).sum()}, params);
    g.insert(g.begin(), y.detach());
    return g;
  };
  auto one = run(1), two = run(2);
  for (size_t i = 0; i < one.size(); ++i) EXPECT_TRUE(torch::equal(one[i], two[i])) << "tensor " << i;
}

TEST(Fused, ClipAndSgdStepMatchesLibTorchsClipAndSgd) {
  // The fused weight update against clip_grad_norm_ + SGD::step on the same parameters and
  // gradients: five steps (the first makes the momentum buffers), clipping active (large
  // gradients) and inactive (small ones), parameters of 1 to 40000 floats (several chunks), one
  // without a gradient (skipped: no state, untouched). The total norm's grouping differs from
  // LibTorch's per-parameter norms, so the clip factor, and with it everything after clipping,
  // may differ in the last bit; without clipping the update is the same per element.
  for (const double scale : {100.0, 1e-3}) {
    for (const int threads : {1, 2}) {
      ThreadCount tc(threads);
      torch::manual_seed(5);
      std::vector<torch::Tensor> a, b;
      for (const int64_t n : {1, 7, 300, 40000, 33}) {
        auto t = torch::randn({n});
        a.push_back(t.clone().requires_grad_());
        b.push_back(t.clone().requires_grad_());
      }
      const auto opts = torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(3e-4);
      torch::optim::SGD ours(a, opts), theirs(b, opts);
      for (int step = 0; step < 5; ++step) {
        for (size_t k = 0; k < a.size(); ++k) {
          if (k == 2) continue;  // no gradient
          auto g = torch::randn({a[k].numel()}) * scale;
          a[k].mutable_grad() = g.clone();
          b[k].mutable_grad() = g.clone();
        }
        const double n1 = clip_and_sgd_step(ours, a, 5.0);
        const double n2 = torch::nn::utils::clip_grad_norm_(b, 5.0);
        theirs.step();
        EXPECT_NEAR(n1, n2, 1e-5 * n2) << "step " << step;
        for (size_t k = 0; k < a.size(); ++k) {
          const std::string tag = "scale " + std::to_string(scale) + " threads " + std::to_string(threads) +
                                  " step " + std::to_string(step) + " param " + std::to_string(k);
          if (scale < 1) {
            EXPECT_TRUE(torch::equal(a[k], b[k])) << tag;
          } else {
            expect_close(a[k].detach(), b[k].detach(), 1e-6, tag);
          }
          if (k != 2) expect_close(a[k].grad(), b[k].grad(), 1e-6, tag + " clipped gradient");
        }
        EXPECT_EQ(ours.state().size(), 4u);
        EXPECT_EQ(ours.state().count(c10::guts::to_string(a[2].unsafeGetTensorImpl())), 0u);
      }
      for (size_t k = 0; k < a.size(); ++k) {
        if (k == 2) continue;
        const auto key_a = c10::guts::to_string(a[k].unsafeGetTensorImpl());
        const auto key_b = c10::guts::to_string(b[k].unsafeGetTensorImpl());
        expect_close(static_cast<torch::optim::SGDParamState&>(*ours.state().at(key_a)).momentum_buffer(),
                     static_cast<torch::optim::SGDParamState&>(*theirs.state().at(key_b)).momentum_buffer(), 1e-6,
                     "momentum buffer " + std::to_string(k));
      }
    }
  }
}
