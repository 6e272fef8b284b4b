// The evaluation network, the profile, training from scratch and PyTorch interop.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <ATen/autocast_mode.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "cli_helpers.h"
#include "noisydarts/data.h"
#include "noisydarts/error.h"
#include "noisydarts/eval_network.h"
#include "noisydarts/genotype.h"
#include "noisydarts/interop.h"
#include "noisydarts/profile.h"
#include "noisydarts/runtime.h"
#include "noisydarts/fused_ops.h"
#include "noisydarts/search_network.h"
#include "noisydarts/train.h"

using namespace noisydarts;
using noisydarts::test::run_cli;
using noisydarts::test::run_command;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("noisydarts_test_eval_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Python with torch (Debian's python3-torch), or "" when there is none.
std::string python_with_torch() {
  for (const std::string py : {"/usr/bin/python3", "python3"}) {
    if (run_command(py + " -c 'import torch'").code == 0) return py;
  }
  return "";
}

EvalNetwork tiny_eval_network(const std::string& genotype = "NoisyDARTS_a", bool auxiliary = true) {
  EvalNetworkOptions o(4, 5, 3, builtin_genotype(genotype));
  o.in_channels(1).auxiliary(auxiliary);
  return EvalNetwork(o);
}

// Gives every parameter and buffer distinct random values (BN statistics included).
void randomize(torch::nn::Module& m, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard g;
  for (auto& [k, t] : module_state_dict(m)) {
    if (t.is_floating_point()) t.copy_(torch::rand_like(t) + 0.5);
    else t.fill_(static_cast<int64_t>(seed % 97));
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------
// EvalNetwork
// ------------------------------------------------------------------------------------------

// Reference numbers obtained with /usr/bin/python3 (torch 1.13) on the reference implementation's
// model.py: NetworkCIFAR(36, 10, 20, auxiliary=True, genotype), counting
// sum(p.numel() for name, p in net.named_parameters() if 'auxiliary' not in name) and, for
// the second number, all parameters.
TEST(EvalNetwork, ParameterCountsOfTheBuiltinsMatchTheReference) {
  const std::map<std::string, std::pair<int64_t, int64_t>> expected{
      {"DARTS_V1", {3169414, 3645840}},  {"DARTS_V2", {3349342, 3825768}},
      {"NASNet", {3830950, 4288944}},    {"AmoebaNet", {3145078, 3603072}},
      {"NoisyDARTS_a", {3257110, 3733536}}, {"NoisyDARTS_b", {3097918, 3574344}}};
  for (const auto& name : builtin_genotype_names()) {
    if (builtin_genotype(name).space != "darts") continue;  // NoisyDARTS_A: test_spaces.cpp
    ASSERT_TRUE(expected.count(name)) << name;
    EvalNetwork net(EvalNetworkOptions(36, 10, 20, builtin_genotype(name)).auxiliary(true));
    EXPECT_EQ(count_parameters(*net, "auxiliary_head."), expected.at(name).first) << name;
    EXPECT_EQ(count_parameters(*net), expected.at(name).second) << name;
  }
}

TEST(EvalNetwork, RegistersTheReferenceKeyNames) {
  // AmoebaNet has conv_7x1_1x7 (edge 8 of the reduce cell), a bare Sequential in the reference.
  EvalNetwork net(EvalNetworkOptions(8, 10, 6, builtin_genotype("AmoebaNet")).auxiliary(true));
  std::map<std::string, std::vector<int64_t>> shapes;
  for (auto& [k, v] : module_state_dict(*net)) shapes[k] = v.sizes().vec();
  const std::map<std::string, std::vector<int64_t>> expected{
      {"stem.0.weight", {24, 3, 3, 3}},
      {"stem.1.num_batches_tracked", {}},
      {"cells.0.preprocess0.op.1.weight", {8, 24, 1, 1}},
      {"cells.0.preprocess1.op.2.running_var", {8}},
      {"cells.0._ops.2.op.1.weight", {8, 1, 3, 3}},
      {"cells.0._ops.2.op.5.weight", {8, 1, 3, 3}},
      {"cells.2._ops.8.1.weight", {16, 16, 1, 7}},
      {"cells.2._ops.8.2.weight", {16, 16, 7, 1}},
      {"cells.2._ops.8.3.bias", {16}},
      {"cells.3.preprocess0.conv_1.weight", {8, 24, 1, 1}},
      {"cells.3.preprocess0.bn.weight", {16}},
      {"auxiliary_head.features.2.weight", {128, 96, 1, 1}},
      {"auxiliary_head.features.5.weight", {768, 128, 2, 2}},
      {"auxiliary_head.features.6.running_mean", {768}},
      {"auxiliary_head.classifier.weight", {10, 768}},
      {"classifier.weight", {10, 96}}};
  for (const auto& [k, s] : expected) {
    ASSERT_TRUE(shapes.count(k)) << "missing " << k;
    EXPECT_EQ(shapes[k], s) << k;
  }
}

TEST(EvalNetwork, AuxiliaryHeadOnlyInTraining) {
  auto net = tiny_eval_network();
  auto x = torch::randn({3, 1, 28, 28});
  net->train();
  auto out = net->forward(x);
  ASSERT_TRUE(out.aux_logits.defined());
  EXPECT_EQ(out.aux_logits.sizes(), (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(out.logits.sizes(), (std::vector<int64_t>{3, 5}));
  net->eval();
  EXPECT_FALSE(net->forward(x).aux_logits.defined());
  auto plain = tiny_eval_network("NoisyDARTS_a", /*auxiliary=*/false);
  plain->train();
  EXPECT_FALSE(plain->forward(x).aux_logits.defined());
}

TEST(EvalNetwork, DropPathActsOnlyInTraining) {
  torch::manual_seed(1);
  auto net = tiny_eval_network("DARTS_V2");
  auto x = torch::randn({8, 1, 16, 16});
  net->eval();
  net->set_drop_path_prob(0.0);
  auto ref = net->forward(x).logits;
  net->set_drop_path_prob(0.5);
  EXPECT_TRUE(torch::equal(net->forward(x).logits, ref));
  net->train();
  net->set_drop_path_prob(0.0);
  auto a = net->forward(x).logits, b = net->forward(x).logits;
  EXPECT_TRUE(torch::equal(a, b));
  net->set_drop_path_prob(0.5);
  auto c = net->forward(x).logits, d = net->forward(x).logits;
  EXPECT_FALSE(torch::equal(c, d));
  EXPECT_THROW(net->set_drop_path_prob(1.0), c10::Error);
}

// --precision bf16: the forward really runs in bfloat16 (autocast on, the float kernels off,
// both restored after the scope) and stays within bfloat16's rounding of the float forward.
TEST(EvalNetwork, Bf16PrecisionRunsInBfloat16CloseToFp32) {
  EvalNetworkOptions o(8, 10, 5, builtin_genotype("NoisyDARTS_a"));
  torch::manual_seed(3);
  EvalNetwork net(o);
  const auto x = torch::randn({6, 3, 32, 32});
  {
    torch::NoGradGuard g;  // trained-like BN statistics: running means and variances of real batches
    for (int i = 0; i < 3; ++i) net->forward(torch::randn({6, 3, 32, 32}));
  }
  net->eval();
  torch::InferenceMode im;
  ASSERT_TRUE(fused_ops_enabled());
  const auto want = net->forward(x).logits;
  ASSERT_EQ(want.scalar_type(), torch::kFloat);
  torch::Tensor got;
  {
    PrecisionScope scope(Precision::kBf16, x.device());
    EXPECT_TRUE(at::autocast::is_cpu_enabled());
    EXPECT_FALSE(fused_ops_enabled());
    got = net->forward(x).logits;
    EXPECT_EQ(got.scalar_type(), torch::kBFloat16);
  }
  EXPECT_FALSE(at::autocast::is_cpu_enabled());
  EXPECT_TRUE(fused_ops_enabled());
  const double scale = want.abs().max().item<double>();
  const double err = (got.to(torch::kFloat) - want).abs().max().item<double>();
  EXPECT_GT(err, 0.0) << "bf16 gave the float result bit for bit: autocast did not act";
  EXPECT_LT(err, 0.015 * scale) << "err " << err << " scale " << scale;  // measured: 0.0036 * scale
  // fp32 changes nothing; bad values and other devices are refused with the option's name.
  {
    PrecisionScope scope(Precision::kFp32, x.device());
    EXPECT_TRUE(torch::equal(net->forward(x).logits, want));
  }
  EXPECT_EQ(parse_precision("bf16"), Precision::kBf16);
  EXPECT_EQ(parse_precision("fp32"), Precision::kFp32);
  EXPECT_THROW(parse_precision("fp16"), UsageError);
  EXPECT_THROW(PrecisionScope(Precision::kBf16, torch::Device(torch::kCUDA, 0)), UsageError);
}

TEST(EvalNetwork, ImageNetLayoutHasTwoStemsAndItsOwnHead) {
  EvalNetworkOptions o(8, 7, 3, builtin_genotype("NoisyDARTS_b"));
  o.style(EvalStyle::kImageNet).auxiliary(true);
  EvalNetwork net(o);
  std::map<std::string, std::vector<int64_t>> shapes;
  for (auto& [k, v] : module_state_dict(*net)) shapes[k] = v.sizes().vec();
  EXPECT_EQ(shapes["stem0.0.weight"], (std::vector<int64_t>{4, 3, 3, 3}));
  EXPECT_EQ(shapes["stem0.3.weight"], (std::vector<int64_t>{8, 4, 3, 3}));
  EXPECT_EQ(shapes["stem1.1.weight"], (std::vector<int64_t>{8, 8, 3, 3}));
  EXPECT_TRUE(shapes.count("cells.0.preprocess0.conv_1.weight"));  // reduction_prev after the stems
  EXPECT_TRUE(shapes.count("auxiliary_head.features.5.weight"));
  EXPECT_FALSE(shapes.count("auxiliary_head.features.6.weight"));  // no BN after the 2x2 conv
  net->train();
  auto out = net->forward(torch::randn({2, 3, 64, 64}));
  EXPECT_EQ(out.logits.sizes(), (std::vector<int64_t>{2, 7}));
  EXPECT_EQ(out.aux_logits.sizes(), (std::vector<int64_t>{2, 7}));
}

// ------------------------------------------------------------------------------------------
// Profile
// ------------------------------------------------------------------------------------------

// SPEC 3's worked example, and the reference's numbers for every built-in, obtained with
// /usr/bin/python3 on the reference model.py (NetworkCIFAR(36, 10, 20), eval mode, one 3x32x32
// image, forward hooks summing out.numel() * in/groups * kh * kw per Conv2d and in * out per Linear).
TEST(Profile, NoisyDartsAMatchesTheWorkedExample) {
  const auto p = profile_genotype(builtin_genotype("NoisyDARTS_a"), 36, 20, dataset_shape("cifar10"));
  EXPECT_EQ(p.params, 3257110);
  EXPECT_EQ(p.macs, 513871488);
}

TEST(Profile, MultiplyAddsOfTheBuiltinsMatchTheReference) {
  const std::map<std::string, int64_t> expected{
      {"DARTS_V1", 500987520}, {"DARTS_V2", 528359040},     {"NASNet", 603452448},
      {"AmoebaNet", 488931552}, {"NoisyDARTS_a", 513871488}, {"NoisyDARTS_b", 492250752}};
  for (const auto& [name, macs] : expected)
    EXPECT_EQ(profile_genotype(builtin_genotype(name), 36, 20, dataset_shape("cifar10")).macs, macs) << name;
  // NetworkImageNet(48, 1000, 14) at 224 px, same method.
  const auto p = profile_genotype(builtin_genotype("NoisyDARTS_a"), 48, 14, dataset_shape("imagenet"),
                                  EvalStyle::kImageNet);
  EXPECT_EQ(p.params, 4639648);
  EXPECT_EQ(p.macs, 518716032);
}

TEST(Profile, CommandPrintsJsonWithoutReadingData) {
  auto r = run_cli("profile --genotype NoisyDARTS_a --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("{\"params\": 3257110, \"macs\": 513871488}"), std::string::npos) << r.out;
  r = run_cli("profile --genotype NoSuchCell --json");
  EXPECT_EQ(r.code, 4) << r.out;
}

// ------------------------------------------------------------------------------------------
// Interop
// ------------------------------------------------------------------------------------------

TEST(Interop, ExportThenImportIsBitwiseLossless) {
  const auto dir = temp_dir("roundtrip");
  auto a = tiny_eval_network("AmoebaNet");
  randomize(*a, 3);
  save_state_dict(module_state_dict(*a), (dir / "eval.pt").string());
  auto b = tiny_eval_network("AmoebaNet");
  load_module_state(*b, load_state_dict_file((dir / "eval.pt").string()), "eval.pt");
  const auto sa = module_state_dict(*a), sb = module_state_dict(*b);
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    EXPECT_EQ(sa[i].first, sb[i].first);
    EXPECT_TRUE(torch::equal(sa[i].second, sb[i].second)) << sa[i].first;
  }
  // The search network, alphas included.
  SearchNetworkOptions so(4, 5, 3);
  so.in_channels(1);
  SearchNetwork s1 = make_search_network(so), s2 = make_search_network(so);
  randomize(*s1, 5);
  save_state_dict(module_state_dict(*s1), (dir / "search.pt").string());
  const auto loaded = load_state_dict_file((dir / "search.pt").string());
  load_module_state(*s2, loaded, "search.pt");
  EXPECT_TRUE(torch::equal(s1->alphas_normal(), s2->alphas_normal()));
  EXPECT_TRUE(torch::equal(s1->alphas_reduce(), s2->alphas_reduce()));
  const auto t1 = module_state_dict(*s1), t2 = module_state_dict(*s2);
  for (size_t i = 0; i < t1.size(); ++i) EXPECT_TRUE(torch::equal(t1[i].second, t2[i].second)) << t1[i].first;
  // A wrong network is refused with the offending keys named.
  auto c = tiny_eval_network("DARTS_V1");
  try {
    load_module_state(*c, load_state_dict_file((dir / "eval.pt").string()), "eval.pt");
    FAIL() << "mismatch not detected";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("eval.pt does not match"), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_state_dict_file((dir / "missing.pt").string()), CheckpointError);
  std::ofstream((dir / "junk.pt").string()) << "not a zip";
  EXPECT_THROW(load_state_dict_file((dir / "junk.pt").string()), CheckpointError);
  fs::remove_all(dir);
}

TEST(Interop, PythonReadsExportsAndWritesImports) {
  const std::string py = python_with_torch();
  if (py.empty()) GTEST_SKIP() << "no python3 with torch (Debian: python3-torch)";
  const auto dir = temp_dir("python");
  auto net = tiny_eval_network("NASNet");
  randomize(*net, 7);
  const auto sd = module_state_dict(*net);
  save_state_dict(sd, (dir / "model.pt").string());
  save_tensor_file(torch::arange(12, torch::kFloat).reshape({3, 4}), (dir / "t.pt").string());
  // Python: list keys and shapes of the export, and write back an OrderedDict state dict (with
  // _metadata, as Module.state_dict() makes it) holding twice every value, plus a tensor.
  std::ofstream(dir / "check.py") <<
      "import sys, collections, torch\n"
      "d = sys.argv[1]\n"
      "sd = torch.load(d + '/model.pt')\n"
      "for k, v in sd.items(): print(k, ','.join(str(s) for s in v.shape), str(v.dtype))\n"
      "od = collections.OrderedDict((k, v * 2) for k, v in sd.items())\n"
      "od._metadata = collections.OrderedDict([('', {'version': 1})])\n"
      "torch.save(od, d + '/back.pt')\n"
      "t = torch.load(d + '/t.pt')\n"
      "assert t.shape == (3, 4) and float(t[2, 3]) == 11.0\n"
      "torch.save(torch.linspace(0, 1, 6).reshape(2, 3).t(), d + '/x.pt')\n";
  const auto r = run_command(py + " " + (dir / "check.py").string() + " " + dir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  std::istringstream lines(r.out);
  size_t i = 0;
  for (std::string line; std::getline(lines, line); ++i) {
    ASSERT_LT(i, sd.size()) << line;
    std::ostringstream want;
    want << sd[i].first << " ";
    for (int64_t d = 0; d < sd[i].second.dim(); ++d) want << (d ? "," : "") << sd[i].second.size(d);
    want << " " << (sd[i].second.scalar_type() == torch::kLong ? "torch.int64" : "torch.float32");
    EXPECT_EQ(line, want.str());
  }
  EXPECT_EQ(i, sd.size());
  const auto back = load_state_dict_file((dir / "back.pt").string());
  ASSERT_EQ(back.size(), sd.size());
  for (size_t k = 0; k < sd.size(); ++k) {
    EXPECT_EQ(back[k].first, sd[k].first);
    EXPECT_TRUE(torch::equal(back[k].second, sd[k].second * 2)) << sd[k].first;
  }
  const auto x = load_tensor_file((dir / "x.pt").string());  // a non-contiguous view in Python
  EXPECT_TRUE(torch::equal(x, torch::linspace(0, 1, 6).reshape({2, 3}).t()));
  fs::remove_all(dir);
}

TEST(Interop, PredictGivesTheNetworksEvalLogits) {
  const auto dir = temp_dir("predict");
  auto net = tiny_eval_network("DARTS_V2");
  randomize(*net, 11);
  save_state_dict(module_state_dict(*net), (dir / "w.pt").string());
  torch::manual_seed(0);
  const auto x = torch::randn({2, 1, 28, 28});
  save_tensor_file(x, (dir / "x.pt").string());
  auto r = run_cli("predict --weights " + (dir / "w.pt").string() + " --input " + (dir / "x.pt").string() +
                   " --out " + (dir / "y.pt").string() +
                   " --genotype DARTS_V2 --channels 4 --layers 3 --in-channels 1 --classes 5 --threads 1");
  ASSERT_EQ(r.code, 0) << r.out;
  net->eval();
  torch::NoGradGuard g;
  const auto want = net->forward(x).logits;
  EXPECT_TRUE(torch::allclose(load_tensor_file((dir / "y.pt").string()), want, 1e-5, 1e-6));
  // --precision bf16: float logits within bfloat16's rounding; refused for the search network.
  const std::string args = " --weights " + (dir / "w.pt").string() + " --input " + (dir / "x.pt").string() +
                           " --out " + (dir / "yb.pt").string() + " --in-channels 1 --classes 5 --threads 1 --precision bf16";
  r = run_cli("predict --genotype DARTS_V2 --channels 4 --layers 3" + args);
  ASSERT_EQ(r.code, 0) << r.out;
  const auto bf = load_tensor_file((dir / "yb.pt").string());
  EXPECT_EQ(bf.scalar_type(), torch::kFloat);
  const double err = (bf - want).abs().max().item<double>();
  EXPECT_GT(err, 0.0);
  EXPECT_LT(err, 0.03 * want.abs().max().item<double>());
  fs::remove(dir / "yb.pt");
  r = run_cli("predict --search-network --channels 4 --layers 3" + args);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--precision bf16"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir / "yb.pt"));
  r = run_cli("predict --genotype DARTS_V2 --channels 4 --layers 3" + args + " --precision fp16");
  EXPECT_EQ(r.code, 2) << r.out;
  // Wrong shape of network: one clear line, checkpoint exit code.
  r = run_cli("predict --weights " + (dir / "w.pt").string() + " --input " + (dir / "x.pt").string() +
              " --out " + (dir / "y2.pt").string() + " --genotype DARTS_V2 --channels 6 --layers 3 --in-channels 1 --classes 5");
  EXPECT_EQ(r.code, 5) << r.out;
  EXPECT_FALSE(fs::exists(dir / "y2.pt"));
  fs::remove_all(dir);
}

// ------------------------------------------------------------------------------------------
// Train
// ------------------------------------------------------------------------------------------

TEST(Train, BeatsChanceOnSyntheticDataAndKeepsItsFiles) {
  const auto dir = temp_dir("train");
  TrainConfig cfg = TrainConfig::preset_defaults("default");
  cfg.out = (dir / "run").string();
  cfg.dataset = "synthetic";
  cfg.genotype = "DARTS_V2";
  cfg.subset = 0;
  cfg.valid_portion = 0.2;
  cfg.channels = 4;
  cfg.layers = 3;
  cfg.batch_size = 32;
  cfg.epochs = 3;
  cfg.lr = 0.05;
  cfg.cutout = 4;
  cfg.crop_padding = 0;
  cfg.flip = false;
  cfg.threads = 1;  // a loaded 2-core machine runs 2 OpenMP threads several times slower
  TrainCallbacks cb;
  cb.progress = false;
  const TrainResult r = run_train(cfg, /*resume=*/false, cb);
  EXPECT_GT(r.test.top1, 40.0) << "chance is 10%";
  EXPECT_GT(r.best_valid_top1, 40.0);
  EXPECT_GE(r.test.top5, r.test.top1);
  for (const char* f : {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "result.json", "summary.txt"})
    EXPECT_TRUE(fs::exists(fs::path(cfg.out) / f)) << f;
  std::ifstream m(fs::path(cfg.out) / "metrics.jsonl");
  int lines = 0;
  for (std::string l; std::getline(m, l);) ++lines;
  EXPECT_EQ(lines, 3);
  // `eval` of the selected checkpoint reproduces the reported test accuracy.
  const EvalResult e = evaluate_checkpoint((fs::path(cfg.out) / "best.pt").string(), "", 64, 1);
  EXPECT_DOUBLE_EQ(e.top1, r.test.top1);
  // In bfloat16 the same images, nearly the same loss and accuracy.
  const EvalResult eb = evaluate_checkpoint((fs::path(cfg.out) / "best.pt").string(), "", 64, 1, Precision::kBf16);
  EXPECT_EQ(eb.images, e.images);
  EXPECT_NEAR(eb.top1, e.top1, 2.0);
  EXPECT_NEAR(eb.loss, e.loss, 0.02 * e.loss);
  // A second run into the same directory is refused; --resume of a finished run only re-tests.
  EXPECT_THROW(run_train(cfg, false, cb), UsageError);
  const TrainResult again = run_train(cfg, /*resume=*/true, cb);
  EXPECT_DOUBLE_EQ(again.test.top1, r.test.top1);
  // Export of a train checkpoint = the evaluation network's state dict.
  export_checkpoint((fs::path(cfg.out) / "best.pt").string(), (dir / "model.pt").string());
  auto trained = load_trained_network((fs::path(cfg.out) / "best.pt").string());
  const auto want = module_state_dict(*trained);
  const auto got = load_state_dict_file((dir / "model.pt").string());
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(torch::equal(got[i].second, want[i].second)) << got[i].first;
  // --init-from: a state dict of the same network is accepted, one of another network refused.
  TrainConfig fine = cfg;
  fine.out = (dir / "fine").string();
  fine.init_from = (dir / "model.pt").string();
  fine.epochs = 1;
  fine.max_steps = 2;
  EXPECT_NO_THROW(run_train(fine, false, cb));
  fine.out = (dir / "fine2").string();
  fine.channels = 6;
  EXPECT_THROW(run_train(fine, false, cb), CheckpointError);
  fs::remove_all(dir);
}
