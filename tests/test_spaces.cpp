// The search spaces of spaces.h (issue 6): NAS-Bench-201, the RobustDARTS op sets and the mbv2
// chain: genotypes, derivation, networks (exact sizes against the public code), and the CLI.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <unistd.h>

#include "cli_helpers.h"
#include "noisydarts/error.h"
#include "noisydarts/eval_network.h"
#include "noisydarts/genotype.h"
#include "noisydarts/profile.h"
#include "noisydarts/search_network.h"
#include "noisydarts/space_networks.h"
#include "noisydarts/spaces.h"

using namespace noisydarts;
using noisydarts::test::run_cli;
using noisydarts::test::slurp;
namespace fs = std::filesystem;

namespace {

const char* kNb201Best = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|";

std::string config_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "<no ConfigError>";
}

fs::path fresh_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("noisydarts_spaces_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

SearchNetwork nb201_net(int64_t c = 4, int64_t n = 1, int64_t classes = 3) {
  SearchNetworkOptions o(c, classes, n);
  o.in_channels(1).primitives(nb201_primitives()).space("nb201");
  return make_search_network(o);
}

SearchNetwork mbv2_net(double se = 0, bool swish = false) {
  SearchNetworkOptions o(8, 3, 1);
  o.in_channels(1).primitives(mbv2_choices()).space("mbv2").se_ratio(se).swish(swish).image_size(8);
  return make_search_network(o);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Genotypes
// ---------------------------------------------------------------------------------------------

TEST(Spaces, Nb201StringRoundTripsThroughTextAndJson) {
  const Genotype g = genotype_from_text(kNb201Best);
  EXPECT_EQ(g.space, "nb201");
  ASSERT_EQ(g.normal.size(), 6u);
  EXPECT_EQ(g.normal[3], (GeneEdge{"skip_connect", 0}));
  EXPECT_EQ(g.normal[5], (GeneEdge{"nor_conv_3x3", 2}));
  EXPECT_EQ(genotype_to_text(g), kNb201Best);
  EXPECT_EQ(genotype_to_json(g), nlohmann::json({{"space", "nb201"}, {"arch", kNb201Best}}));
  EXPECT_EQ(genotype_from_json(genotype_to_json(g)), g);
  EXPECT_EQ(resolve_genotype(std::string("  ") + kNb201Best + "\n"), g);
  // Every one of the 5^6 cells round-trips.
  const auto& ops = nb201_primitives();
  for (int code = 0; code < 15625; code += 7) {
    Genotype h;
    h.space = "nb201";
    int c = code;
    for (const auto& e : nb201_edges()) {
      h.normal.emplace_back(ops[c % 5], e.second);
      c /= 5;
    }
    ASSERT_EQ(nb201_from_string(nb201_arch_string(h)), h) << nb201_arch_string(h);
  }
}

TEST(Spaces, MalformedNb201StringsNameTheProblem) {
  EXPECT_NE(config_error([] { nb201_from_string("|nor_conv_3x3~0|+|nor_conv_3x3~0|"); }).find("6 edges"), std::string::npos);
  EXPECT_NE(config_error([] { nb201_from_string("|conv_9x9~0|+|none~0|none~1|+|none~0|none~1|none~2|"); }).find("unknown op 'conv_9x9'"),
            std::string::npos);
  EXPECT_NE(config_error([] { nb201_from_string("|none~0|+|none~1|none~0|+|none~0|none~1|none~2|"); }).find("source node"), std::string::npos);
  EXPECT_NE(config_error([] { nb201_from_string("|none0|+|none~0|none~1|+|none~0|none~1|none~2|"); }).find("op~input"), std::string::npos);
  EXPECT_NE(config_error([] { nb201_from_string("none~0|"); }).find("|op~i|"), std::string::npos);
}

TEST(Spaces, Mbv2GenotypeAndTheBuiltinNoisyDartsA) {
  const Genotype a = builtin_genotype("NoisyDARTS_A");
  EXPECT_EQ(a.space, "mbv2");
  ASSERT_EQ(a.layers.size(), 19u);
  EXPECT_EQ(a.layers[0], "ir_k3_e6");
  EXPECT_EQ(a.layers[1], "ir_k3_e3");
  EXPECT_EQ(a.layers[18], "ir_k7_e6");
  EXPECT_DOUBLE_EQ(a.se_ratio, 0.25);
  EXPECT_TRUE(a.swish);
  EXPECT_EQ(genotype_from_text(genotype_to_text(a)), a);
  EXPECT_EQ(genotype_from_json(genotype_to_json(a)), a);
  EXPECT_EQ(genotype_to_json(a)["layers"].size(), 19u);
  Genotype b = a;
  b.layers[10] = "skip_connect";  // 80 -> 96 channels: no skip possible
  EXPECT_NE(config_error([&] { validate_genotype(b); }).find("layer 10 cannot be skip_connect"), std::string::npos);
  b.layers[10] = "ir_k9_e6";
  EXPECT_NE(config_error([&] { validate_genotype(b); }).find("unknown choice 'ir_k9_e6'"), std::string::npos);
  EXPECT_NE(config_error([] { mbv2_from_text("mbv2:ir_k3_e6;se=0.25"); }).find("19 layers"), std::string::npos);
  EXPECT_NE(config_error([&] { mbv2_from_text(mbv2_text(a) + ";se=x"); }).find("not a number"), std::string::npos);
}

TEST(Spaces, Mbv2LayoutHasNineteenLayersAndSkipsOnlyWhereShapesAllow) {
  const auto& l = mbv2_layout();
  ASSERT_EQ(l.size(), 19u);
  std::vector<int64_t> widths, strides;
  int skips = 0;
  for (const auto& x : l) {
    widths.push_back(x.out_channels);
    strides.push_back(x.stride);
    skips += x.skip_allowed;
  }
  EXPECT_EQ(widths, (std::vector<int64_t>{32, 32, 40, 40, 40, 40, 80, 80, 80, 80, 96, 96, 96, 96, 192, 192, 192, 192, 320}));
  EXPECT_EQ(strides, (std::vector<int64_t>{2, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1}));
  EXPECT_EQ(skips, 13);
  EXPECT_FALSE(l[0].skip_allowed);
  EXPECT_TRUE(l[1].skip_allowed);
  EXPECT_FALSE(l[10].skip_allowed);
  EXPECT_FALSE(l[18].skip_allowed);
}

// ---------------------------------------------------------------------------------------------
// Derivation on hand-made alphas
// ---------------------------------------------------------------------------------------------

TEST(Spaces, Nb201DerivationKeepsEveryEdgeWithItsStrongestOpNoneIncluded) {
  // Columns: none, skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3.
  auto w = torch::full({6, 5}, 0.1, torch::kDouble);
  w[0][3] = 0.6;  // 1<-0 nor_conv_3x3
  w[1][0] = 0.6;  // 2<-0 none wins (the benchmark keeps it)
  w[2][1] = 0.6;  // 2<-1 skip
  w[3][4] = 0.6;  // 3<-0 avg pool
  w[4][2] = 0.6;  // 3<-1 1x1
  w[5][3] = 0.3;
  w[5][2] = 0.3;  // tie: the first in the op order wins
  const Genotype g = derive_nb201(w, nb201_primitives());
  EXPECT_EQ(nb201_arch_string(g), "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|nor_conv_1x1~2|");
}

TEST(Spaces, Mbv2DerivationSkipsDisallowedSkipConnections) {
  auto w = torch::full({19, 7}, 0.1, torch::kDouble);
  for (int64_t i = 0; i < 19; ++i) w[i][i % 6] = 0.3;  // a block per layer
  w[0][6] = 0.9;  // skip strongest on layer 0 (16 -> 32, stride 2): not allowed
  w[1][6] = 0.9;  // allowed on layer 1
  w[10][6] = 0.9;  // not allowed (80 -> 96)
  const Genotype g = derive_mbv2(w, 0.25, true);
  EXPECT_EQ(g.layers[0], mbv2_choices()[0]);
  EXPECT_EQ(g.layers[1], "skip_connect");
  EXPECT_EQ(g.layers[10], mbv2_choices()[10 % 6]);
  EXPECT_EQ(g.layers[5], mbv2_choices()[5]);
  EXPECT_EQ(count_skips(g), 1);
  EXPECT_NO_THROW(validate_genotype(g));
}

TEST(Spaces, RobustDartsOpSetsDeriveDartsCells) {
  EXPECT_EQ(space_primitives("darts-s2"), (std::vector<std::string>{"skip_connect", "sep_conv_3x3"}));
  EXPECT_EQ(space_primitives("darts-s3"), (std::vector<std::string>{"none", "skip_connect", "sep_conv_3x3"}));
  EXPECT_EQ(space_primitives("darts-s4"), (std::vector<std::string>{"sep_conv_3x3", "noise"}));
  EXPECT_EQ(genotype_space("darts-s3"), "darts");
  // S3 on hand-made weights: `none` is never chosen even where it is strongest.
  auto w = torch::zeros({14, 3}, torch::kDouble);
  for (int64_t e = 0; e < 14; ++e) {
    w[e][0] = 0.8;
    w[e][1] = e % 2 ? 0.15 : 0.05;
    w[e][2] = e % 2 ? 0.05 : 0.15;
  }
  w[0][2] = 0.19;  // node 0: edges 0 (sep 0.19) and 1 (skip 0.15)
  const Genotype g = derive_genotype(w, w, space_primitives("darts-s3"));
  EXPECT_EQ(g.normal[0], (GeneEdge{"sep_conv_3x3", 0}));
  EXPECT_EQ(g.normal[1], (GeneEdge{"skip_connect", 1}));
  EXPECT_EQ(count_op(g.normal, "none"), 0);
  EXPECT_THROW(check_search_space("darts-s9"), UsageError);
}

// ---------------------------------------------------------------------------------------------
// Networks: exact sizes, shapes, gradients, noise
// ---------------------------------------------------------------------------------------------

TEST(Spaces, Nb201NetworksHaveTheBenchmarksExactSizesAndNames) {
  // Counted with the public NAS-Bench-201 code (AutoDL-Projects: TinyNetwork(16, 5, arch, 10)
  // parameters; TinyNetworkDarts(16, 5, 4, 10, ops, affine=False, track=True).get_weights()).
  const Genotype g = genotype_from_text(kNb201Best);
  EvalNetwork net(EvalNetworkOptions(16, 10, 5, g));
  EXPECT_EQ(count_parameters(*net), 1288506);
  auto sd = net->named_parameters();
  int64_t keys = static_cast<int64_t>(net->named_parameters().size() + net->named_buffers().size());
  EXPECT_EQ(keys, 489);
  for (const char* k : {"stem.0.weight", "cells.0.layers.0.op.1.weight", "cells.5.conv_a.op.1.weight",
                        "cells.5.downsample.1.weight", "lastact.0.weight", "classifier.weight"})
    EXPECT_TRUE(sd.contains(k) || net->named_buffers().contains(k)) << k;
  SearchNetworkOptions so(16, 10, 5);
  so.primitives(nb201_primitives()).space("nb201");
  SearchNetwork s = make_search_network(so);
  int64_t w = 0;
  for (const auto& p : s->weight_parameters()) w += p.numel();
  EXPECT_EQ(w, 1692826);
  EXPECT_EQ(s->arch_parameters()[0].sizes(), (std::vector<int64_t>{6, 5}));
  EXPECT_TRUE(s->named_parameters().contains("cells.0.edges.1<-0.3.op.1.weight"));
  EXPECT_EQ(s->genotype().space, "nb201");
  const auto p = profile_genotype(g, 16, 5, DataShape{3, 32, 32, 10});
  EXPECT_EQ(p.params, 1288506);
  EXPECT_EQ(p.macs, 184730240);  // conv+linear multiply-adds per 32x32 image (hand-checked sum)
}

TEST(Spaces, NoisyDartsAProfileIsTheReleasedModelsSize) {
  // The released NoisyDARTS-A (SE 0.25, swish) on 224 px: ~5.5 M parameters, ~449 M
  // multiply-adds in the paper; exactly 5,547,124 and 446,669,312 conv+linear MACs with timm's
  // EfficientNet rules (squeeze width = SE ratio x block input channels).
  const auto p = profile_genotype(builtin_genotype("NoisyDARTS_A"), 0, 0, DataShape{3, 224, 224, 1000}, EvalStyle::kImageNet);
  EXPECT_EQ(p.params, 5547124);
  EXPECT_EQ(p.macs, 446669312);
  auto r = run_cli("profile --genotype NoisyDARTS_A --dataset imagenet --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out, "{\"params\": 5547124, \"macs\": 446669312}\n");
  // timm's names, so its state dict layout is ours.
  EvalNetwork net(EvalNetworkOptions(0, 1000, 0, builtin_genotype("NoisyDARTS_A")).style(EvalStyle::kImageNet));
  const auto sd = net->named_parameters();
  for (const char* k : {"conv_stem.weight", "bn1.weight", "blocks.0.0.conv_dw.weight", "blocks.0.0.conv_pw.weight",
                        "blocks.1.0.conv_pw.weight", "blocks.1.0.se.conv_reduce.bias", "blocks.3.3.conv_pwl.weight",
                        "blocks.4.7.bn3.weight", "blocks.5.4.conv_dw.weight", "conv_head.weight", "bn2.weight", "classifier.weight"})
    EXPECT_TRUE(sd.contains(k)) << k;
  EXPECT_EQ(sd["blocks.1.0.se.conv_reduce.weight"].sizes(), (std::vector<int64_t>{4, 96, 1, 1}));  // 16 * 0.25
  EXPECT_EQ(sd["blocks.5.4.conv_dw.weight"].sizes(), (std::vector<int64_t>{1152, 1, 7, 7}));
}

TEST(Spaces, SearchNetworksGiveLogitsAndAlphaGradientsOfEverySpace) {
  torch::manual_seed(0);
  const auto x = torch::randn({2, 1, 8, 8});
  const auto y = torch::tensor({0, 2});
  SearchNetworkOptions s4(4, 3, 3);  // cell 0 normal, cells 1 and 2 reduction
  s4.in_channels(1).primitives(space_primitives("darts-s4"));
  for (auto net : {nb201_net(), mbv2_net(0.25, true), make_search_network(s4)}) {
    auto out = net->forward(x);
    EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 3})) << net->options().space();
    torch::nn::functional::cross_entropy(out, y).backward();
    for (const auto& a : net->arch_parameters()) {
      ASSERT_TRUE(a.grad().defined()) << net->options().space() << " " << net->options().primitives().size();
      EXPECT_GT(a.grad().abs().sum().item<double>(), 0) << net->options().space();
    }
    for (const auto& w : net->weight_parameters()) EXPECT_TRUE(w.grad().defined());
  }
}

TEST(Spaces, Nb201AlphaGradientMatchesFiniteDifferences) {
  torch::manual_seed(1);
  auto net = nb201_net(4, 1, 3);
  net->to(torch::kDouble);
  net->eval();  // BN running statistics: deterministic and smooth in the alphas
  const auto x = torch::randn({3, 1, 8, 8}, torch::kDouble);
  const auto y = torch::tensor({0, 1, 2});
  auto loss = [&] { return torch::nn::functional::cross_entropy(net->forward(x), y); };
  torch::Tensor a = net->arch_parameters()[0];
  {
    torch::NoGradGuard g;
    a.copy_(torch::randn({6, 5}, torch::kDouble));
  }
  loss().backward();
  const auto grad = a.grad().clone();
  torch::NoGradGuard g;
  const double h = 1e-6;
  for (int64_t e = 0; e < 6; ++e) {
    for (int64_t k = 0; k < 5; ++k) {
      a[e][k] += h;
      const double up = loss().item<double>();
      a[e][k] -= 2 * h;
      const double down = loss().item<double>();
      a[e][k] += h;
      EXPECT_NEAR(grad[e][k].item<double>(), (up - down) / (2 * h), 1e-7) << e << "," << k;
    }
  }
}

TEST(Spaces, Mbv2DisallowedSkipsGetNoWeightAndNoGradient) {
  auto net = mbv2_net();
  const auto w = net->arch_weights(0);
  EXPECT_EQ(w[0][6].item<float>(), 0.f);   // layer 0: 16 -> 32, stride 2
  EXPECT_EQ(w[10][6].item<float>(), 0.f);  // 80 -> 96
  EXPECT_GT(w[1][6].item<float>(), 0.f);
  EXPECT_NEAR(w.sum(1).sub(1).abs().max().item<float>(), 0.f, 1e-6);
  torch::manual_seed(2);
  net->forward(torch::randn({2, 1, 8, 8})).sum().backward();
  const auto g = net->arch_parameters()[0].grad();
  EXPECT_EQ(g[0][6].item<float>(), 0.f);
  EXPECT_EQ(g[18][6].item<float>(), 0.f);
  EXPECT_NE(g[1][6].item<float>(), 0.f);
}

TEST(Spaces, NoiseActsOnTheSkipChoiceOfNb201AndMbv2InTrainingOnly) {
  for (auto net : {nb201_net(), mbv2_net()}) {
    torch::manual_seed(3);
    const auto x = torch::randn({2, 1, 8, 8});
    net->eval();
    EXPECT_TRUE(torch::equal(net->forward(x), net->forward(x))) << net->options().space();
    // Training mode with the BN statistics of the batch: two forwards differ only by the noise.
    net->train();
    const auto a = net->forward(x), b = net->forward(x);
    EXPECT_FALSE(torch::equal(a, b)) << net->options().space();
    net->noise().suspended = true;
    EXPECT_TRUE(torch::equal(net->forward(x), net->forward(x))) << net->options().space();
    net->noise().suspended = false;
  }
}

TEST(Spaces, EvalNetworksOfNb201AndMbv2TrainOneStep) {
  torch::manual_seed(4);
  for (const Genotype& g : {genotype_from_text(kNb201Best), builtin_genotype("NoisyDARTS_A")}) {
    EvalNetwork net(EvalNetworkOptions(4, 5, 1, g).in_channels(1).auxiliary(true));
    const auto x = torch::randn({2, 1, 16, 16});
    auto out = net->forward(x);
    EXPECT_EQ(out.logits.sizes(), (std::vector<int64_t>{2, 5})) << g.space;
    EXPECT_FALSE(out.aux_logits.defined()) << g.space;
    out.logits.sum().backward();
    for (const auto& p : net->parameters()) ASSERT_TRUE(p.grad().defined()) << g.space;
  }
}

// ---------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------

TEST(Spaces, CliSearchesNb201AndTrainsTheFoundStringFromScratch) {
  const auto dir = fresh_dir("nb201");
  auto r = run_cli("search --space nb201 --dataset synthetic --epochs 1 --channels 4 --layers 1 --batch-size 16 "
                   "--subset 128 --threads 1 --seed 3 -q --out " + dir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  const std::string arch = slurp((dir / "genotype.txt").string());
  ASSERT_FALSE(arch.empty());
  EXPECT_EQ(arch[0], '|');
  const Genotype g = genotype_from_text(arch);
  EXPECT_EQ(g.space, "nb201");
  EXPECT_EQ(genotype_from_json(nlohmann::json::parse(slurp((dir / "genotype.json").string()))), g);
  EXPECT_NE(r.out.find(genotype_to_text(g)), std::string::npos);
  EXPECT_TRUE(fs::exists(dir / "cell.dot"));
  EXPECT_TRUE(fs::exists(dir / "report.html"));
  {
    // The report draws one alpha panel per NB201 edge, each marked with the op kept.
    const std::string html = slurp((dir / "report.html").string());
    size_t panels = 0;
    for (size_t p = html.find("edge-panel"); p != std::string::npos; p = html.find("edge-panel", p + 1)) ++panels;
    EXPECT_EQ(panels, 6u);
    EXPECT_NE(html.find("kept: " + g.normal[0].first), std::string::npos);
    EXPECT_FALSE(fs::exists(dir / "normal.dot"));
  }
  const auto cfg = nlohmann::json::parse(slurp((dir / "config.json").string()));
  EXPECT_EQ(cfg["space"], "nb201");
  EXPECT_EQ(cfg["primitives"], nlohmann::json(nb201_primitives()));
  const auto m = nlohmann::json::parse(slurp((dir / "metrics.jsonl").string()));
  EXPECT_EQ(m["alphas"].size(), 6u);
  EXPECT_EQ(m["alphas"][0].size(), 5u);
  EXPECT_TRUE(m.contains("skips"));
  // train --genotype accepts the benchmark string.
  const auto tdir = fresh_dir("nb201_train");
  r = run_cli("train --genotype '" + arch.substr(0, arch.size() - 1) + "' --dataset synthetic --subset 64 --epochs 1 "
              "--channels 4 --layers 1 --batch-size 16 --threads 1 -q --out " + tdir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  const auto tcfg = nlohmann::json::parse(slurp((tdir / "config.json").string()));
  EXPECT_EQ(tcfg["genotype"], genotype_to_text(g));
  EXPECT_EQ(tcfg["auxiliary"], false);
  fs::remove_all(dir);
  fs::remove_all(tdir);
}

TEST(Spaces, CliRobustDartsSpacesFixTheirOpSets) {
  const auto dir = fresh_dir("s4");
  auto r = run_cli("search --space darts-s4 --dataset synthetic --epochs 1 --channels 4 --layers 2 --batch-size 16 "
                   "--subset 64 --threads 1 -q --out " + dir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  const auto cfg = nlohmann::json::parse(slurp((dir / "config.json").string()));
  EXPECT_EQ(cfg["primitives"], nlohmann::json({"sep_conv_3x3", "noise"}));
  const Genotype g = genotype_from_json(nlohmann::json::parse(slurp((dir / "genotype.json").string())));
  for (const auto& e : g.normal) EXPECT_TRUE(e.first == "sep_conv_3x3" || e.first == "noise") << e.first;
  fs::remove_all(dir);
  r = run_cli("search --space darts-s2 --ops sep_conv_3x3,skip_connect --dataset synthetic -q --out " + dir.string());
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--space darts-s2 has the fixed op set"), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  EXPECT_FALSE(fs::exists(dir));
  r = run_cli("search --space darts --swish true --dataset synthetic -q --out " + dir.string());
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--space mbv2 only"), std::string::npos) << r.out;
}

TEST(Spaces, CliSearchesTheMbv2ChainAndWritesItsArchitecture) {
  const auto dir = fresh_dir("mbv2");
  auto r = run_cli("search --space mbv2 --se-ratio 0.25 --swish true --dataset synthetic --epochs 1 --batch-size 8 "
                   "--subset 32 --max-steps 1 --threads 2 -q --out " + dir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  const Genotype g = genotype_from_json(nlohmann::json::parse(slurp((dir / "genotype.json").string())));
  EXPECT_EQ(g.space, "mbv2");
  EXPECT_EQ(g.layers.size(), 19u);
  EXPECT_DOUBLE_EQ(g.se_ratio, 0.25);
  EXPECT_TRUE(g.swish);
  EXPECT_TRUE(fs::exists(dir / "chain.dot"));
  const auto m = nlohmann::json::parse(slurp((dir / "metrics.jsonl").string()));
  ASSERT_EQ(m["alphas"].size(), 19u);
  EXPECT_EQ(m["alphas"][0][6].get<double>(), 0.0);  // no skip on the strided first layer
  fs::remove_all(dir);
}
