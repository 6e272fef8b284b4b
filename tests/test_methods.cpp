// The DARTS-family methods (method.h, src/methods/, docs/methods.md): op weights, extra loss
// terms and their gradients, schedules, derivations, the equalities with DARTS at their neutral
// settings, and a one-epoch CLI search per method.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <set>
#include <sstream>

#include "cli_helpers.h"
#include "noisydarts/config.h"
#include "noisydarts/error.h"
#include "noisydarts/genotype.h"
#include "noisydarts/method.h"
#include "noisydarts/search.h"
#include "noisydarts/search_network.h"
#include "noisydarts/spaces.h"
#include "tensor_helpers.h"

using namespace noisydarts;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

/// The configuration of `method` on a tiny DARTS supernet (4 channels, 3 cells, 1x8x8 images).
SearchConfig tiny_config(const std::string& method) {
  SearchConfig c = SearchConfig::preset_defaults(method, "small");
  c.method = method;
  c.channels = 4;
  c.layers = 3;
  c.alpha_init_std = 1e-3;
  c.finish_layering();
  return c;
}

const DataShape kShape{1, 8, 8, 5};

SearchNetwork tiny_net(const SearchConfig& c, uint64_t seed = 3) {
  torch::manual_seed(seed);
  return build_search_network(c, kShape);
}

Batch tiny_batch(uint64_t seed = 5) {
  torch::manual_seed(seed);
  return {torch::randn({6, 1, 8, 8}), torch::randint(0, 5, {6}, torch::kLong)};
}

/// Logits and every parameter gradient (weights and alphas) of one cross-entropy backward.
std::pair<torch::Tensor, std::vector<torch::Tensor>> logits_and_grads(SearchNetwork& net, const Batch& b) {
  torch::manual_seed(9);  // the same noise draws in both networks
  net->zero_grad();
  auto logits = net->forward(b.x);
  torch::nn::functional::cross_entropy(logits, b.y).backward();
  std::vector<torch::Tensor> g;
  for (auto& p : net->parameters()) g.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return {logits.detach(), g};
}

/// Central differences of scalar f at x (double).
torch::Tensor central_differences(const std::function<double(const torch::Tensor&)>& f, const torch::Tensor& x,
                                  double h = 1e-6) {
  auto g = torch::zeros_like(x);
  auto flat = x.detach().clone().flatten();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    auto p = flat.clone(), m = flat.clone();
    p[i] += h;
    m[i] -= h;
    g.view(-1)[i] = (f(p.view_as(x)) - f(m.view_as(x))) / (2 * h);
  }
  return g;
}

/// Autograd gradient of method `m`'s penalty at alphas `a` against central differences.
void expect_penalty_gradient(const SearchMethod& m, const std::vector<torch::Tensor>& a) {
  std::vector<torch::Tensor> leaves;
  for (auto& t : a) leaves.push_back(t.detach().clone().requires_grad_(true));
  auto p = m.arch_penalty(leaves);
  ASSERT_TRUE(p.defined());
  auto grads = torch::autograd::grad({p}, leaves);
  for (size_t i = 0; i < a.size(); ++i) {
    auto f = [&](const torch::Tensor& x) {
      std::vector<torch::Tensor> v = a;
      v[i] = x;
      return m.arch_penalty(v).item<double>();
    };
    auto cd = central_differences(f, a[i]);
    EXPECT_LT((grads[i] - cd).abs().max().item<double>(), 1e-6) << m.name() << " alpha " << i;
  }
}

fs::path fresh(const std::string& name) {
  auto d = fs::temp_directory_path() / ("noisydarts_methods_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

}  // namespace

TEST(Methods, EveryNameHasAPresetAndAStrategyOfThatName) {
  ASSERT_EQ(method_names().size(), 11u);
  for (const auto& m : method_names()) {
    const SearchConfig c = tiny_config(m);
    EXPECT_EQ(c.method, m);
    EXPECT_NO_THROW(c.validate()) << m;
    EXPECT_EQ(make_search_method(c)->name(), m);
  }
  EXPECT_THROW(SearchConfig::preset_defaults("snas", "small"), UsageError);
}

TEST(Methods, FairDartsWeightsAreSigmoidsAndItsZeroOneLossHasTheRightValueAndGradient) {
  const SearchConfig c = tiny_config("fair-darts");
  auto m = make_search_method(c);
  torch::manual_seed(1);
  auto a = torch::randn({14, 7}, torch::kDouble);
  for (auto k : {ForwardKind::kSearch, ForwardKind::kEval, ForwardKind::kAnalysis})
    EXPECT_TRUE(torch::equal(m->op_weights(0, a, k), torch::sigmoid(a)));
  EXPECT_TRUE(torch::equal(m->derivation_weights(a), torch::sigmoid(a)));
  auto b = torch::randn({14, 7}, torch::kDouble);
  const double expected = -10.0 * (torch::sigmoid(torch::cat({a.flatten(), b.flatten()})) - 0.5).pow(2).mean().item<double>();
  EXPECT_DOUBLE_EQ(m->arch_penalty({a, b}).item<double>(), expected);
  expect_penalty_gradient(*m, {a, b});
  // Its minimum: every weight at 0 or 1 gives -10 * 0.25.
  EXPECT_NEAR(m->arch_penalty({torch::full({2, 3}, 40.0, torch::kDouble), torch::full({2, 3}, -40.0, torch::kDouble)}).item<double>(), -2.5, 1e-12);
}

TEST(Methods, BetaDartsRegulariserIsLambdaTimesTheMeanLogsumexpWithItsGradient) {
  auto net = tiny_net(tiny_config("beta-darts"));
  auto* m = net->method();
  m->begin_epoch(*net, 5, 10);  // lambda = 50 * 5 / 10
  EXPECT_DOUBLE_EQ(m->state()["beta_lambda"].get<double>(), 25.0);
  torch::manual_seed(2);
  auto a = torch::randn({14, 8}, torch::kDouble), b = torch::randn({14, 8}, torch::kDouble);
  const double expected = 25.0 * torch::cat({torch::logsumexp(a, -1), torch::logsumexp(b, -1)}).mean().item<double>();
  EXPECT_NEAR(m->arch_penalty({a, b}).item<double>(), expected, 1e-12);
  expect_penalty_gradient(*m, {a, b});
  // The closed form: d/d alpha = lambda * softmax(alpha) / rows.
  auto leaf = a.clone().requires_grad_(true);
  auto g = torch::autograd::grad({m->arch_penalty({leaf, b})}, {leaf})[0];
  EXPECT_LT((g - 25.0 * torch::softmax(a, -1) / 28.0).abs().max().item<double>(), 1e-12);
}

TEST(Methods, DrnasSamplesDirichletWeightsWhoseMeanIsTheConcentrationShareAndItsKlHasTheRightGradient) {
  SearchConfig c = tiny_config("drnas");
  c.method_settings.drnas.reg = "kl";
  auto m = make_search_method(c);
  auto a = torch::tensor({{0.5, -0.3, 1.2, 0.0}}, torch::kDouble);
  auto conc = torch::elu(a) + 1;
  auto mean = conc / conc.sum(-1, true);
  EXPECT_TRUE(torch::allclose(m->op_weights(0, a, ForwardKind::kEval), mean, 0, 1e-15));
  EXPECT_TRUE(torch::allclose(m->op_weights(0, a, ForwardKind::kAnalysis), mean, 0, 1e-15));
  EXPECT_TRUE(torch::equal(m->derivation_weights(a), torch::softmax(a, -1)));  // the authors' derivation
  torch::manual_seed(4);
  auto many = a.expand({20000, 4}).contiguous();
  auto s = m->op_weights(0, many, ForwardKind::kSearch);
  EXPECT_TRUE(torch::allclose(s.sum(-1), torch::ones({20000}, torch::kDouble), 0, 1e-12));
  EXPECT_GT(s.min().item<double>(), 0.0);
  EXPECT_LT((s.mean(0) - mean[0]).abs().max().item<double>(), 0.01);
  // The sample is reparameterised: a gradient reaches the alphas.
  auto leaf = a.clone().requires_grad_(true);
  auto w = m->op_weights(0, leaf, ForwardKind::kSearch);
  auto g = torch::autograd::grad({(w * torch::tensor({1.0, 2.0, 3.0, 4.0}, torch::kDouble)).sum()}, {leaf})[0];
  EXPECT_GT(g.abs().sum().item<double>(), 0.0);
  // KL(Dir(1) || Dir(1)) = 0 at alpha = 0; its gradient against central differences elsewhere.
  EXPECT_NEAR(m->arch_penalty({torch::zeros({3, 5}, torch::kDouble)}).item<double>(), 0.0, 1e-12);
  torch::manual_seed(6);
  expect_penalty_gradient(*m, {torch::randn({3, 5}, torch::kDouble), torch::randn({2, 5}, torch::kDouble)});
  // l2 (the default) is the Adam weight decay: no loss term.
  EXPECT_FALSE(make_search_method(tiny_config("drnas"))->arch_penalty({a}).defined());
}

TEST(Methods, GdasForwardIsOneHotWithTheSoftGumbelGradientAndRunsOneOpPerEdge) {
  auto net = tiny_net(tiny_config("gdas"));
  auto* m = net->method();
  m->begin_epoch(*net, 0, 5);
  torch::manual_seed(8);
  auto a = torch::randn({14, 8}, torch::kDouble);
  auto leaf = a.clone().requires_grad_(true);
  torch::manual_seed(10);
  auto hard = m->op_weights(0, leaf, ForwardKind::kSearch);
  // Values: exactly one 1 per row (to rounding of 1 - p + p), zeros elsewhere.
  auto idx = hard.detach().argmax(-1, true);
  auto hot = torch::zeros_like(a).scatter_(-1, idx, 1.0);
  EXPECT_LT((hard.detach() - hot).abs().max().item<double>(), 1e-15);
  // Gradient: that of the soft sample softmax((log_softmax(alpha) + g) / tau) with the same draw.
  auto c = torch::randn({14, 8}, torch::kDouble);
  auto g_hard = torch::autograd::grad({(hard * c).sum()}, {leaf})[0];
  auto leaf2 = a.clone().requires_grad_(true);
  torch::manual_seed(10);
  auto gumbel = -torch::empty_like(a).exponential_().log();
  auto soft = torch::softmax((torch::log_softmax(leaf2, -1) + gumbel) / 10.0, -1);
  EXPECT_TRUE(torch::equal(soft.detach().argmax(-1, true), idx));
  auto g_soft = torch::autograd::grad({(soft * c).sum()}, {leaf2})[0];
  EXPECT_LT((g_hard - g_soft).abs().max().item<double>(), 1e-12);
  EXPECT_GT(g_hard.abs().sum().item<double>(), 0.0);
  // Eval mode keeps each edge's argmax op; the analysis uses softmax.
  EXPECT_TRUE(torch::equal(m->op_weights(0, a, ForwardKind::kEval), torch::zeros_like(a).scatter_(-1, a.argmax(-1, true), 1.0)));
  EXPECT_TRUE(torch::equal(m->op_weights(0, a, ForwardKind::kAnalysis), torch::softmax(a, -1)));
  // The supernet runs one op per edge: the parameters of the unchosen ops get no gradient.
  EXPECT_TRUE(net->noise().single_op);
  Batch b = tiny_batch();
  net->train();
  auto loss = torch::nn::functional::cross_entropy(net->forward(b.x), b.y);
  loss.backward();
  int64_t with = 0, without = 0;
  for (auto& p : net->named_parameters()) {
    if (p.key().find("._ops.") == std::string::npos) continue;
    (p.value().grad().defined() ? with : without) += 1;
  }
  EXPECT_GT(with, 0);
  EXPECT_GT(without, with);  // 1 of 7 parametrised candidates per edge at most
  EXPECT_GT(net->alphas_normal().grad().abs().sum().item<double>(), 0.0);
}

TEST(Methods, SchedulesAtStartMiddleAndEnd) {
  const SearchConfig c = tiny_config("gdas");
  auto net = tiny_net(c);
  auto* gdas = net->method();
  const std::vector<std::pair<int64_t, double>> tau{{0, 10.0}, {2, 5.05}, {4, 0.1}};
  for (auto [e, v] : tau) {
    gdas->begin_epoch(*net, e, 5);
    EXPECT_NEAR(gdas->state()["gdas_tau"].get<double>(), v, 1e-12) << "epoch " << e;
  }
  auto dm_net = tiny_net(tiny_config("darts-minus"));
  for (auto [e, v] : std::vector<std::pair<int64_t, double>>{{0, 1.0}, {25, 0.5}, {49, 0.02}}) {
    dm_net->method()->begin_epoch(*dm_net, e, 50);
    EXPECT_NEAR(dm_net->method()->state()["dminus_beta"].get<double>(), v, 1e-12);
    EXPECT_NEAR(dm_net->noise().aux_skip, v, 1e-12);
  }
  auto beta_net = tiny_net(tiny_config("beta-darts"));
  for (auto [e, v] : std::vector<std::pair<int64_t, double>>{{0, 0.0}, {50, 25.0}, {99, 49.5}}) {
    beta_net->method()->begin_epoch(*beta_net, e, 100);
    EXPECT_NEAR(beta_net->method()->state()["beta_lambda"].get<double>(), v, 1e-12);
  }
  auto sd_net = tiny_net(tiny_config("sdarts-rs"));
  for (auto [e, v] : std::vector<std::pair<int64_t, double>>{{0, 0.03}, {25, 0.165}, {49, 0.03 + 0.27 * 49 / 50}}) {
    sd_net->method()->begin_epoch(*sd_net, e, 50);
    EXPECT_NEAR(sd_net->method()->state()["sdarts_epsilon"].get<double>(), v, 1e-12);
  }
  // Warm-up: pc-darts' 0.3 of the epochs is epoch 15 of 50 and epoch 3 of 10; 1 epoch: none.
  SearchConfig pc = SearchConfig::preset_defaults("pc-darts", "paper");
  EXPECT_EQ(first_arch_epoch(pc), 15);
  pc.epochs = 10;
  EXPECT_EQ(first_arch_epoch(pc), 3);
  pc.epochs = 1;
  EXPECT_EQ(first_arch_epoch(pc), 0);
  // A state round-trips (the checkpoint's `method` part).
  auto other = tiny_net(c);
  gdas->begin_epoch(*net, 3, 5);
  other->method()->load_state(gdas->state());
  EXPECT_EQ(other->method()->state(), gdas->state());
}

TEST(Methods, PcDartsWithKOneAndNoEdgeNormIsDartsExactly) {
  SearchConfig pc = tiny_config("pc-darts");
  pc.primitives = tiny_config("darts").primitives;
  pc.method_settings.pc_darts.k = 1;
  pc.method_settings.pc_darts.edge_norm = false;
  SearchConfig d = tiny_config("darts");
  auto a = tiny_net(d), b = tiny_net(pc);
  ASSERT_TRUE(test::bitwise_equal(a->parameters(), b->parameters()));
  const Batch batch = tiny_batch();
  a->train();
  b->train();
  auto [la, ga] = logits_and_grads(a, batch);
  auto [lb, gb] = logits_and_grads(b, batch);
  EXPECT_TRUE(torch::equal(la, lb));
  EXPECT_TRUE(test::bitwise_equal(ga, gb));
  EXPECT_EQ(a->genotype(), b->genotype());
}

TEST(Methods, PcDartsSeesAQuarterOfTheChannelsAndRanksEdgesByOpTimesEdgeWeight) {
  SearchConfig pc = tiny_config("pc-darts");
  pc.channels = 8;
  auto net = tiny_net(pc);
  ASSERT_EQ(net->arch_names(), (std::vector<std::string>{"alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"}));
  // The first cell's sep_conv_3x3 on edge 0 works on 8 / 4 = 2 channels: depthwise [2, 1, 3, 3].
  bool found = false;
  for (auto& p : net->named_parameters())
    if (p.key() == "cells.0._ops.0._ops.4.op.1.weight") {
      EXPECT_EQ(p.value().sizes(), (std::vector<int64_t>{2, 1, 3, 3}));
      found = true;
    }
  EXPECT_TRUE(found);
  const Batch b = tiny_batch();
  auto logits = net->forward(b.x);
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{6, 5}));
  // Channel shuffle in K groups: channel i of group g lands at position i * K + g.
  auto y = torch::arange(8, torch::kFloat).view({1, 8, 1, 1});
  EXPECT_TRUE(torch::equal(shuffle_channels(y, 4).flatten(), torch::tensor({0.f, 2.f, 4.f, 6.f, 1.f, 3.f, 5.f, 7.f})));
  // Hand-made alphas: node 0's edge 0 has the strongest op, but its edge weight is tiny.
  {
    torch::NoGradGuard g;
    net->alphas_normal().zero_();
    net->alphas_normal()[0][4] = 3.0;  // sep_conv_3x3 from input 0
    net->alphas_normal()[1][5] = 2.0;  // sep_conv_5x5 from input 1
    net->alphas_normal()[2][6] = 1.0;  // node 1: dil_conv_3x3 from input 0
    net->arch_parameter("betas_normal").zero_();
    net->arch_parameter("betas_normal")[0][0] = -8.0;  // node 0's two edges: weights e^-8 : 1
  }
  const Genotype geno = net->genotype();
  // Node 0 has only two inputs, so both stay; node 1 (edges 2-4): edge 2 strongest either way.
  EXPECT_EQ(geno.normal[0], (GeneEdge{"sep_conv_5x5", 1}));  // ranked first now: 1 * w > e^-8 * w'
  EXPECT_EQ(geno.normal[1], (GeneEdge{"sep_conv_3x3", 0}));
  EXPECT_EQ(geno.normal[2].first, "dil_conv_3x3");
  // The logged table (and the margins) are those products.
  auto w = net->arch_weights(0, true);
  auto e = net->arch_weights(2, true).flatten();  // betas_normal: the edge weights
  EXPECT_TRUE(torch::allclose(w, torch::softmax(net->alphas_normal().detach().to(torch::kDouble), -1) * e.unsqueeze(1)));
  EXPECT_NEAR(e[0].item<double>() + e[1].item<double>(), 1.0, 1e-12);
}

TEST(Methods, DartsMinusAtCoefficientZeroIsDartsExactlyAndItsSkipCountsOtherwise) {
  SearchConfig dm = tiny_config("darts-minus");
  dm.method_settings.darts_minus.beta_start = dm.method_settings.darts_minus.beta_end = 0;
  auto a = tiny_net(tiny_config("darts")), b = tiny_net(dm);
  b->method()->begin_epoch(*b, 0, 1);
  EXPECT_EQ(b->noise().aux_skip, 0.0);
  // The same weights and alphas, plus the stride-2 auxiliary FactorizedReduce modules.
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (auto& p : pa) ASSERT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key();
  EXPECT_GT(pb.size(), pa.size());
  const Batch batch = tiny_batch();
  auto [la, ga] = logits_and_grads(a, batch);
  auto [lb, gb] = logits_and_grads(b, batch);
  EXPECT_TRUE(torch::equal(la, lb));
  for (size_t i = 0; i < ga.size(); ++i) EXPECT_TRUE(torch::equal(ga[i], gb[i]));
  // beta 1: the outputs change and the auxiliary convolutions learn.
  b->method()->load_state({{"dminus_beta", 1.0}});
  b->noise().aux_skip = 1.0;
  auto [lc, gc] = logits_and_grads(b, batch);
  EXPECT_FALSE(torch::equal(la, lc));
  bool aux_grad = false;
  for (auto& p : b->named_parameters())
    if (p.key().rfind("aux_skip.", 0) == 0 && p.value().grad().defined()) aux_grad = aux_grad || p.value().grad().abs().sum().item<double>() > 0;
  EXPECT_TRUE(aux_grad);
}

TEST(Methods, SdartsRsWithEpsilonZeroIsDartsAndAdvRaisesTheLossWithinTheBall) {
  SearchConfig rs = tiny_config("sdarts-rs");
  rs.primitives = tiny_config("darts").primitives;
  rs.method_settings.sdarts.epsilon_start = rs.method_settings.sdarts.epsilon_end = 0;
  SearchConfig d = tiny_config("darts");
  const Batch batch = tiny_batch();
  std::vector<std::vector<torch::Tensor>> after;
  for (const SearchConfig* c : {&d, &rs}) {
    auto net = tiny_net(*c);
    net->method()->begin_epoch(*net, 0, 10);
    auto w = net->weight_parameters();
    torch::optim::SGD sgd(w, torch::optim::SGDOptions(0.1).momentum(0.9));
    torch::manual_seed(12);
    net->method()->before_weight_step(*net, batch);
    search_weight_step(net, sgd, w, batch, 5.0);
    net->method()->after_weight_step();
    after.push_back(test::snapshot(w));
  }
  EXPECT_TRUE(test::bitwise_equal(after[0], after[1]));

  // sdarts-adv: the perturbed op weights stay on the simplex, within about epsilon of softmax,
  // and do not lower the weight step's loss (eval mode, as the attack).
  SearchConfig adv = tiny_config("sdarts-adv");
  auto net = tiny_net(adv);
  net->method()->begin_epoch(*net, 49, 50);
  const double eps = net->method()->state()["sdarts_epsilon"].get<double>();
  net->train();
  torch::manual_seed(13);
  net->method()->before_weight_step(*net, batch);
  auto pw = net->arch_weights(0);
  auto w0 = torch::softmax(net->alphas_normal().detach(), -1);
  EXPECT_LT((pw.sum(-1) - 1).abs().max().item<double>(), 1e-6);
  EXPECT_LE(pw.min().item<double>(), 1.0);
  EXPECT_GE(pw.min().item<double>(), 0.0);
  EXPECT_LT((pw - w0).abs().max().item<double>(), 2 * eps);
  net->eval();
  double perturbed_loss, clean_loss;
  {
    torch::NoGradGuard g;
    perturbed_loss = torch::nn::functional::cross_entropy(net->forward(batch.x), batch.y).item<double>();
    net->method()->after_weight_step();
    clean_loss = torch::nn::functional::cross_entropy(net->forward(batch.x), batch.y).item<double>();
  }
  EXPECT_GE(perturbed_loss, clean_loss);
  EXPECT_TRUE(torch::allclose(net->arch_weights(0), w0));  // restored after the step
}

TEST(Methods, FairDartsDerivationAlwaysGivesAValidCellAndCountsTheOpsAboveTheThreshold) {
  auto net = tiny_net(tiny_config("fair-darts"));
  for (double level : {-6.0, 0.0, 6.0}) {
    {
      torch::NoGradGuard g;
      torch::manual_seed(static_cast<uint64_t>(level + 10));
      for (auto& a : net->arch_parameters()) a.copy_(level + 0.5 * torch::randn_like(a));
    }
    const Genotype geno = net->genotype();
    EXPECT_NO_THROW(validate_genotype(geno)) << level;
    EXPECT_EQ(geno.normal.size(), 8u);
    EXPECT_EQ(geno.reduce.size(), 8u);
    const json log = net->method()->epoch_log(*net);
    EXPECT_EQ(log["fair_kept"], 16);
    const int64_t above = log["fair_kept_above_threshold"].get<int64_t>();
    if (level < 0) EXPECT_EQ(above, 0);
    if (level > 0) EXPECT_EQ(above, 16);
  }
  // The ops kept are those of largest sigmoid, edges ranked by it: DARTS' rule on sigmoid weights.
  EXPECT_EQ(net->genotype(), derive_genotype(torch::sigmoid(net->alphas_normal().detach().to(torch::kDouble)),
                                             torch::sigmoid(net->alphas_reduce().detach().to(torch::kDouble)),
                                             net->candidates()));
}

TEST(Methods, ConfigRecordsTheMethodAndOlderConfigsReadAsTheirPreset) {
  SearchConfig c = tiny_config("gdas");
  const json j = c.to_json();
  EXPECT_EQ(j["method"], "gdas");
  EXPECT_EQ(j["method_settings"]["gdas"]["tau_start"], 10.0);
  SearchConfig back = SearchConfig::preset_defaults("noisydarts", "paper");
  back.merge_json(j, "test");
  EXPECT_EQ(back.to_json(), j);
  // A config.json of a run before --method: no `method` key, no method settings.
  json old = SearchConfig::preset_defaults("darts", "small").to_json();
  old.erase("method");
  old.erase("method_settings");
  old.erase("arch_warmup");
  SearchConfig o = SearchConfig::preset_defaults("noisydarts", "paper");
  o.merge_json(old, "old");
  EXPECT_EQ(o.method, "darts");
  EXPECT_EQ(o.method_settings.gdas.tau_end, 0.1);
  EXPECT_THROW(o.merge_json(json{{"method_settings", {{"gdas", {{"tau_max", 3.0}}}}}}, "x"), ConfigError);
}

TEST(Methods, EveryMethodRunsAOneEpochSearchFromTheCli) {
  const std::string base = "search --dataset synthetic --subset 96 --epochs 1 --max-steps 2 --channels 4 --layers 2 "
                           "--batch-size 8 --threads 1 -q --hessian-every 1 --hessian-iters 2";
  for (const auto& m : method_names()) {
    const auto d = fresh("cli_" + m);
    const auto r = test::run_cli(base + " --method " + m + " --out " + d.string());
    ASSERT_EQ(r.code, 0) << m << ": " << r.out;
    const json cfg = json::parse(test::slurp((d / "config.json").string()));
    EXPECT_EQ(cfg["method"], m);
    EXPECT_EQ(cfg["preset"], m);  // --method M alone means --preset M
    const json line = json::parse(test::slurp((d / "metrics.jsonl").string()));
    EXPECT_EQ(line["method"], m);
    EXPECT_TRUE(std::isfinite(line["hessian_eigenvalue"].get<double>())) << m;
    EXPECT_NO_THROW(validate_genotype(genotype_from_text(test::slurp((d / "genotype.txt").string())))) << m;
    EXPECT_NE(test::slurp((d / "summary.txt").string()).find("method            " + m), std::string::npos);
    fs::remove_all(d);
  }
  // The loss terms join the unrolled (second-order) alpha gradient too.
  for (const std::string m : {"fair-darts", "beta-darts"}) {
    const auto d = fresh("second_" + m);
    const auto r = test::run_cli(base + " --method " + m + " --order second --out " + d.string());
    EXPECT_EQ(r.code, 0) << m << ": " << r.out;
    fs::remove_all(d);
  }
}

TEST(Methods, DartsWithNoiseDiffersFromNoisyDartsOnlyInTheirRecipes) {
  const auto a = test::run_cli("search --method darts --noise gaussian --print-config --out /tmp/x");
  const auto b = test::run_cli("search --method noisydarts --print-config --out /tmp/x");
  ASSERT_EQ(a.code, 0) << a.out;
  ASSERT_EQ(b.code, 0) << b.out;
  const json fa = json::parse(a.std_out).flatten(), fb = json::parse(b.std_out).flatten();
  std::set<std::string> differ;
  for (auto it = fa.begin(); it != fa.end(); ++it)
    if (!fb.contains(it.key()) || fb[it.key()] != it.value()) differ.insert(it.key());
  // (primitives flatten to one key per list position.)
  std::set<std::string> keys;
  for (const auto& k : differ) keys.insert(k.substr(0, k.find('/', 1)));
  // (At the small scale both recipes use batch 32; at the paper's, darts' is 64.)
  EXPECT_EQ(keys, (std::set<std::string>{"/method", "/preset", "/primitives", "/lr", "/noise"}));
  EXPECT_EQ(differ.count("/noise/skip_drop_path"), 1u);
  EXPECT_EQ(differ.count("/noise/type"), 0u);
}

TEST(Methods, MethodsOutsideTheirSpaceOrOrderAreRefusedInOneLine) {
  for (const std::string bad : {"--method pc-darts --space nb201", "--method darts-minus --space mbv2", "--method gdas --order second",
                                "--method gdas --space mbv2", "--method pc-darts --pc-k 3", "--method bogus",
                                "--method drnas --drnas-reg l1"}) {
    const auto r = test::run_cli("search --print-config --out /tmp/x " + bad);
    EXPECT_EQ(r.code, 2) << bad << ": " << r.out;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << bad << ": " << r.err;
  }
  // NB201 takes the methods that do not reshape the DARTS cell.
  for (const std::string ok : {"gdas", "drnas", "fair-darts", "beta-darts", "sdarts-adv"})
    EXPECT_EQ(test::run_cli("search --print-config --out /tmp/x --space nb201 --method " + ok).code, 0) << ok;
}

TEST(Methods, RobustDartsS1HasThePublishedOpPairsAndDerivesOnlyThem) {
  // automl/RobustDARTS src/spaces.py primitives_1, edge by edge.
  const std::string normal =
      "skip_connect,dil_conv_3x3 skip_connect,dil_conv_5x5 skip_connect,dil_conv_5x5 skip_connect,sep_conv_3x3 "
      "skip_connect,dil_conv_3x3 max_pool_3x3,skip_connect skip_connect,sep_conv_3x3 skip_connect,sep_conv_3x3 "
      "skip_connect,dil_conv_3x3 skip_connect,sep_conv_3x3 max_pool_3x3,skip_connect skip_connect,dil_conv_3x3 "
      "dil_conv_3x3,dil_conv_5x5 dil_conv_3x3,dil_conv_5x5";
  const std::string reduce =
      "max_pool_3x3,avg_pool_3x3 max_pool_3x3,dil_conv_3x3 max_pool_3x3,avg_pool_3x3 max_pool_3x3,avg_pool_3x3 "
      "skip_connect,dil_conv_5x5 max_pool_3x3,avg_pool_3x3 max_pool_3x3,sep_conv_3x3 skip_connect,dil_conv_3x3 "
      "skip_connect,dil_conv_5x5 max_pool_3x3,avg_pool_3x3 max_pool_3x3,avg_pool_3x3 skip_connect,dil_conv_5x5 "
      "skip_connect,dil_conv_5x5 skip_connect,dil_conv_5x5";
  auto text = [](const EdgeOps& eo) {
    std::string s;
    for (const auto& e : eo) s += (s.empty() ? "" : " ") + e.at(0) + "," + e.at(1);
    return s;
  };
  ASSERT_NE(space_edge_ops("darts-s1", false), nullptr);
  EXPECT_EQ(text(*space_edge_ops("darts-s1", false)), normal);
  EXPECT_EQ(text(*space_edge_ops("darts-s1", true)), reduce);
  EXPECT_EQ(space_edge_ops("darts-s2", false), nullptr);

  SearchConfig c = tiny_config("darts");
  c.space = "darts-s1";
  c.primitives = tiny_config("darts").primitives;
  c.finish_layering();
  ASSERT_EQ(c.primitives, (std::vector<std::string>{"max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "dil_conv_5x5"}));
  auto net = tiny_net(c);
  EXPECT_EQ(net->alphas_normal().sizes(), (std::vector<int64_t>{14, 6}));
  // Each edge's mixed op holds its two ops only, as the reference registers them.
  std::set<std::string> edge0;
  for (auto& m : net->named_children()["cells"]->named_children()["0"]->named_children()["_ops"]->named_children()["0"]->named_children()["_ops"]->named_children())
    edge0.insert(m.key());
  EXPECT_EQ(edge0, (std::set<std::string>{"0", "1"}));
  torch::manual_seed(21);
  {
    torch::NoGradGuard g;
    for (auto& a : net->arch_parameters()) a.copy_(torch::randn_like(a));
  }
  for (size_t cell = 0; cell < 2; ++cell) {
    const auto w = net->arch_weights(cell, true);
    const auto& eo = *space_edge_ops("darts-s1", cell == 1);
    for (int64_t e = 0; e < 14; ++e) {
      double live = 0;
      for (size_t k = 0; k < c.primitives.size(); ++k) {
        const bool mine = std::find(eo[e].begin(), eo[e].end(), c.primitives[k]) != eo[e].end();
        const double x = w[e][static_cast<int64_t>(k)].item<double>();
        if (mine) live += x;
        else EXPECT_EQ(x, 0.0) << "cell " << cell << " edge " << e << " " << c.primitives[k];
      }
      EXPECT_NEAR(live, 1.0, 1e-12);
    }
    // The method's loss terms see each edge's own two alphas.
    const auto oa = net->op_alphas()[cell];
    EXPECT_EQ(oa.sizes(), (std::vector<int64_t>{14, 2}));
    EXPECT_TRUE(torch::allclose(torch::softmax(oa.detach().to(torch::kDouble), -1).sum(-1), torch::ones({14}, torch::kDouble)));
  }
  // The derived ops are each edge's own: node n's edges start at n (n + 3) / 2.
  const Genotype g = net->genotype();
  EXPECT_NO_THROW(validate_genotype(g));
  for (int cell = 0; cell < 2; ++cell) {
    const auto& genes = cell ? g.reduce : g.normal;
    const auto& eo = *space_edge_ops("darts-s1", cell == 1);
    for (size_t k = 0; k < genes.size(); ++k) {
      const size_t node = k / 2, row = node * (node + 3) / 2 + static_cast<size_t>(genes[k].second);
      EXPECT_NE(std::find(eo[row].begin(), eo[row].end(), genes[k].first), eo[row].end()) << genes[k].first << " on edge " << row;
    }
  }
  const Batch b = tiny_batch();
  EXPECT_EQ(net->forward(b.x).sizes(), (std::vector<int64_t>{6, 5}));
  // A CLI search and its refusal of --ops.
  const auto d = fresh("s1");
  EXPECT_EQ(test::run_cli("search --dataset synthetic --space darts-s1 --subset 96 --epochs 1 --max-steps 2 --channels 4 --layers 2 "
                          "--batch-size 8 --threads 1 -q --out " + d.string()).code, 0);
  EXPECT_TRUE(fs::exists(d / "genotype.json"));
  fs::remove_all(d);
  EXPECT_EQ(test::run_cli("search --print-config --space darts-s1 --ops skip_connect,sep_conv_3x3 --out /tmp/x").code, 2);
}

TEST(Methods, AnalyzeOfADartsMinusCheckpointSeesTheAuxiliarySkipAsTheSearchDid) {
  const auto d = fresh("dm_analyze");
  SearchConfig c = SearchConfig::preset_defaults("darts-minus", "small");
  c.method = "darts-minus";
  c.dataset = "synthetic";
  c.subset = 96;
  c.epochs = 3;  // beta 1, 2/3, 1/3
  c.max_steps = 2;
  c.channels = 4;
  c.layers = 2;
  c.batch_size = 8;
  c.threads = 1;
  c.hessian_every = 1;
  c.hessian_iters = 3;
  c.keep_checkpoints = 10;
  c.out = d.string();
  c.finish_layering();
  SearchCallbacks cb;
  cb.progress = false;
  run_search(c, false, cb);
  std::vector<json> m;
  std::istringstream lines(test::slurp((d / "metrics.jsonl").string()));
  for (std::string l; std::getline(lines, l);) m.push_back(json::parse(l));
  ASSERT_EQ(m.size(), 3u);
  EXPECT_NEAR(m[1]["dminus_beta"].get<double>(), 2.0 / 3.0, 1e-12);
  const auto a = analyze_checkpoint((d / "checkpoints" / "search-e0002-s000000.pt").string());
  EXPECT_EQ(a.eigen.eigenvalue, m[1]["hessian_eigenvalue"].get<double>());
  fs::remove_all(d);
}
