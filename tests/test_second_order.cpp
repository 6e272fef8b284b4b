// Second-order DARTS and the Hessian analysis (hessian.h): the finite-difference product against
// exact double backward, the unrolled alpha gradient against a brute-force finite difference of
// the unrolled objective, power iteration against an explicitly formed Hessian, and the search
// loop with --order second / --hessian-every (resume, analyze).
#include <gtest/gtest.h>

#include "cli_helpers.h"
#include "tensor_helpers.h"
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "noisydarts/checkpoint.h"
#include "noisydarts/hessian.h"
#include "noisydarts/search.h"

namespace nd = noisydarts;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// A tiny search network in double precision: 3 cells (one normal, two reductions), 2 nodes per
// cell (5 edges), 4 ops, noise off unless asked: 40 alphas in all.
nd::SearchNetwork tiny_net(bool noise = false, uint64_t seed = 3) {
  torch::manual_seed(seed);
  nd::SearchNetworkOptions o(4, 3, 3);
  o.in_channels(1).steps(2).multiplier(2)
      .primitives({"skip_connect", "sep_conv_3x3", "max_pool_3x3", "dil_conv_3x3"});
  nd::NoiseOptions n;
  if (!noise) n.type = nd::NoiseType::kNone;
  o.noise(n).alpha_init_std(0.5);  // distinct alphas: a generic point, not the uniform start
  nd::SearchNetwork net = make_search_network(o);
  net->to(torch::kDouble);
  net->train();
  return net;
}

nd::Batch tiny_batch(uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({6, 1, 8, 8}, torch::kDouble), torch::randint(0, 3, {6}, torch::kLong)};
}

std::vector<torch::Tensor> randn_like_all(const std::vector<torch::Tensor>& ts, double scale = 1) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) out.push_back(torch::randn_like(t) * scale);
  return out;
}

double max_abs(const std::vector<torch::Tensor>& ts) {
  double m = 0;
  for (const auto& t : ts) m = std::max(m, t.abs().max().item<double>());
  return m;
}

double max_abs_diff(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, (a[i] - b[i]).abs().max().item<double>());
  return m;
}

using noisydarts::test::bitwise_equal;
using noisydarts::test::snapshot;

double loss_of(nd::SearchNetwork& net, const nd::Batch& b) {
  return torch::nn::functional::cross_entropy(net->forward(b.x), b.y).item<double>();
}

}  // namespace

TEST(SecondOrder, FiniteDifferenceMixedProductMatchesDoubleBackward) {
  auto net = tiny_net();
  const auto b = tiny_batch(1);
  auto w = net->weight_parameters();
  auto alphas = net->arch_parameters();
  torch::manual_seed(7);
  const auto v = randn_like_all(w);

  // Exact: d/d alpha of (grad_w L . v), by double backward.
  auto loss = torch::nn::functional::cross_entropy(net->forward(b.x), b.y);
  auto gw = torch::autograd::grad({loss}, w, {}, true, true, true);
  torch::Tensor dot = torch::zeros({}, torch::kDouble);
  for (size_t i = 0; i < w.size(); ++i)
    if (gw[i].defined()) dot = dot + (gw[i] * v[i]).sum();
  const auto exact = nd::grads_or_zero(dot, alphas);

  const auto w_before = snapshot(w);
  const auto buffers_before = snapshot(net->buffers());
  // eps = r / ||v||. Central differences are exact to O(eps^2) on a smooth function, but the
  // network is piecewise smooth (ReLU, max-pool): on this tiny network a step of length
  // r = 0.01 (DARTS' default, chosen for float32 rounding) crosses kinks, whose gradient jumps
  // dominate the quotient (docs/analysis.md). In double precision a step of 1e-6 crosses none
  // and must agree to rounding error, which also rules out the "/2 * eps" slip of several ports.
  const auto fd = nd::finite_difference_mixed_hvp(net, b, v, 1e-6);
  const double scale = max_abs(exact);
  ASSERT_GT(scale, 1e-3);
  EXPECT_LT(max_abs_diff(fd, exact), 1e-6 * scale) << "scale " << scale;
  const auto fd5 = nd::finite_difference_mixed_hvp(net, b, v, 1e-5);
  EXPECT_LT(max_abs_diff(fd5, exact), 1e-6 * scale) << "scale " << scale;
  // The weights and BN statistics are exactly as before.
  EXPECT_TRUE(bitwise_equal(w_before, snapshot(w)));
  EXPECT_TRUE(bitwise_equal(buffers_before, snapshot(net->buffers())));
}

TEST(SecondOrder, UnrolledGradientMatchesBruteForceFiniteDifferenceOfTheUnrolledObjective) {
  auto net = tiny_net();
  const auto train = tiny_batch(1), valid = tiny_batch(2);
  auto w = net->weight_parameters();
  auto alphas = net->arch_parameters();
  torch::manual_seed(9);
  const auto buf = randn_like_all(w, 0.1);  // a momentum buffer as after some SGD steps
  nd::UnrolledOptions uo;
  uo.xi = 0.5;  // large enough that the second-order term clearly matters
  uo.momentum = 0.9;
  uo.weight_decay = 3e-4;
  uo.fd_r = 1e-6;  // see FiniteDifferenceMixedProductMatchesDoubleBackward

  const auto w_before = snapshot(w);
  const auto buffers_before = snapshot(net->buffers());
  const auto g = nd::unrolled_alpha_gradient(net, valid, train, buf, uo);
  EXPECT_TRUE(bitwise_equal(w_before, snapshot(w)));
  EXPECT_TRUE(bitwise_equal(buffers_before, snapshot(net->buffers())));

  // The unrolled objective f(alpha) = L_val(w - xi (m buf + grad_w L_train(w, alpha) + wd w), alpha).
  auto unrolled_objective = [&]() {
    auto l = torch::nn::functional::cross_entropy(net->forward(train.x), train.y);
    auto gw = nd::grads_or_zero(l, w);
    {
      torch::NoGradGuard ng;
      for (size_t i = 0; i < w.size(); ++i)
        w[i].sub_(gw[i] + uo.weight_decay * w_before[i] + uo.momentum * buf[i], uo.xi);
    }
    const double f = loss_of(net, valid);
    torch::NoGradGuard ng;
    for (size_t i = 0; i < w.size(); ++i) w[i].copy_(w_before[i]);
    return f;
  };
  // h = 1e-6: like the finite-difference radius above, larger steps cross ReLU/max-pool kinks of
  // the training forward on this tiny network (h = 1e-5 already does), smaller ones lose digits.
  const double h = 1e-6;
  std::vector<torch::Tensor> brute;
  for (auto& a : alphas) {
    auto gi = torch::zeros_like(a);
    auto af = a.view(-1);
    auto gf = gi.view(-1);
    for (int64_t k = 0; k < af.numel(); ++k) {
      const double orig = af[k].item<double>();
      {
        torch::NoGradGuard ng;
        af[k].fill_(orig + h);
      }
      const double fp = unrolled_objective();
      {
        torch::NoGradGuard ng;
        af[k].fill_(orig - h);
      }
      const double fm = unrolled_objective();
      {
        torch::NoGradGuard ng;
        af[k].fill_(orig);
      }
      gf[k] = (fp - fm) / (2 * h);
    }
    brute.push_back(gi);
  }

  const double scale = max_abs(brute);
  ASSERT_GT(scale, 1e-3);
  EXPECT_LT(max_abs_diff(g.alpha_grad, brute), 1e-6 * scale) << "scale " << scale;

  // The first-order gradient (at the virtual weights, without the implicit term) is clearly
  // different: the comparison above does test the second-order term.
  auto l = torch::nn::functional::cross_entropy(net->forward(train.x), train.y);
  auto gw = nd::grads_or_zero(l, w);
  {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < w.size(); ++i) w[i].sub_(gw[i] + uo.weight_decay * w_before[i] + uo.momentum * buf[i], uo.xi);
  }
  const auto partial = nd::grads_or_zero(torch::nn::functional::cross_entropy(net->forward(valid.x), valid.y), alphas);
  EXPECT_GT(max_abs_diff(partial, brute), 2e-2 * scale);
}

TEST(Hessian, PowerIterationRecoversTheTopEigenvalueOfTheExplicitHessian) {
  auto net = tiny_net();
  const auto b = tiny_batch(4);
  auto alphas = net->arch_parameters();
  // Form H column by column from exact Hessian-vector products.
  int64_t n = 0;
  for (auto& a : alphas) n += a.numel();
  auto H = torch::zeros({n, n}, torch::kDouble);
  for (int64_t c = 0; c < n; ++c) {
    std::vector<torch::Tensor> e;
    int64_t off = 0;
    for (auto& a : alphas) {
      auto t = torch::zeros_like(a);
      if (c >= off && c < off + a.numel()) t.view(-1)[c - off] = 1.0;
      off += a.numel();
      e.push_back(t);
    }
    auto hv = nd::alpha_hessian_vector_product(net, b, e);
    H.select(1, c).copy_(torch::cat({hv[0].reshape(-1), hv[1].reshape(-1)}));
  }
  EXPECT_LT((H - H.t()).abs().max().item<double>(), 1e-9 * H.abs().max().item<double>());
  auto ev = torch::linalg::eigvalsh(H, "L");
  const auto idx = ev.abs().argmax().item<int64_t>();
  const double top = ev[idx].item<double>();
  ASSERT_GT(std::abs(top), 1e-4);

  const auto r = nd::hessian_dominant_eigenvalue(net, b, nd::EigenOptions{2000, 1e-12, 5});
  EXPECT_TRUE(r.converged);
  EXPECT_NEAR(r.eigenvalue, top, 1e-6 * std::abs(top)) << "iterations " << r.iterations;
  // The default budget (20 iterations, tol 1e-3) gets within a few percent.
  const auto quick = nd::hessian_dominant_eigenvalue(net, b);
  EXPECT_NEAR(quick.eigenvalue, top, 0.05 * std::abs(top));
}

TEST(Hessian, AnalysisLeavesTheNetworkAndTheRandomStreamsUntouched) {
  auto net = tiny_net(/*noise=*/true);
  const auto b = tiny_batch(5);
  const auto params = snapshot(net->parameters());
  const auto buffers = snapshot(net->buffers());
  const auto rng = nd::get_cpu_rng_state();
  const auto r1 = nd::hessian_dominant_eigenvalue(net, b);
  const auto r2 = nd::hessian_dominant_eigenvalue(net, b);
  EXPECT_EQ(r1.eigenvalue, r2.eigenvalue);  // the noise is suspended: a deterministic function
  EXPECT_TRUE(bitwise_equal(params, snapshot(net->parameters())));
  EXPECT_TRUE(bitwise_equal(buffers, snapshot(net->buffers())));
  EXPECT_TRUE(torch::equal(rng, nd::get_cpu_rng_state()));
  EXPECT_FALSE(net->noise().suspended);
}

TEST(SecondOrder, WithNoiseBothFiniteDifferencePassesSeeTheSameDraws) {
  // With noise on, the + and - passes replay the same draws: the product stays of the size of
  // the noise-free one instead of noise / eps.
  auto quiet = tiny_net(false), noisy = tiny_net(true);
  const auto b = tiny_batch(6);
  torch::manual_seed(8);
  const auto v = randn_like_all(quiet->weight_parameters());
  const auto a = nd::finite_difference_mixed_hvp(quiet, b, v);
  const auto c = nd::finite_difference_mixed_hvp(noisy, b, v);
  EXPECT_LT(max_abs(c), 20 * max_abs(a));
  EXPECT_GT(max_abs_diff(a, c), 0);  // the noise did act
}

namespace {

fs::path fresh_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("noisydarts_so_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

nd::SearchConfig tiny_search(const fs::path& out) {
  auto cfg = nd::SearchConfig::preset_defaults("noisydarts", "small");
  cfg.dataset = "synthetic";
  cfg.subset = 64;
  cfg.batch_size = 16;
  cfg.channels = 4;
  cfg.layers = 3;
  cfg.epochs = 2;
  cfg.threads = 1;
  cfg.seed = 5;
  cfg.order = "second";
  cfg.hessian_every = 1;
  cfg.hessian_iters = 5;
  cfg.out = out.string();
  return cfg;
}

std::vector<json> metrics(const fs::path& run) {
  std::vector<json> out;
  std::ifstream f(run / "metrics.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    auto j = json::parse(line);
    for (const char* k : {"seconds", "images_per_sec", "hessian_seconds"}) j.erase(k);
    out.push_back(j);
  }
  return out;
}

using noisydarts::test::slurp;

}  // namespace

TEST(SecondOrder, SearchLogsEigenvaluesResumesBitwiseAndAnalyzeAgrees) {
  const auto ref = fresh_dir("ref"), cut = fresh_dir("cut");
  auto cfg = tiny_search(ref);
  cfg.checkpoint_every_min = 1e-9;  // a checkpoint after every step
  cfg.keep_checkpoints = 1000;
  const auto r = nd::run_search(cfg, false);
  EXPECT_EQ(r.epochs_done, 2);
  const auto m = metrics(ref);
  ASSERT_EQ(m.size(), 2u);
  for (const auto& e : m) {
    ASSERT_TRUE(e.contains("hessian_eigenvalue"));
    EXPECT_TRUE(std::isfinite(e["hessian_eigenvalue"].get<double>()));
    EXPECT_GE(e["hessian_iterations"].get<int>(), 1);
    EXPECT_LE(e["hessian_iterations"].get<int>(), 5);
  }

  // `analyze` of the end-of-epoch-1 checkpoint reproduces the logged eigenvalue exactly.
  const auto e1 = ref / "checkpoints" / "search-e0001-s000000.pt";
  ASSERT_TRUE(fs::exists(e1));
  const auto a = nd::analyze_checkpoint(e1.string());
  EXPECT_EQ(a.epoch, 1);
  EXPECT_EQ(a.eigen.eigenvalue, m[0]["hessian_eigenvalue"].get<double>());
  EXPECT_EQ(a.eigen.iterations, m[0]["hessian_iterations"].get<int>());

  // Resume from a mid-epoch-2 checkpoint: same alphas, eigenvalues and genotype, bitwise.
  fs::create_directories(cut / "checkpoints");
  fs::copy_file(ref / "config.json", cut / "config.json");
  const std::string mid = "search-e0001-s000001.pt";
  ASSERT_TRUE(fs::exists(ref / "checkpoints" / mid));
  fs::copy_file(ref / "checkpoints" / mid, cut / "checkpoints" / mid);
  std::ofstream(cut / "checkpoints" / "latest") << mid << "\n";
  nd::SearchConfig rc;
  rc.out = cut.string();
  rc.threads = -1;
  const auto r2 = nd::run_search(rc, true);
  EXPECT_EQ(metrics(ref), metrics(cut));
  EXPECT_EQ(slurp(ref / "genotype.json"), slurp(cut / "genotype.json"));
  EXPECT_EQ(nd::genotype_to_text(r.genotype), nd::genotype_to_text(r2.genotype));
  fs::remove_all(ref);
  fs::remove_all(cut);
}

TEST(SecondOrder, SecondOrderMovesTheAlphasDifferentlyFromFirstOrder) {
  const auto first = fresh_dir("first"), second = fresh_dir("second");
  auto c1 = tiny_search(first);
  c1.order = "first";
  c1.hessian_every = 0;
  c1.epochs = 1;
  auto c2 = tiny_search(second);
  c2.hessian_every = 0;
  c2.epochs = 1;
  nd::run_search(c1, false);
  nd::run_search(c2, false);
  const auto m1 = metrics(first), m2 = metrics(second);
  ASSERT_EQ(m1.size(), 1u);
  ASSERT_EQ(m2.size(), 1u);
  EXPECT_NE(m1[0]["alphas_normal"], m2[0]["alphas_normal"]);
  fs::remove_all(first);
  fs::remove_all(second);
}

TEST(Hessian, EarlyStopKeepsTheGenotypeOfTheEarlierEpoch) {
  const auto dir = fresh_dir("es");
  auto cfg = tiny_search(dir);
  cfg.order = "first";
  cfg.subset = 256;
  cfg.seed = 1;
  cfg.epochs = 4;
  cfg.arch_lr = 3e-2;
  cfg.early_stop_ratio = 0.9999;  // stop as soon as a positive eigenvalue grew over one epoch
  cfg.early_stop_window = 1;
  const auto r = nd::run_search(cfg, false);
  const auto m = metrics(dir);
  ASSERT_GE(m.size(), 2u);
  // The rule (lambda(e-1) / lambda(e) < R with lambda(e) > 0) held at the last epoch only.
  auto rule = [&](size_t i) {
    const double then = m[i - 1]["hessian_eigenvalue"].get<double>(), now = m[i]["hessian_eigenvalue"].get<double>();
    return now > 0 && then / now < 0.9999;
  };
  for (size_t i = 1; i + 1 < m.size(); ++i) EXPECT_FALSE(rule(i)) << "epoch " << i + 1;
  const auto& last = m.back();
  ASSERT_TRUE(rule(m.size() - 1)) << "with this seed the eigenvalue grows from epoch 1 to 2 (0.064 -> 0.108)";
  ASSERT_TRUE(last.contains("early_stop"));
  EXPECT_LT(m.size(), 4u);
  const double then = m[m.size() - 2]["hessian_eigenvalue"].get<double>(), now = last["hessian_eigenvalue"].get<double>();
  EXPECT_DOUBLE_EQ(last["early_stop"]["ratio"].get<double>(), then / now);
  EXPECT_EQ(last["early_stop"]["genotype_epoch"].get<int64_t>(), last["epoch"].get<int64_t>() - 1);
  EXPECT_EQ(r.stopped_early_at, last["epoch"].get<int64_t>());
  EXPECT_EQ(nd::genotype_to_text(r.genotype), m[m.size() - 2]["genotype"].get<std::string>());
  EXPECT_EQ(slurp(dir / "genotype.txt"), m[m.size() - 2]["genotype"].get<std::string>() + "\n");
  // A resume of the stopped run stays stopped and keeps that genotype.
  nd::SearchConfig rc;
  rc.out = dir.string();
  rc.threads = -1;
  const auto r2 = nd::run_search(rc, true);
  EXPECT_EQ(metrics(dir).size(), m.size());
  EXPECT_EQ(nd::genotype_to_text(r2.genotype), nd::genotype_to_text(r.genotype));
  fs::remove_all(dir);
}
