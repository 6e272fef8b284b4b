// The evidence tools (issue: studies, landscapes, decisiveness): the landscape grid and its
// directions against hand-computed values, the top-2 Hessian eigenvectors of an explicit matrix,
// the `landscape` command on a real search checkpoint, and the `study` command (a 2x2 grid whose
// rows equal each run's own metrics.jsonl; an interrupted study resumed without redoing finished
// runs).
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "cli_helpers.h"
#include "tensor_helpers.h"
#include "noisydarts/hessian.h"
#include "noisydarts/landscape.h"
#include "noisydarts/study.h"

namespace nd = noisydarts;
namespace fs = std::filesystem;
using nlohmann::json;
using nd::test::run_cli;
using nd::test::slurp;

namespace {

fs::path fresh_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("noisydarts_ev_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

nd::SearchNetwork tiny_net(bool noise) {
  torch::manual_seed(11);
  nd::SearchNetworkOptions o(4, 3, 3);
  o.in_channels(1).steps(2).multiplier(2).primitives({"skip_connect", "sep_conv_3x3", "max_pool_3x3", "dil_conv_3x3"});
  nd::NoiseOptions n;
  if (!noise) n.type = nd::NoiseType::kNone;
  o.noise(n).alpha_init_std(0.5);
  nd::SearchNetwork net = make_search_network(o);
  net->to(torch::kDouble);
  net->train();
  return net;
}

nd::Batch tiny_batch() {
  torch::manual_seed(12);
  return {torch::randn({6, 1, 8, 8}, torch::kDouble), torch::randint(0, 3, {6}, torch::kLong)};
}

using noisydarts::test::bitwise_equal;
using noisydarts::test::snapshot;

double dot(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (a[i] * b[i]).sum().item<double>();
  return s;
}

std::vector<json> read_jsonl(const fs::path& p) {
  std::vector<json> out;
  std::ifstream f(p);
  for (std::string line; std::getline(f, line);)
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

/// The search flags of a tiny study run (synthetic data, a few seconds per search).
const char* kTinySearch = "--dataset synthetic --subset 64 --batch-size 16 --channels 4 --layers 3 --epochs 2 --eval-valid false";

}  // namespace

TEST(Landscape, GridCoordinatesAreAntisymmetricWithAnExactCentre) {
  const auto c = nd::grid_coords(21, 0.7);
  ASSERT_EQ(c.size(), 21u);
  EXPECT_EQ(c[10], 0.0);
  EXPECT_EQ(c[0], -0.7);
  EXPECT_EQ(c[20], 0.7);
  for (int i = 0; i < 21; ++i) EXPECT_EQ(c[i], -c[20 - i]) << i;
  for (int i = 1; i < 21; ++i) EXPECT_NEAR(c[i] - c[i - 1], 0.07, 1e-15);
}

TEST(Landscape, AQuadraticGivesASymmetricGridOfItsExactValues) {
  torch::manual_seed(1);
  const std::vector<torch::Tensor> centre{torch::zeros({3, 4}, torch::kDouble), torch::zeros({2, 4}, torch::kDouble)};
  auto M = torch::randn({20, 20}, torch::kDouble);
  const auto A = M.matmul(M.t()) / 20 + torch::eye(20, torch::kDouble);
  auto flat = [](const std::vector<torch::Tensor>& x) { return torch::cat({x[0].reshape(-1), x[1].reshape(-1)}); };
  auto f = [&](const std::vector<torch::Tensor>& x) {
    const auto v = flat(x);
    return v.dot(A.mv(v)).item<double>();
  };
  const auto d1 = nd::random_direction({torch::ones({3, 4}, torch::kDouble), torch::ones({2, 4}, torch::kDouble)}, 7, false);
  const auto d2 = nd::random_direction({torch::ones({3, 4}, torch::kDouble), torch::ones({2, 4}, torch::kDouble)}, 8, false);
  const auto coords = nd::grid_coords(11, 1.5);
  int rows_seen = 0;
  const auto v = nd::evaluate_grid(centre, d1, d2, coords, f, [&](int done, int n) {
    EXPECT_EQ(done, rows_seen + 1);
    EXPECT_EQ(n, 11);
    rows_seen = done;
  });
  EXPECT_EQ(rows_seen, 11);
  const double p11 = flat(d1).dot(A.mv(flat(d1))).item<double>(), p22 = flat(d2).dot(A.mv(flat(d2))).item<double>(),
               p12 = flat(d1).dot(A.mv(flat(d2))).item<double>();
  for (int i = 0; i < 11; ++i)
    for (int j = 0; j < 11; ++j) {
      EXPECT_EQ(v[i][j], v[10 - i][10 - j]) << i << "," << j;  // f(x) = f(-x), exactly
      const double a = coords[i], b = coords[j];
      EXPECT_NEAR(v[i][j], a * a * p11 + 2 * a * b * p12 + b * b * p22, 1e-10 * (1 + std::abs(v[i][j])));
    }
  EXPECT_EQ(v[5][5], 0.0);
}

TEST(Landscape, RandomDirectionsAreNormalisedPerEdge) {
  torch::manual_seed(2);
  auto a = torch::randn({5, 7}, torch::kDouble);
  a[3].zero_();  // an edge whose alphas are all zero gets a unit row
  const std::vector<torch::Tensor> alphas{a, torch::randn({2, 7}, torch::kDouble)};
  const auto d = nd::random_direction(alphas, 3, true);
  ASSERT_EQ(d.size(), 2u);
  for (size_t t = 0; t < 2; ++t) {
    ASSERT_EQ(d[t].sizes(), alphas[t].sizes());
    for (int64_t r = 0; r < alphas[t].size(0); ++r) {
      const double target = alphas[t][r].norm().item<double>();
      EXPECT_NEAR(d[t][r].norm().item<double>(), target > 0 ? target : 1.0, 1e-12) << t << "," << r;
    }
  }
  const auto u = nd::random_direction(alphas, 3, false);
  for (int64_t r = 0; r < 5; ++r) EXPECT_NEAR(u[0][r].norm().item<double>(), 1.0, 1e-12);
  // Same seed, same direction (up to the per-row scale); another seed, another one.
  EXPECT_TRUE(bitwise_equal(d, nd::random_direction(alphas, 3, true)));
  EXPECT_FALSE(torch::allclose(d[0], nd::random_direction(alphas, 4, true)[0]));
  EXPECT_NEAR((u[0][1] * a[1].norm()).sub(d[0][1]).abs().max().item<double>(), 0.0, 1e-12);
}

TEST(Landscape, TheCentreIsTheLossAtTheAlphasAndTheNetworkIsLeftAsItWas) {
  auto net = tiny_net(/*noise=*/true);  // noise on: the landscape must switch it off
  const auto b = tiny_batch();
  const auto alphas0 = snapshot(net->arch_parameters());
  const auto buffers0 = snapshot(net->buffers());
  const auto d1 = nd::random_direction(alphas0, 1, true), d2 = nd::random_direction(alphas0, 2, true);
  const auto coords = nd::grid_coords(5, 1.0);
  const auto v = nd::evaluate_grid(alphas0, d1, d2, coords,
                                   [&](const std::vector<torch::Tensor>& x) { return nd::architecture_loss(net, {b}, x); });
  EXPECT_TRUE(bitwise_equal(alphas0, net->arch_parameters()));
  EXPECT_TRUE(bitwise_equal(buffers0, net->buffers()));
  EXPECT_TRUE(net->is_training());
  double direct;
  {
    torch::NoGradGuard ng;
    nd::NoiseSuspend quiet(net->noise());
    direct = torch::nn::functional::cross_entropy(net->forward(b.x), b.y).item<double>();
  }
  EXPECT_EQ(v[2][2], direct);
  // Off the centre the loss is another number, and the function is deterministic.
  EXPECT_NE(v[0][0], direct);
  EXPECT_EQ(nd::architecture_loss(net, {b}, alphas0), direct);
  // Two batches: the size-weighted mean of the two losses.
  const nd::Batch half{b.x.slice(0, 0, 2), b.y.slice(0, 0, 2)}, rest{b.x.slice(0, 2), b.y.slice(0, 2)};
  const double l1 = nd::architecture_loss(net, {half}, alphas0), l2 = nd::architecture_loss(net, {rest}, alphas0);
  EXPECT_NEAR(nd::architecture_loss(net, {half, rest}, alphas0), (2 * l1 + 4 * l2) / 6, 1e-14);
}

TEST(Hessian, TopTwoEigenpairsOfAnExplicitMatrixAreOrthonormalEigenvectors) {
  // A symmetric 6x6 matrix with eigenvalues 5, -3, 1.5, 0.5, 0.2, -0.1 acting on [2, 3] tensors.
  torch::manual_seed(4);
  const auto Q = std::get<0>(torch::linalg::qr(torch::randn({6, 6}, torch::kDouble)));
  const auto A = Q.matmul(torch::diag(torch::tensor({5.0, -3.0, 1.5, 0.5, 0.2, -0.1}, torch::kDouble))).matmul(Q.t());
  const nd::AlphaHvp hvp = [&](const std::vector<torch::Tensor>& v) {
    return std::vector<torch::Tensor>{A.mv(v[0].reshape(-1)).reshape({2, 3})};
  };
  const std::vector<torch::Tensor> like{torch::zeros({2, 3}, torch::kDouble)};
  const auto e = nd::top_eigenpairs(hvp, like, 2, nd::EigenOptions{5000, 1e-15, 9});
  ASSERT_EQ(e.size(), 2u);
  EXPECT_NEAR(e[0].eigenvalue, 5.0, 1e-9);
  EXPECT_NEAR(e[1].eigenvalue, -3.0, 1e-9);
  EXPECT_NEAR(dot(e[0].vector, e[0].vector), 1.0, 1e-12);
  EXPECT_NEAR(dot(e[1].vector, e[1].vector), 1.0, 1e-12);
  EXPECT_NEAR(dot(e[0].vector, e[1].vector), 0.0, 1e-12);
  for (int k = 0; k < 2; ++k) {
    const auto hv = hvp(e[k].vector);
    EXPECT_LT((hv[0] - e[k].eigenvalue * e[k].vector[0]).abs().max().item<double>(), 1e-6) << k;
  }
  // k = 1 is the dominant-eigenvalue iteration of the search's curvature log.
  auto net = tiny_net(false);
  const auto b = tiny_batch();
  const auto dom = nd::hessian_dominant_eigenvalue(net, b, nd::EigenOptions{30, 1e-3, 5});
  const auto top = nd::top_eigenpairs(nd::alpha_hvp_on_batch(net, b), net->arch_parameters(), 2, nd::EigenOptions{30, 1e-3, 5});
  EXPECT_EQ(dom.eigenvalue, top[0].eigenvalue);
  EXPECT_EQ(dom.iterations, top[0].iterations);
  EXPECT_NEAR(dot(top[0].vector, top[1].vector), 0.0, 1e-12);
  EXPECT_LE(std::abs(top[1].eigenvalue), std::abs(top[0].eigenvalue) * 1.05);
}

TEST(Landscape, CommandWritesTheGridComparesTwoRunsAndTheReportEmbedsIt) {
  const auto a = fresh_dir("land_a"), b = fresh_dir("land_b");
  for (const auto& [d, seed] : {std::pair{a, 1}, std::pair{b, 2}}) {
    const auto r = run_cli(std::string("search -q ") + kTinySearch + " --threads 1 --seed " + std::to_string(seed) +
                           " --out " + d.string());
    ASSERT_EQ(r.code, 0) << r.out;
  }
  // The grid must be odd (its centre is the checkpoint's alphas).
  auto r = run_cli("landscape -q --checkpoint " + a.string() + " --grid 4");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.err.find("odd"), std::string::npos) << r.err;

  r = run_cli("landscape -q --checkpoint " + a.string() + " --grid 5 --span 0.5 --batches 2 --threads 1");
  ASSERT_EQ(r.code, 0) << r.out;
  const json j = json::parse(slurp((a / "landscape" / "landscape.json").string()));
  ASSERT_EQ(j["panels"].size(), 1u);
  const auto& p = j["panels"][0];
  EXPECT_EQ(p["grid"], 5);
  EXPECT_EQ(p["directions"], "random");
  EXPECT_EQ(p["batches"], 2);
  ASSERT_EQ(p["loss"].size(), 5u);
  double lo = 1e300;
  for (const auto& row : p["loss"]) {
    ASSERT_EQ(row.size(), 5u);
    for (const auto& x : row) lo = std::min(lo, x.get<double>());
  }
  EXPECT_EQ(p["center_loss"], p["loss"][2][2]);
  EXPECT_EQ(p["min"]["loss"].get<double>(), lo);
  EXPECT_EQ(p["coords"][0].get<double>(), -0.5);
  EXPECT_EQ(p["epoch"], 2);
  const std::string svg = slurp((a / "landscape" / "landscape.svg").string());
  EXPECT_NE(svg.find("class=\"minimum\""), std::string::npos);
  EXPECT_NE(svg.find("class=\"contours\""), std::string::npos);
  // The same seed gives the same grid (a fixed function of the checkpoint).
  r = run_cli("landscape -q --checkpoint " + a.string() + " --grid 5 --span 0.5 --batches 2 --threads 1 --out " + (a / "again").string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(json::parse(slurp((a / "again" / "landscape.json").string()))["panels"][0]["loss"], p["loss"]);

  // Two runs, one colour scale; Hessian directions carry their eigenvalues, largest first.
  r = run_cli("landscape -q --checkpoint " + a.string() + " --compare " + b.string() +
              " --grid 3 --directions hessian --hessian-iters 10 --threads 1 --out " + (a / "cmp").string());
  ASSERT_EQ(r.code, 0) << r.out;
  const json c = json::parse(slurp((a / "cmp" / "landscape.json").string()));
  ASSERT_EQ(c["panels"].size(), 2u);
  for (const auto& q : c["panels"]) {
    ASSERT_EQ(q["eigenvalues"].size(), 2u);
    EXPECT_GE(std::abs(q["eigenvalues"][0].get<double>()) * 1.05, std::abs(q["eigenvalues"][1].get<double>()));
  }
  const std::string csvg = slurp((a / "cmp" / "landscape.svg").string());
  size_t panels = 0;
  for (size_t at = csvg.find("class=\"panel\""); at != std::string::npos; at = csvg.find("class=\"panel\"", at + 1)) ++panels;
  EXPECT_EQ(panels, 2u);

  r = run_cli("report " + a.string());
  ASSERT_EQ(r.code, 0) << r.out;
  const std::string html = slurp((a / "report.html").string());
  EXPECT_NE(html.find("id=\"landscape\""), std::string::npos);
  EXPECT_NE(html.find("class=\"minimum\""), std::string::npos);
  fs::remove_all(a);
  fs::remove_all(b);
}

namespace {

/// Checks every row of a finished study against its run directory's own files.
void expect_rows_match_runs(const fs::path& dir, size_t n_runs) {
  const json study = json::parse(slurp((dir / "study.json").string()));
  ASSERT_EQ(study["rows"].size(), n_runs);
  std::ifstream csv(dir / "study.csv");
  std::string header;
  std::getline(csv, header);
  size_t csv_rows = 0;
  for (std::string line; std::getline(csv, line);) ++csv_rows;
  EXPECT_EQ(csv_rows, n_runs);
  for (const auto& row : study["rows"]) {
    const fs::path run = dir / "runs" / row["run"].get<std::string>();
    const auto m = read_jsonl(run / "metrics.jsonl");
    ASSERT_EQ(m.size(), 2u) << run;
    EXPECT_EQ(row["epochs"], 2);
    EXPECT_EQ(row["skip_normal"], m.back()["skip_normal"]);
    EXPECT_EQ(row["skip_reduce"], m.back()["skip_reduce"]);
    EXPECT_EQ(row["search_seconds"].get<double>(), m[0]["seconds"].get<double>() + m[1]["seconds"].get<double>());
    EXPECT_EQ(json::parse(slurp((run / "config.json").string()))["seed"], row["seed"]);
    std::string g = slurp((run / "genotype.txt").string());
    EXPECT_EQ(row["genotype"], g.substr(0, g.find('\n')));
    double skip = 0;
    const auto& prims = m.back()["primitives"];
    const size_t k = static_cast<size_t>(std::find(prims.begin(), prims.end(), "skip_connect") - prims.begin());
    for (const auto& e : m.back()["alphas_normal"]) skip += e[k].get<double>();
    EXPECT_NEAR(row["skip_weight_normal"].get<double>(), skip / m.back()["alphas_normal"].size(), 1e-15);
  }
}

}  // namespace

TEST(Study, ATwoByTwoGridWritesFourRunsWhoseRowsEqualTheirOwnMetrics) {
  const auto d = fresh_dir("study");
  auto r = run_cli("study --out " + d.string() + " --seeds 1,2 --vary arch-lr=3e-4,3e-3 --threads 1 --train-epochs 1 "
                   "--train-args '--subset 64 --channels 4 --layers 2 --batch-size 16' -- " + kTinySearch);
  ASSERT_EQ(r.code, 0) << r.out;
  for (const char* n : {"arch-lr-3e-4_seed-1", "arch-lr-3e-4_seed-2", "arch-lr-3e-3_seed-1", "arch-lr-3e-3_seed-2"}) {
    EXPECT_TRUE(fs::exists(d / "runs" / n / "summary.txt")) << n;
    const json cfg = json::parse(slurp((d / "runs" / n / "config.json").string()));
    EXPECT_EQ(cfg["arch_lr"].get<double>(), std::string(n).find("3e-3") != std::string::npos ? 3e-3 : 3e-4) << n;
    const json res = json::parse(slurp((d / "runs" / n / "retrain" / "result.json").string()));
    EXPECT_EQ(res["epochs"], 1);
  }
  expect_rows_match_runs(d, 4);
  const json study = json::parse(slurp((d / "study.json").string()));
  for (const auto& row : study["rows"]) {
    EXPECT_EQ(row["status"], "retrained");
    const json res = json::parse(slurp((d / "runs" / row["run"].get<std::string>() / "retrain" / "result.json").string()));
    EXPECT_EQ(row["retrain_test_top1"], res["test_top1"]);
  }
  // Per setting: the mean over its two seeds.
  ASSERT_EQ(study["settings"].size(), 2u);
  for (const auto& s : study["settings"]) {
    double sum = 0;
    for (const auto& row : study["rows"])
      if (row["setting"] == s["setting"]) sum += row["skip_normal"].get<double>();
    EXPECT_DOUBLE_EQ(s["skip_normal"]["mean"].get<double>(), sum / 2) << s["setting"];
  }
  const std::string html = slurp((d / "report.html").string());
  EXPECT_NE(html.find("arch-lr=3e-3"), std::string::npos);
  EXPECT_NE(html.find("data-stat=\"mean\""), std::string::npos);

  // A finished study run again redoes nothing; another grid on the same directory is refused.
  const auto before = fs::last_write_time(d / "runs" / "arch-lr-3e-4_seed-1" / "metrics.jsonl");
  r = run_cli("study --out " + d.string() + " --seeds 1,2 --vary arch-lr=3e-4,3e-3 --threads 1 --train-epochs 1 "
              "--train-args '--subset 64 --channels 4 --layers 2 --batch-size 16' -- " + kTinySearch);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.err.find("4 of 4 runs already finished"), std::string::npos) << r.err;
  EXPECT_EQ(fs::last_write_time(d / "runs" / "arch-lr-3e-4_seed-1" / "metrics.jsonl"), before);
  r = run_cli("study --out " + d.string() + " --seeds 1,3 --vary arch-lr=3e-4,3e-3 --threads 1 -- " + kTinySearch);
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.err.find("holds another study"), std::string::npos) << r.err;
  fs::remove_all(d);
}

TEST(Study, BadGridsAreRefusedBeforeAnythingRuns) {
  const auto d = fresh_dir("study_bad");
  const std::string tiny = kTinySearch;
  const std::pair<std::string, std::string> cases[] = {
      {"--seeds 1,x -- " + tiny, "--seeds"},
      {"--seeds 1 --vary arch-lr -- " + tiny, "KEY=V1,V2"},
      {"--seeds 1 --vary seed=1,2 -- " + tiny, "seeds go in --seeds"},
      {"--seeds 1 --vary arch-lr=1,2 -- " + tiny + " --arch-lr 3", "both varied"},
      {"--seeds 1 -- " + tiny + " --out x", "the study sets it"},
      {"--seeds 1 --vary no-such-flag=1,2 -- " + tiny, "setting no-such-flag=1"},
  };
  for (const auto& [args, message] : cases) {
    const auto r = run_cli("study --out " + d.string() + " " + args);
    EXPECT_NE(r.code, 0) << args;
    EXPECT_NE(r.err.find(message), std::string::npos) << args << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    // Nothing was written: a corrected command line starts the study afresh.
    EXPECT_FALSE(fs::exists(d / "study-spec.json")) << args;
  }
  fs::remove_all(d);
}

TEST(Study, AnInterruptedStudyResumesWithoutRedoingFinishedRuns) {
  const auto ref = fresh_dir("study_ref"), cut = fresh_dir("study_cut");
  const std::string grid = " --seeds 1,2 --threads 1 -- " + std::string(kTinySearch) + " --checkpoint-every 1e-9 --keep-checkpoints 100";
  auto r = run_cli("study --out " + ref.string() + grid);
  ASSERT_EQ(r.code, 0) << r.out;
  // The state an interruption leaves: seed 1 finished, seed 2 stopped after step 1 of epoch 1.
  fs::create_directories(cut / "runs" / "seed-2" / "checkpoints");
  fs::copy_file(ref / "study-spec.json", cut / "study-spec.json");
  fs::copy(ref / "runs" / "seed-1", cut / "runs" / "seed-1", fs::copy_options::recursive);
  fs::copy_file(ref / "runs" / "seed-2" / "config.json", cut / "runs" / "seed-2" / "config.json");
  const std::string mid = "search-e0000-s000001.pt";  // 2 steps per epoch
  ASSERT_TRUE(fs::exists(ref / "runs" / "seed-2" / "checkpoints" / mid));
  fs::copy_file(ref / "runs" / "seed-2" / "checkpoints" / mid, cut / "runs" / "seed-2" / "checkpoints" / mid);
  std::ofstream(cut / "runs" / "seed-2" / "checkpoints" / "latest") << mid << "\n";
  const auto finished_before = fs::last_write_time(cut / "runs" / "seed-1" / "metrics.jsonl");

  r = run_cli("study --out " + cut.string() + grid);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.err.find("1 of 2 runs already finished"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("seed-2: search resumed"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("seed-1: search"), std::string::npos) << r.err;
  EXPECT_EQ(fs::last_write_time(cut / "runs" / "seed-1" / "metrics.jsonl"), finished_before);
  EXPECT_FALSE(fs::exists(cut / "logs" / "seed-1.search.log"));
  // The resumed run ends where the uninterrupted one did.
  auto strip = [](std::vector<json> m) {
    for (auto& e : m) e.erase("seconds"), e.erase("images_per_sec");
    return m;
  };
  EXPECT_EQ(strip(read_jsonl(cut / "runs" / "seed-2" / "metrics.jsonl")), strip(read_jsonl(ref / "runs" / "seed-2" / "metrics.jsonl")));
  EXPECT_EQ(slurp((cut / "runs" / "seed-2" / "genotype.json").string()), slurp((ref / "runs" / "seed-2" / "genotype.json").string()));
  expect_rows_match_runs(cut, 2);
  fs::remove_all(ref);
  fs::remove_all(cut);
}

TEST(Study, SigtermStopsTheRunningSearchResumablyAndTheRerunFinishes) {
  const auto d = fresh_dir("study_term");
  // 4 steps per epoch, 3 epochs: the signal arrives well before the first search ends.
  const std::string args = "study --out " + d.string() +
                           " --seeds 1,2 --threads 1 -- --dataset synthetic --subset 128 --batch-size 16 --channels 4 "
                           "--layers 3 --epochs 3 --eval-valid false --checkpoint-every 1e-9";
  const std::string pidfile = (d.string() + ".pid");
  const std::string cmd = nd::test::cli_path() + " " + args + " >/dev/null 2>&1 & echo $! > " + pidfile + "; wait $!; echo $? > " + pidfile + ".rc";
  std::thread bg([&] { nd::test::run_command(cmd); });
  // Wait until the first search has written a step checkpoint, then ask the study to stop.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(d / "runs" / "seed-1" / "checkpoints" / "latest") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const pid_t pid = std::stoi(slurp(pidfile));
  ::kill(pid, SIGTERM);
  bg.join();
  EXPECT_EQ(std::stoi(slurp(pidfile + ".rc")), 9);
  EXPECT_FALSE(fs::exists(d / "runs" / "seed-2" / "config.json"));  // the next run never started
  EXPECT_FALSE(fs::exists(d / "runs" / "seed-1" / "summary.txt"));
  const auto r = run_cli(args);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.err.find("seed-1: search resumed"), std::string::npos) << r.err;
  for (const char* n : {"seed-1", "seed-2"}) EXPECT_EQ(read_jsonl(d / "runs" / n / "metrics.jsonl").size(), 3u) << n;
  fs::remove_all(d);
  fs::remove(pidfile);
  fs::remove(pidfile + ".rc");
}
