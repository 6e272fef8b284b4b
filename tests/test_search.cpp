// The search network, the architect, the search loop and the `noisydarts search` command.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <sys/wait.h>
#include <unistd.h>

#include <c10/core/CPUAllocator.h>

#include <nlohmann/json.hpp>

#include "cli_helpers.h"
#include "noisydarts/architect.h"
#include "noisydarts/config.h"
#include "noisydarts/error.h"
#include "noisydarts/genotype.h"
#include "noisydarts/ops.h"
#include "noisydarts/runtime.h"
#include "noisydarts/search_network.h"

using namespace noisydarts;
using noisydarts::test::run_cli;
namespace fs = std::filesystem;

namespace {

SearchNetwork tiny_network(const std::vector<std::string>& ops, int64_t layers = 3) {
  SearchNetworkOptions o(4, 5, layers);
  o.in_channels(1).primitives(ops);
  return make_search_network(o);
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

fs::path fresh_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("noisydarts_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

}  // namespace

TEST(SearchNetwork, ParameterCountEqualsTheReferenceImplementation) {
  // Counted with the reference PyTorch model_search.Network (3 input channels, 10 classes).
  SearchNetworkOptions o(16, 10, 8);
  SearchNetwork net = make_search_network(o);
  int64_t n = 0;
  for (auto& p : net->weight_parameters()) n += p.numel();
  EXPECT_EQ(n, 1930618);
  SearchNetworkOptions small(8, 10, 5);
  SearchNetwork net2 = make_search_network(small);
  n = 0;
  for (auto& p : net2->weight_parameters()) n += p.numel();
  EXPECT_EQ(n, 394210);
  EXPECT_EQ(net2->alphas_normal().sizes(), torch::IntArrayRef({14, 7}));
  EXPECT_EQ(net2->alphas_reduce().sizes(), torch::IntArrayRef({14, 7}));
}

TEST(SearchNetwork, StateDictKeysFollowTheReferenceLayout) {
  SearchNetworkOptions o(8, 10, 5);
  SearchNetwork net = make_search_network(o);
  auto params = net->named_parameters();
  auto buffers = net->named_buffers();
  EXPECT_TRUE(params.contains("stem.0.weight"));
  EXPECT_TRUE(params.contains("stem.1.weight"));
  EXPECT_TRUE(params.contains("cells.0.preprocess0.op.1.weight"));
  EXPECT_TRUE(params.contains("cells.1._ops.0._ops.2.conv_1.weight"));  // reduction skip
  EXPECT_TRUE(params.contains("cells.1._ops.0._ops.3.op.6.weight"));
  EXPECT_TRUE(params.contains("cells.2.preprocess0.conv_1.weight"));    // after a reduction
  EXPECT_TRUE(buffers.contains("cells.1._ops.0.bn1.running_mean"));
  EXPECT_TRUE(buffers.contains("cells.1._ops.0.bn2.running_var"));
  EXPECT_TRUE(params.contains("classifier.weight"));
  EXPECT_TRUE(params.contains("alphas_normal"));
  EXPECT_TRUE(params.contains("alphas_reduce"));
  EXPECT_EQ(params["stem.0.weight"].sizes(), torch::IntArrayRef({24, 3, 3, 3}));
  EXPECT_EQ(params["cells.0.preprocess0.op.1.weight"].sizes(), torch::IntArrayRef({8, 24, 1, 1}));
}

TEST(SearchNetwork, OutputShapeForGrayAndColourInputs) {
  auto net = tiny_network(noisydarts_primitives());
  EXPECT_EQ(net->forward(torch::randn({3, 1, 28, 28})).sizes(), torch::IntArrayRef({3, 5}));
  SearchNetworkOptions o(4, 10, 2);
  SearchNetwork c = make_search_network(o);
  EXPECT_EQ(c->forward(torch::randn({2, 3, 32, 32})).sizes(), torch::IntArrayRef({2, 10}));
}

TEST(SearchNetwork, GradientsReachEveryWeightAndEveryAlpha) {
  torch::manual_seed(0);
  auto net = tiny_network(darts_primitives());
  net->train();
  auto loss = torch::nn::functional::cross_entropy(net->forward(torch::randn({4, 1, 12, 12})),
                                                   torch::tensor({0, 1, 2, 3}));
  loss.backward();
  for (auto& p : net->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << p.key();
  }
  // every alpha entry, `none` included (through the softmax normalisation)
  EXPECT_TRUE(net->alphas_normal().grad().ne(0).all().item<bool>());
  EXPECT_TRUE(net->alphas_reduce().grad().ne(0).all().item<bool>());
}

TEST(SearchNetwork, WeightAndArchParametersPartitionAllParameters) {
  auto net = tiny_network(noisydarts_primitives());
  EXPECT_EQ(net->weight_parameters().size() + 2, net->parameters().size());
  for (auto& w : net->weight_parameters()) {
    EXPECT_FALSE(w.is_same(net->alphas_normal()));
    EXPECT_FALSE(w.is_same(net->alphas_reduce()));
  }
}

TEST(SearchNetwork, EvalModeIsDeterministicTrainModeIsNoisy) {
  torch::manual_seed(1);
  SearchNetworkOptions o(4, 5, 2);
  NoiseOptions n;
  n.lambda = 0.5;
  o.in_channels(1).primitives({"skip_connect"}).noise(n);
  SearchNetwork net = make_search_network(o);
  auto x = torch::randn({2, 1, 8, 8});
  net->eval();
  EXPECT_TRUE(net->forward(x).equal(net->forward(x)));
  net->train();
  EXPECT_FALSE(net->forward(x).equal(net->forward(x)));
}

TEST(SearchNetwork, GenotypeFollowsTheAlphas) {
  auto net = tiny_network(noisydarts_primitives());
  {
    torch::NoGradGuard g;
    net->alphas_normal().zero_();
    net->alphas_reduce().zero_();
    // node 0: edges 0,1 -> sep_conv_3x3 (index 3) on input 1, skip (2) on input 0
    net->alphas_normal()[1][3] = 5.0;
    net->alphas_normal()[0][2] = 4.0;
  }
  auto g = net->genotype();
  ASSERT_EQ(g.normal.size(), 8u);
  EXPECT_EQ(g.normal[0], GeneEdge("sep_conv_3x3", 1));
  EXPECT_EQ(g.normal[1], GeneEdge("skip_connect", 0));
  EXPECT_EQ(g.normal_concat, (std::vector<int>{2, 3, 4, 5}));
}

TEST(Runtime, KeepFreedMemoryInstallsAnAligningAllocatorWhoseTensorsWorkAndFree) {
  keep_freed_memory();
  keep_freed_memory();  // idempotent
  c10::Allocator* own = c10::GetCPUAllocator();
  ASSERT_NE(own, c10::GetDefaultCPUAllocator());
  // Sizes around the alignment, odd sizes, and one above glibc's mmap threshold (32 MiB).
  for (int64_t n : {1, 3, 63, 64, 65, 4097, 1 << 20, (40 << 20) + 5}) {
    auto t = torch::empty({n}, torch::kUInt8);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 64, 0u) << n;
    EXPECT_EQ(t.storage().data_ptr().get_deleter(), own->raw_deleter()) << n;
    t.fill_(3);
    EXPECT_EQ(t.sum(torch::kLong).item<int64_t>(), 3 * n) << n;
  }
  // A request no machine can serve is one c10::Error saying so, not a crash.
  try {
    auto huge = torch::empty({int64_t{1} << 60}, torch::kUInt8);
    FAIL() << "allocated 2^60 bytes";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("out of memory: could not allocate 1152921504606846976 bytes"),
              std::string::npos) << e.what_without_backtrace();
  }
  // What ATen's kernels and autograd allocate comes from it too.
  auto x = torch::ones({2, 3, 9, 9}).requires_grad_();
  auto y = torch::conv2d(x, torch::ones({4, 3, 3, 3}), {}, 1, 1);
  y.sum().backward();
  EXPECT_EQ(y.storage().data_ptr().get_deleter(), own->raw_deleter());
  EXPECT_EQ(x.grad().storage().data_ptr().get_deleter(), own->raw_deleter());
  EXPECT_EQ(y.sum().item<float>(), 2 * 4 * (49 * 27 + 28 * 18 + 4 * 12));  // interior, edges, corners
  EXPECT_EQ(x.grad()[0][0][4][4].item<float>(), 36.f);  // 4 outputs x 9 taps
}

TEST(Architect, FirstOrderStepMovesOnlyTheAlphasAlongAdam) {
  torch::manual_seed(2);
  auto net = tiny_network(noisydarts_primitives(), 3);
  NoiseOptions none;
  none.type = NoiseType::kNone;
  const_cast<NoiseState&>(net->noise()).options = none;
  net->train();
  Architect arch(net, ArchitectOptions{0.1, 0.5, 0.999, 0.0});
  Batch b{torch::randn({4, 1, 8, 8}), torch::tensor({0, 1, 2, 3})};
  std::vector<torch::Tensor> w_before;
  for (auto& w : net->weight_parameters()) w_before.push_back(w.detach().clone());
  auto a_before = net->alphas_normal().detach().clone();
  // expected first Adam step: lr * sign(g) (m/(sqrt(v)+eps) = g/|g| at step 1)
  auto loss = torch::nn::functional::cross_entropy(net->forward(b.x), b.y);
  auto g = torch::autograd::grad({loss}, {net->alphas_normal()})[0];
  // BN running stats moved during that forward; the arch step's forward is in train mode
  // too and uses batch statistics, so the gradient is the same.
  arch.step(b);
  auto delta = net->alphas_normal().detach() - a_before;
  EXPECT_TRUE(torch::allclose(delta, -0.1 * g.sign(), 1e-4, 1e-5));
  auto w_after = net->weight_parameters();
  for (size_t i = 0; i < w_after.size(); ++i) {
    EXPECT_TRUE(w_after[i].equal(w_before[i]));
    EXPECT_FALSE(w_after[i].grad().defined() && w_after[i].grad().abs().sum().item<double>() > 0);
  }
}

TEST(Config, PresetsHaveThePaperSettings) {
  auto n = SearchConfig::preset_defaults("noisydarts", "paper");
  EXPECT_EQ(n.primitives, noisydarts_primitives());
  EXPECT_EQ(n.noise.type, NoiseType::kGaussian);
  EXPECT_DOUBLE_EQ(n.noise.lambda, 0.2);
  EXPECT_DOUBLE_EQ(n.noise.mean, 0.0);
  EXPECT_DOUBLE_EQ(n.noise.skip_drop_path, 0.3);
  EXPECT_EQ(n.batch_size, 128);
  EXPECT_DOUBLE_EQ(n.lr, 0.05);
  EXPECT_DOUBLE_EQ(n.lr_min, 0.001);
  EXPECT_EQ(n.epochs, 50);
  EXPECT_EQ(n.layers, 8);
  EXPECT_EQ(n.channels, 16);
  EXPECT_DOUBLE_EQ(n.arch_lr, 3e-4);
  EXPECT_DOUBLE_EQ(n.arch_beta1, 0.5);
  EXPECT_DOUBLE_EQ(n.arch_weight_decay, 1e-3);
  auto d = SearchConfig::preset_defaults("darts", "paper");
  EXPECT_EQ(d.primitives, darts_primitives());
  EXPECT_EQ(d.noise.type, NoiseType::kNone);
  EXPECT_EQ(d.batch_size, 64);
  EXPECT_DOUBLE_EQ(d.lr, 0.025);
  EXPECT_DOUBLE_EQ(d.noise.skip_drop_path, 0.0);
}

TEST(Config, JsonRoundTripsAndRejectsUnknownKeys) {
  auto c = SearchConfig::preset_defaults("noisydarts", "small");
  c.noise.lambda = 0.1;
  c.epochs = 3;
  auto j = c.to_json();
  auto d = SearchConfig::preset_defaults("darts", "paper");
  d.merge_json(j, "test");
  EXPECT_EQ(d.to_json(), j);
  EXPECT_THROW(d.merge_json(nlohmann::json{{"epochz", 3}}, "test"), ConfigError);
  EXPECT_THROW(d.merge_json(nlohmann::json{{"epochs", "three"}}, "test"), ConfigError);
  EXPECT_THROW(d.merge_json(nlohmann::json{{"epochs", 2.5}}, "test"), ConfigError);
  EXPECT_THROW(d.merge_json(nlohmann::json{{"noise", {{"lambdaa", 1}}}}, "test"), ConfigError);
}

TEST(Config, ValidateNamesTheBadOption) {
  auto c = SearchConfig::preset_defaults("noisydarts", "small");
  c.epochs = 0;
  try {
    c.validate();
    FAIL();
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("--epochs"), std::string::npos);
  }
}

TEST(Cli, OneEpochSearchOnSyntheticDataWritesTheRunDirectory) {
  const auto dir = fresh_dir("cli_search");
  auto r = run_cli("search --dataset synthetic --epochs 1 --channels 4 --layers 2 --batch-size 16 "
                   "--subset 128 --threads 1 --seed 3 -q --out " + dir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  for (auto f : {"config.json", "metrics.jsonl", "genotype.json", "genotype.txt", "summary.txt",
                 "normal.dot", "reduce.dot"})
    EXPECT_TRUE(fs::exists(dir / f)) << f;
  auto g = nlohmann::json::parse(read_file(dir / "genotype.json"));
  ASSERT_EQ(g["normal"].size(), 8u);
  ASSERT_EQ(g["reduce"].size(), 8u);
  EXPECT_EQ(g["normal_concat"], nlohmann::json({2, 3, 4, 5}));
  for (auto& e : g["normal"]) EXPECT_TRUE(is_known_op(e[0].get<std::string>()));
  auto genotype = genotype_from_json(g);
  EXPECT_EQ(genotype_to_text(genotype) + "\n", read_file(dir / "genotype.txt"));
  // stdout is the genotype text
  EXPECT_NE(r.out.find(genotype_to_text(genotype)), std::string::npos);
  // one metrics line with softmax(alpha) rows summing to 1
  std::ifstream m(dir / "metrics.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(m, line)) {
    ++lines;
    auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["epoch"], 1);
    ASSERT_EQ(j["alphas_normal"].size(), 14u);
    double s = 0;
    for (auto& v : j["alphas_normal"][0]) s += v.get<double>();
    EXPECT_NEAR(s, 1.0, 1e-9);
    for (auto k : {"train_loss", "train_acc", "arch_loss", "valid_acc", "lr", "noise_scale", "seconds"})
      EXPECT_TRUE(j.contains(k)) << k;
  }
  EXPECT_EQ(lines, 1);
  auto cfg = nlohmann::json::parse(read_file(dir / "config.json"));
  EXPECT_EQ(cfg["epochs"], 1);
  EXPECT_EQ(cfg["noise"]["type"], "gaussian");
  fs::remove_all(dir);
}

TEST(Cli, BadOptionsFailWithOneLineAndNonZeroExit) {
  const auto dir = fresh_dir("cli_bad");
  auto r = run_cli("search --dataset synthetic --epochs 0 -q --out " + dir.string());
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--epochs"), std::string::npos);
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  EXPECT_FALSE(fs::exists(dir));
  r = run_cli("search --dataset mnist --data-dir /nonexistent -q --out " + dir.string());
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.out.find("/nonexistent"), std::string::npos);
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  EXPECT_FALSE(fs::exists(dir));
  r = run_cli("search --dataset imagenet -q --out " + dir.string());
  EXPECT_EQ(r.code, 2);
  r = run_cli("search --dataset synthetic --noise-lambda abc -q --out " + dir.string());
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--noise-lambda"), std::string::npos);
}

namespace {
// The default CLI11's --help shows for `flag` ("  --epochs INT=10   Search epochs" -> "10"); ""
// when absent.
std::string help_default(const std::string& help, const std::string& flag) {
  std::istringstream in(help);
  for (std::string line; std::getline(in, line);) {
    const auto p = line.find(flag + " ");
    if (p == std::string::npos || line.find_first_not_of(' ') != p) continue;
    const auto gap = line.find("  ", p);  // the option column ends at the help text
    const std::string column = line.substr(p, gap == std::string::npos ? std::string::npos : gap - p);
    const auto eq = column.rfind('=');
    return eq == std::string::npos ? "" : column.substr(eq + 1);
  }
  return "";
}
}  // namespace

TEST(Cli, SearchHelpShowsTheDefaultScalesValuesThatPrintConfigResolves) {
  const auto help = run_cli("search --help");
  ASSERT_EQ(help.code, 0) << help.out;
  EXPECT_EQ(help_default(help.std_out, "--epochs"), "10") << help.std_out;
  EXPECT_EQ(help_default(help.std_out, "--noise-lambda"), "0.2");
  EXPECT_EQ(help_default(help.std_out, "--subset"), "1000");
  EXPECT_EQ(help_default(help.std_out, "--arch-lr"), "0.03");
  EXPECT_EQ(help_default(help.std_out, "--batch-size"), "32");
  EXPECT_EQ(help_default(help.std_out, "--flip"), "true");
  // Typed: the type names are shown, not TEXT for numbers.
  EXPECT_NE(help.std_out.find("--epochs INT:at least 1=10"), std::string::npos);
  EXPECT_NE(help.std_out.find("--noise-lambda FLOAT:NONNEGATIVE=0.2"), std::string::npos);
  // How the preset and the scale change the defaults.
  EXPECT_NE(help.std_out.find("--scale paper changes: "), std::string::npos);
  EXPECT_NE(help.std_out.find("--epochs 50"), std::string::npos);
  EXPECT_NE(help.std_out.find("--preset darts changes: "), std::string::npos);

  const auto pc = run_cli("search --print-config");
  ASSERT_EQ(pc.code, 0) << pc.out;
  const auto cfg = nlohmann::json::parse(pc.std_out);
  EXPECT_EQ(cfg["epochs"].dump(), help_default(help.std_out, "--epochs"));
  EXPECT_EQ(cfg["noise"]["lambda"].dump(), help_default(help.std_out, "--noise-lambda"));
  EXPECT_EQ(cfg["subset"].dump(), help_default(help.std_out, "--subset"));

  const auto th = run_cli("train --help");
  ASSERT_EQ(th.code, 0);
  EXPECT_EQ(help_default(th.std_out, "--epochs"), "6");
  EXPECT_NE(th.std_out.find("--preset paper changes: "), std::string::npos);
}

TEST(Cli, PrintConfigEqualsTheConfigJsonOfARunWithTheSameFlagsAndTouchesNothing) {
  const auto dir = fresh_dir("print_config");
  const std::string flags = "--dataset synthetic --epochs 1 --max-steps 1 --channels 4 --layers 2 --batch-size 16 "
                            "--subset 128 --threads 1 --seed 3 --noise-lambda 0.15 --ops skip_connect,sep_conv_3x3 -q --out " +
                            dir.string();
  const auto pc = run_cli("search " + flags + " --print-config");
  ASSERT_EQ(pc.code, 0) << pc.out;
  EXPECT_FALSE(fs::exists(dir)) << "--print-config created the run directory";
  const auto r = run_cli("search " + flags);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(nlohmann::json::parse(pc.std_out), nlohmann::json::parse(read_file(dir / "config.json")));
  // The summary names every file the run wrote and the next command.
  const std::string summary = read_file(dir / "summary.txt");
  for (const char* f : {"config.json", "metrics.jsonl", "genotype.json", "genotype.txt", "report.html", "summary.txt"}) {
    EXPECT_NE(summary.find(std::string(" ") + f), std::string::npos) << f;
    EXPECT_TRUE(fs::exists(dir / f)) << f;
  }
  EXPECT_NE(summary.find("next              noisydarts train --genotype " + dir.string() + " --out " + dir.string() + "-train"),
            std::string::npos) << summary;
  // How decisive the cell is: margins per kept edge in genotype.json, a summary line, and a
  // warning after one step (the alphas are still within a hair of uniform).
  const auto gj = nlohmann::json::parse(read_file(dir / "genotype.json"));
  ASSERT_TRUE(gj.contains("margins"));
  EXPECT_EQ(gj["margins"]["normal"].size(), 8u);
  EXPECT_EQ(gj["margins"]["reduce"].size(), 8u);
  EXPECT_DOUBLE_EQ(gj["margins"]["threshold"].get<double>(), 0.1 / 2);  // K = 2 ops
  for (const auto& e : gj["margins"]["normal"]) {
    EXPECT_GE(e["op_margin"].get<double>(), 0.0);
    EXPECT_GE(e["edge_margin"].get<double>(), 0.0);
  }
  EXPECT_NE(summary.find("  margins           smallest op margin "), std::string::npos) << summary;
  EXPECT_NE(summary.find("\nwarning: "), std::string::npos) << summary;
  const std::string report = read_file(dir / "report.html");
  EXPECT_NE(report.find("<th>genotype margins</th><td>smallest op margin "), std::string::npos);
  EXPECT_NE(report.find("of 16 kept ops below 0.1/K"), std::string::npos);
  // A search's run directory is a --genotype everywhere.
  const auto prof = run_cli("profile --genotype " + dir.string());
  EXPECT_EQ(prof.code, 0) << prof.out;
  const auto tpc = run_cli("train --genotype " + dir.string() + " --print-config --out " + (dir / "t").string());
  ASSERT_EQ(tpc.code, 0) << tpc.out;
  EXPECT_EQ(nlohmann::json::parse(tpc.std_out)["genotype"].get<std::string>() + "\n", read_file(dir / "genotype.txt"));
  EXPECT_FALSE(fs::exists(dir / "t"));
  const auto empty = fresh_dir("print_config_empty");
  fs::create_directories(empty);
  const auto bad = run_cli("train --genotype " + empty.string() + " --print-config");
  EXPECT_EQ(bad.code, 4) << bad.out;
  EXPECT_NE(bad.err.find("holds no genotype.json"), std::string::npos) << bad.err;
  fs::remove_all(dir);
  fs::remove_all(empty);
}

TEST(Cli, ATypedFlagGivenABadValueNamesTheFlag) {
  for (const std::string& bad : {"--epochs abc", "--epochs 1.5", "--flip maybe", "--seed -1", "--threads 300", "--train-portion 2"}) {
    const auto r = run_cli("search --dataset synthetic " + bad + " -q --out /tmp/noisydarts_never_created");
    EXPECT_EQ(r.code, 2) << bad << ": " << r.out;
    EXPECT_NE(r.err.find(bad.substr(0, bad.find(' '))), std::string::npos) << bad << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_FALSE(fs::exists("/tmp/noisydarts_never_created"));
}

TEST(Bench, CountOpsCountsOneIterationsOperatorCallsTheSameEachRunAndTheFusedBnMakesNone) {
  // `bench search-step --count-ops`: one untimed iteration's ATen operator calls and autograd
  // node runs. The same program makes the same calls: two runs count the same. The fused BN's
  // running statistics and batch count are kept without ATen calls, and a folded mixing weight
  // reaches its node without a repeat: no aten::repeat, and no aten::mul_ but the architect's
  // Adam's; --no-fused (the modules, as the reference runs them) makes several times as many calls.
  auto counts = [](const std::string& extra) {
    auto r = run_cli("bench search-step --in-channels 1 --image-size 8 --channels 4 --layers 2 --batch-size 2 "
                     "--iters 1 --warmup 1 --threads 1 --count-ops --json " + extra);
    EXPECT_EQ(r.code, 0) << r.out;
    const auto lines = r.std_out.substr(0, r.std_out.find_last_not_of('\n') + 1);
    return nlohmann::json::parse(lines.substr(lines.find_last_of('\n') + 1))["ops"];
  };
  const auto a = counts(""), b = counts(""), modules = counts("--no-fused");
  ASSERT_TRUE(a.is_object()) << a;
  EXPECT_GT(a["outer"].get<int64_t>(), 100);
  EXPECT_GE(a["all"].get<int64_t>(), a["outer"].get<int64_t>());
  EXPECT_GT(a["autograd_nodes"].get<int64_t>(), 50);
  EXPECT_EQ(a["outer"], b["outer"]);
  EXPECT_EQ(a["all"], b["all"]);
  EXPECT_EQ(a["autograd_nodes"], b["autograd_nodes"]);
  EXPECT_EQ(a["by_name"], b["by_name"]);
  int64_t sum = 0;
  for (const auto& [name, k] : a["by_name"].items())
    if (name.rfind("aten::", 0) == 0) sum += k.get<int64_t>();
  EXPECT_EQ(sum, a["outer"].get<int64_t>());
  // The only in-place multiplies left are Adam's two moment decays per alpha tensor (normal, reduce).
  EXPECT_EQ(a["by_name"].value("aten::mul_", 0), 4) << a["by_name"];
  EXPECT_FALSE(a["by_name"].contains("aten::repeat")) << a["by_name"];
  EXPECT_GT(modules["all"].get<int64_t>(), 2 * a["all"].get<int64_t>());
  const auto& top = a["most_frequent"];
  ASSERT_FALSE(top.empty());
  for (size_t i = 1; i < top.size(); ++i) EXPECT_GE(top[i - 1][1].get<int64_t>(), top[i][1].get<int64_t>());
}
