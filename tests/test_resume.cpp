// Never lose a search (SPEC 8): SIGKILL + resume is bitwise identical to an uninterrupted run;
// divergence stops cleanly; hostile input gets one line, a documented exit code and no output;
// damaged checkpoint archives are refused by our own ZIP check before LibTorch reads them.
#include <gtest/gtest.h>
#include <zlib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "cli_helpers.h"
#include "noisydarts/checkpoint.h"
#include "noisydarts/error.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::string kSmallSearch =
    "search --dataset synthetic --channels 4 --layers 3 --batch-size 16 --subset 256 "
    "--threads 1 --seed 11 -q";

using noisydarts::test::slurp;

int run(const std::string& args, std::string* output = nullptr) {
  const auto r = noisydarts::test::run_cli(args);
  if (output) *output = r.out;
  return r.code;
}

fs::path fresh(const std::string& name) {
  auto d = fs::temp_directory_path() / ("noisydarts_resume_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  return d;
}

// metrics.jsonl without the wall-clock fields, which legitimately differ.
std::vector<json> metrics_without_timings(const fs::path& run) {
  std::vector<json> out;
  std::ifstream f(run / "metrics.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    auto j = json::parse(line);
    j.erase("seconds");
    j.erase("images_per_sec");
    out.push_back(j);
  }
  return out;
}

// Splits "a b c" into argv for execv.
std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream is(s);
  std::string w;
  while (is >> w) out.push_back(w);
  return out;
}

}  // namespace

TEST(Resume, SigkillAfterTheFirstCheckpointThenResumeIsBitwiseIdentical) {
  const auto ref = fresh("ref"), killed = fresh("killed");
  ASSERT_EQ(run(kSmallSearch + " --epochs 3 --out " + ref.string()), 0);

  // Start the same search as a child process, checkpointing after every step.
  auto args = split(kSmallSearch + " --epochs 3 --checkpoint-every 0.00001 --out " + killed.string());
  args.insert(args.begin(), NOISYDARTS_CLI);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  // Wait for the first mid-epoch checkpoint, let it run a little further, then SIGKILL it.
  const auto latest = killed / "checkpoints" / "latest";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(latest) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(fs::exists(latest)) << "no checkpoint appeared";
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the search finished before it could be killed";
  EXPECT_FALSE(fs::exists(killed / "genotype.json"));

  // The killed run's lock (an fcntl lock on .lock) died with it.
  EXPECT_TRUE(fs::exists(killed / ".lock"));
  std::string out;
  ASSERT_EQ(run("search --resume -q --out " + killed.string(), &out), 0) << out;
  EXPECT_EQ(slurp(ref / "genotype.json"), slurp(killed / "genotype.json"));
  EXPECT_EQ(slurp(ref / "genotype.txt"), slurp(killed / "genotype.txt"));
  // Alphas (as softmax tables, printed with round-trip precision), losses and accuracies of
  // every epoch are bitwise equal.
  const auto a = metrics_without_timings(ref), b = metrics_without_timings(killed);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "epoch " << i + 1;
  fs::remove_all(ref);
  fs::remove_all(killed);
}

TEST(Resume, ResumeWithoutACheckpointIsACheckpointError) {
  const auto d = fresh("none");
  std::string out;
  EXPECT_EQ(run("search --resume -q --out " + d.string(), &out), 5);
  EXPECT_NE(out.find("no checkpoint"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
}

TEST(Resume, ANewSearchRefusesToOverwriteAnExistingRun) {
  const auto d = fresh("twice");
  ASSERT_EQ(run(kSmallSearch + " --epochs 1 --max-steps 1 --out " + d.string()), 0);
  const auto before = slurp(d / "genotype.json");
  std::string out;
  EXPECT_EQ(run(kSmallSearch + " --epochs 1 --max-steps 1 --out " + d.string(), &out), 2);
  EXPECT_NE(out.find("--resume"), std::string::npos) << out;
  EXPECT_EQ(slurp(d / "genotype.json"), before);
  fs::remove_all(d);
}

TEST(Resume, ATruncatedNewestCheckpointFallsBackToThePreviousOne) {
  const auto ref = fresh("fallback_ref"), d = fresh("fallback");
  ASSERT_EQ(run(kSmallSearch + " --epochs 3 --max-steps 2 --out " + ref.string()), 0);
  ASSERT_EQ(run(kSmallSearch + " --epochs 3 --max-steps 2 --keep-checkpoints 3 --out " + d.string()), 0);
  // Keep the run directory as it was after epoch 2: newest checkpoint e0002 truncated to half.
  fs::remove(d / "checkpoints" / "search-e0003-s000000.pt");
  fs::remove(d / "genotype.json");
  const auto newest = d / "checkpoints" / "search-e0002-s000000.pt";
  ASSERT_TRUE(fs::exists(newest));
  { std::ofstream(d / "checkpoints" / "latest") << "search-e0002-s000000.pt\n"; }
  fs::resize_file(newest, fs::file_size(newest) / 2);
  const auto r = noisydarts::test::run_cli("search --resume " + d.string());
  ASSERT_EQ(r.code, 0) << r.out;
  // One line says which checkpoint was skipped and which one the run continued from.
  EXPECT_NE(r.err.find("warning: newest checkpoint search-e0002-s000000.pt unreadable"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("resuming from search-e0001-s000000.pt instead"), std::string::npos) << r.err;
  EXPECT_EQ(slurp(ref / "genotype.json"), slurp(d / "genotype.json"));
  EXPECT_EQ(metrics_without_timings(ref), metrics_without_timings(d));
  fs::remove_all(ref);
  fs::remove_all(d);
}

TEST(Resume, WhenNoCheckpointLoadsResumeFailsWithOneLineAndExit5) {
  const auto d = fresh("damaged");
  ASSERT_EQ(run(kSmallSearch + " --epochs 2 --max-steps 1 --out " + d.string()), 0);
  const auto latest = d / "checkpoints" / slurp(d / "checkpoints" / "latest").substr(0, 23);
  ASSERT_TRUE(fs::exists(latest)) << latest;
  for (const auto& e : fs::directory_iterator(d / "checkpoints"))
    if (e.path().extension() == ".pt") std::ofstream(e.path(), std::ios::binary | std::ios::trunc) << "garbage";
  std::string out;
  EXPECT_EQ(run("search --resume -q --out " + d.string(), &out), 5);
  EXPECT_NE(out.find(latest.string()), std::string::npos) << out;
  EXPECT_NE(out.find("no older checkpoint"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  fs::remove_all(d);
}

namespace {
// Starts the CLI with `args` as a child process (stdout/stderr to `log`); returns its pid.
pid_t spawn(const std::string& args, const fs::path& log) {
  auto v = split(args);
  v.insert(v.begin(), noisydarts::test::cli_path());
  std::vector<char*> argv;
  for (auto& a : v) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    FILE* f = std::fopen(log.c_str(), "w");
    if (f) {
      ::dup2(::fileno(f), 1);
      ::dup2(::fileno(f), 2);
    }
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  return pid;
}

bool wait_for(const fs::path& p, int seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (!fs::exists(p) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  return fs::exists(p);
}

int wait_exit(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
}  // namespace

TEST(Stop, SigtermMidRunCheckpointsExits9AndResumeDirIsBitwiseIdentical) {
  const auto ref = fresh("term_ref"), d = fresh("term"), log = fresh("term_log");
  ASSERT_EQ(run(kSmallSearch + " --epochs 6 --out " + ref.string()), 0);
  const pid_t pid = spawn(kSmallSearch + " --epochs 6 --out " + d.string(), log);
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(wait_for(d / "checkpoints" / "latest", 120)) << "no checkpoint appeared";
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  ::kill(pid, SIGTERM);
  const int code = wait_exit(pid);
  const std::string said = slurp(log);
  ASSERT_EQ(code, 9) << said;
  EXPECT_FALSE(fs::exists(d / "genotype.json"));
  // One line: what happened and the command that continues the run.
  EXPECT_NE(said.find("stopped by SIGTERM"), std::string::npos) << said;
  EXPECT_NE(said.find("noisydarts search --resume " + d.string()), std::string::npos) << said;
  EXPECT_EQ(std::count(said.begin(), said.end(), '\n'), 1) << said;

  std::string out;
  ASSERT_EQ(run("search -q --resume " + d.string(), &out), 0) << out;
  EXPECT_EQ(slurp(ref / "genotype.json"), slurp(d / "genotype.json"));
  const auto a = metrics_without_timings(ref), b = metrics_without_timings(d);
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "epoch " << i + 1;  // alphas included
  fs::remove_all(ref);
  fs::remove_all(d);
  fs::remove(log);
}

TEST(Stop, MethodsWithStateResumeBitwiseAfterSigterm) {
  // gdas (temperature, Gumbel draws) and darts-minus (auxiliary-skip coefficient): a run stopped
  // mid-epoch and resumed ends where the uninterrupted one did.
  for (const std::string method : {"gdas", "darts-minus"}) {
    const std::string args = kSmallSearch + " --method " + method + " --epochs 3 --checkpoint-every 0.00001";
    const auto ref = fresh("m_ref"), d = fresh("m_term"), log = fresh("m_log");
    ASSERT_EQ(run(args + " --out " + ref.string()), 0) << method;
    const pid_t pid = spawn(args + " --out " + d.string(), log);
    ASSERT_GT(pid, 0);
    ASSERT_TRUE(wait_for(d / "checkpoints" / "latest", 120)) << "no checkpoint appeared";
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    ::kill(pid, SIGTERM);
    ASSERT_EQ(wait_exit(pid), 9) << slurp(log);
    std::string out;
    ASSERT_EQ(run("search -q --resume " + d.string(), &out), 0) << out;
    EXPECT_EQ(slurp(ref / "genotype.json"), slurp(d / "genotype.json")) << method;
    const auto a = metrics_without_timings(ref), b = metrics_without_timings(d);
    ASSERT_EQ(a.size(), 3u);
    ASSERT_EQ(b.size(), 3u);
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << method << " epoch " << i + 1;  // alphas, tau / beta
    EXPECT_TRUE(a.back().contains(method == "gdas" ? "gdas_tau" : "dminus_beta"));
    fs::remove_all(ref);
    fs::remove_all(d);
    fs::remove(log);
  }
}

TEST(Stop, SigtermDuringTrainingCheckpointsExits9AndResumeEqualsTheUninterruptedRun) {
  const std::string train = "train --dataset synthetic --genotype DARTS_V2 --channels 4 --layers 3 --batch-size 16 "
                            "--subset 320 --epochs 4 --threads 1 --seed 5 -q --auxiliary false";
  const auto ref = fresh("tterm_ref"), d = fresh("tterm"), log = fresh("tterm_log");
  ASSERT_EQ(run(train + " --out " + ref.string()), 0);
  const pid_t pid = spawn(train + " --out " + d.string(), log);
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(wait_for(d / "checkpoint.pt", 120)) << "no checkpoint appeared";
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ::kill(pid, SIGTERM);
  const int code = wait_exit(pid);
  const std::string said = slurp(log);
  ASSERT_EQ(code, 9) << said;
  EXPECT_NE(said.find("noisydarts train --resume " + d.string()), std::string::npos) << said;
  EXPECT_FALSE(fs::exists(d / "result.json"));
  std::string out;
  ASSERT_EQ(run("train -q --resume " + d.string(), &out), 0) << out;
  auto strip = [](std::vector<json> v) {
    for (auto& j : v) j.erase("train_seconds");
    return v;
  };
  EXPECT_EQ(strip(metrics_without_timings(ref)), strip(metrics_without_timings(d)));
  auto ra = json::parse(slurp(ref / "result.json")), rb = json::parse(slurp(d / "result.json"));
  ra.erase("train_seconds");
  rb.erase("train_seconds");
  EXPECT_EQ(ra, rb);
  // eval still reads checkpoint.pt and best.pt.
  EXPECT_EQ(run("eval --checkpoint " + (d / "best.pt").string() + " --threads 1"), 0);
  EXPECT_EQ(run("eval --checkpoint " + (d / "checkpoint.pt").string() + " --threads 1"), 0);
  fs::remove_all(ref);
  fs::remove_all(d);
  fs::remove(log);
}

TEST(Lock, ASecondRunOnALiveRunDirectoryIsRefusedAndTheFirstFinishesUntouched) {
  const auto ref = fresh("lock_ref"), d = fresh("lock"), log = fresh("lock_log");
  ASSERT_EQ(run(kSmallSearch + " --epochs 4 --out " + ref.string()), 0);
  const pid_t pid = spawn(kSmallSearch + " --epochs 4 --out " + d.string(), log);
  ASSERT_GT(pid, 0);
  ASSERT_TRUE(wait_for(d / "config.json", 120));
  for (const std::string& second : {kSmallSearch + " --epochs 4 --out " + d.string(), "search -q --resume " + d.string()}) {
    const auto r = noisydarts::test::run_cli(second);
    EXPECT_EQ(r.code, 2) << second << ": " << r.out;
    EXPECT_NE(r.err.find("is in use by process " + std::to_string(pid)), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  ASSERT_EQ(wait_exit(pid), 0) << slurp(log);
  EXPECT_EQ(slurp(ref / "genotype.json"), slurp(d / "genotype.json"));
  EXPECT_EQ(metrics_without_timings(ref), metrics_without_timings(d));
  fs::remove_all(ref);
  fs::remove_all(d);
  fs::remove(log);
}

TEST(Cli, OutOfRangeIntegersAreRefusedNamingTheFlag) {
  const auto d = fresh("range");
  for (const std::string& bad : {"--threads 4294967297", "--seed -1", "--keep-checkpoints 4294967298", "--workers 2147483648"}) {
    const auto r = noisydarts::test::run_cli(kSmallSearch + " " + bad + " --out " + d.string());
    EXPECT_EQ(r.code, 2) << bad << ": " << r.out;
    EXPECT_NE(r.err.find(bad.substr(0, bad.find(' '))), std::string::npos) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  for (const std::string& bad : {"--threads 4294967297", "--seed -1"}) {
    const auto r = noisydarts::test::run_cli("train --dataset synthetic " + bad + " --out " + d.string());
    EXPECT_EQ(r.code, 2) << bad << ": " << r.out;
    EXPECT_NE(r.err.find(bad.substr(0, bad.find(' '))), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(d));
}

TEST(Divergence, ANanLossStopsWithEpochAndStepAndExitCode7) {
  const auto d = fresh("nan");
  std::string out;
  const int code = run(kSmallSearch + " --epochs 2 --lr 1e30 --grad-clip 1e30 --out " + d.string(), &out);
  EXPECT_EQ(code, 7) << out;
  EXPECT_NE(out.find("epoch"), std::string::npos) << out;
  EXPECT_NE(out.find("step"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  EXPECT_FALSE(fs::exists(d / "genotype.json"));
  fs::remove_all(d);
}

// ---- Stateful parts: each one's save/load round trip through a checkpoint file.
#include "noisydarts/checkpoint.h"
#include "noisydarts/engine.h"
#include "noisydarts/error.h"

namespace {
namespace nd = noisydarts;

nd::Dataset tiny_dataset(int64_t n) {
  nd::Dataset d;
  d.images = (torch::arange(n * 4, torch::kLong) % 256).to(torch::kUInt8).reshape({n, 1, 2, 2});
  d.labels = torch::arange(n, torch::kLong) % 3;
  d.num_classes = 3;
  d.mean = {0.0};
  d.std = {1.0};
  return d;
}

bool same(const torch::Tensor& a, const torch::Tensor& b) { return a.sizes() == b.sizes() && torch::equal(a, b); }
}  // namespace

TEST(Stateful, EveryPartRoundTripsThroughACheckpoint) {
  const auto dir = fresh("stateful");
  fs::create_directories(dir);
  const std::string file = (dir / "c.pt").string();
  torch::manual_seed(3);
  torch::nn::Linear lin(3, 2), lin2(3, 2);
  auto params = lin->parameters(), params2 = lin2->parameters();
  torch::optim::SGD sgd(params, torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD sgd2(params2, torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::Adam adam(params, torch::optim::AdamOptions(0.01));
  torch::optim::Adam adam2(params2, torch::optim::AdamOptions(0.01));
  for (int i = 0; i < 2; ++i) {  // optimiser state worth saving
    sgd.zero_grad();
    adam.zero_grad();
    lin->forward(torch::randn({4, 3})).sum().backward();
    sgd.step();
    adam.step();
  }
  const nd::Dataset data = tiny_dataset(40);
  std::vector<int64_t> idx(40);
  for (int64_t i = 0; i < 40; ++i) idx[static_cast<size_t>(i)] = i;
  nd::BatchStream::Options so;
  so.batch_size = 4;
  nd::BatchStream s1(data, idx, so), s2(data, idx, so);
  s1.seek({3, 7});
  nd::LoopPosition pos, pos2;
  pos.epoch = 4;
  pos.step = 6;
  nd::MetricsLog log, log2;
  log.epochs = {json{{"epoch", 1}, {"seconds", 2.5}}, json{{"epoch", 2}, {"seconds", 1.0}}};
  json blob = {{"a", 1}}, blob2;

  nd::Checkpoint a("search", [] { return json{{"k", 1}}; });
  a.add(std::make_unique<nd::ModuleState>(*lin, "model"))
      .add(std::make_unique<nd::SgdState>(sgd, params, "weight_optimizer"))
      .add(std::make_unique<nd::AdamState>(adam, params, "arch_optimizer"))
      .add(std::make_unique<nd::StreamState>(s1, "train"))
      .add(std::make_unique<nd::RngState>())
      .add(pos)
      .add(std::make_unique<nd::JsonState>("blob", [&] { return blob; }, [&](const json& j) { blob = j; }))
      .add(log.state());
  a.save(file);
  const torch::Tensor rng_saved = nd::get_cpu_rng_state().clone();
  torch::randn({100});  // move the generator on

  nd::Checkpoint b("search", [] { return json{{"k", 1}}; });
  b.add(std::make_unique<nd::ModuleState>(*lin2, "model"))
      .add(std::make_unique<nd::SgdState>(sgd2, params2, "weight_optimizer"))
      .add(std::make_unique<nd::AdamState>(adam2, params2, "arch_optimizer"))
      .add(std::make_unique<nd::StreamState>(s2, "train"))
      .add(std::make_unique<nd::RngState>())
      .add(pos2)
      .add(std::make_unique<nd::JsonState>("blob", [&] { return blob2; }, [&](const json& j) { blob2 = j; }))
      .add(log2.state());
  b.load(file);
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(same(params[i], params2[i])) << i;
  const auto m1 = nd::sgd_momentum_buffers(sgd, params), m2 = nd::sgd_momentum_buffers(sgd2, params2);
  for (size_t i = 0; i < m1.size(); ++i) EXPECT_TRUE(same(m1[i], m2[i])) << i;
  for (size_t i = 0; i < params.size(); ++i) {
    auto& x = static_cast<torch::optim::AdamParamState&>(*adam.state().at(c10::guts::to_string(params[i].unsafeGetTensorImpl())));
    auto& y = static_cast<torch::optim::AdamParamState&>(*adam2.state().at(c10::guts::to_string(params2[i].unsafeGetTensorImpl())));
    EXPECT_EQ(x.step(), y.step());
    EXPECT_TRUE(same(x.exp_avg(), y.exp_avg()));
    EXPECT_TRUE(same(x.exp_avg_sq(), y.exp_avg_sq()));
  }
  EXPECT_EQ(s2.position().pass, 3);
  EXPECT_EQ(s2.position().batch, 7);
  EXPECT_TRUE(same(s1.next().x, s2.next().x));
  EXPECT_TRUE(same(nd::get_cpu_rng_state(), rng_saved));
  EXPECT_EQ(pos2.epoch, 4);
  EXPECT_EQ(pos2.step, 6);
  EXPECT_EQ(blob2, blob);
  EXPECT_EQ(log2.epochs, log.epochs);
  EXPECT_DOUBLE_EQ(log2.sum("seconds"), 3.5);

  // The kind is checked, and a part missing from the file is a CheckpointError naming it.
  nd::Checkpoint wrong_kind("train", [] { return json::object(); });
  EXPECT_THROW(wrong_kind.load(file), nd::CheckpointError);
  nd::Checkpoint missing("search", [] { return json::object(); });
  missing.add(std::make_unique<nd::JsonState>("absent", [] { return json(); }, [](const json&) {}));
  try {
    missing.load(file);
    ADD_FAILURE() << "a missing part loaded";
  } catch (const nd::CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

TEST(Stateful, AStepFromAnotherWorldSizeResumesAtTheSameImageCount) {
  const auto dir = fresh("world");
  fs::create_directories(dir);
  const std::string file = (dir / "c.pt").string();
  nd::LoopPosition two;
  two.world = 2;
  two.epoch = 1;
  two.step = 5;
  nd::Checkpoint a("search", [] { return json::object(); });
  a.add(two);
  a.save(file);
  nd::LoopPosition one;  // world 1: twice the steps
  one.steps_per_epoch = 8;
  nd::Checkpoint b("search", [] { return json::object(); });
  b.add(one);
  b.load(file);
  EXPECT_EQ(one.epoch, 1);
  EXPECT_EQ(one.step, 8);  // 10 clamped to the epoch's 8 steps
  fs::remove_all(dir);
}

TEST(RunDirectoryLock, TheLockIsExclusiveAcrossProcessesAndReleasedWithTheProcess) {
  const auto dir = fresh("rdlock");
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {  // holds the lock until told to exit
    nd::RunDirectory rd(dir.string(), "search", true);
    rd.create_and_lock();
    char c = 1;
    (void)!::write(ready[1], &c, 1);
    (void)!::read(go[0], &c, 1);
    ::_exit(0);
  }
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  {
    nd::RunDirectory rd(dir.string(), "search", true);
    try {
      rd.lock();
      ADD_FAILURE() << "a second process got the lock";
    } catch (const nd::UsageError& e) {
      EXPECT_NE(std::string(e.what()).find("process " + std::to_string(pid)), std::string::npos) << e.what();
    }
    nd::RunDirectory reader(dir.string(), "search", false);  // a non-writer (rank > 0) never locks
    EXPECT_NO_THROW(reader.lock());
  }
  (void)!::write(go[1], &c, 1);
  ::waitpid(pid, nullptr, 0);
  nd::RunDirectory rd(dir.string(), "search", true);
  EXPECT_NO_THROW(rd.lock());
  fs::remove_all(dir);
}

// ---- Our own check of the checkpoint ZIP container (src/archive_check.cpp) --------------------

namespace {

namespace nd = noisydarts;

// A small archive of the checkpoint layout, written by LibTorch (OutputArchive::save_to).
std::string small_archive() {
  torch::serialize::OutputArchive a, m;
  nd::write_int(a, "format_version", nd::kCheckpointFormatVersion);
  nd::write_string(a, "kind", "search");
  m.write("w", torch::arange(12, torch::kFloat).reshape({3, 4}));
  a.write("model", m);
  a.write("rng_cpu", torch::arange(7, torch::kLong).to(torch::kUInt8), true);
  std::ostringstream ss;
  a.save_to(ss);
  return ss.str();
}

uint32_t get32(const std::string& z, size_t o) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(z[o + i]);
  return v;
}
uint16_t get16(const std::string& z, size_t o) {
  return static_cast<uint16_t>(static_cast<unsigned char>(z[o]) | (static_cast<unsigned char>(z[o + 1]) << 8));
}
void put32(std::string& z, size_t o, uint32_t v) {
  for (int i = 0; i < 4; ++i) z[o + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
void put16(std::string& z, size_t o, uint16_t v) {
  z[o] = static_cast<char>(v & 0xff);
  z[o + 1] = static_cast<char>(v >> 8);
}

// Where things are in an intact archive (written without a comment, so the end record is last).
struct Layout {
  size_t eocd = 0, locator = 0, end64 = 0, cd = 0;
  std::vector<size_t> central;  // offsets of the central entries
  std::map<std::string, size_t> by_name;  // name -> index in `central`
};
Layout layout(const std::string& z) {
  Layout l;
  l.eocd = z.size() - 22;
  EXPECT_EQ(get32(z, l.eocd), 0x06054b50u);
  l.locator = l.eocd - 20;
  EXPECT_EQ(get32(z, l.locator), 0x07064b50u);
  l.end64 = get32(z, l.locator + 8);
  EXPECT_EQ(get32(z, l.end64), 0x06064b50u);
  l.cd = get32(z, l.eocd + 16);
  size_t p = l.cd;
  for (int i = 0; i < get16(z, l.eocd + 10); ++i) {
    EXPECT_EQ(get32(z, p), 0x02014b50u);
    l.by_name[z.substr(p + 46, get16(z, p + 28))] = l.central.size();
    l.central.push_back(p);
    p += 46 + get16(z, p + 28) + get16(z, p + 30) + get16(z, p + 32);
  }
  return l;
}
size_t local_of(const std::string& z, size_t central) { return get32(z, central + 42); }
size_t data_of(const std::string& z, size_t central) {
  const size_t lh = local_of(z, central);
  return lh + 30 + get16(z, lh + 26) + get16(z, lh + 28);
}
// Renames record `i` (same length) in its central entry and its local header.
void rename_record(std::string& z, const Layout& l, size_t i, const std::string& name) {
  const size_t c = l.central[i];
  ASSERT_EQ(name.size(), get16(z, c + 28));
  z.replace(c + 46, name.size(), name);
  z.replace(local_of(z, c) + 30, name.size(), name);
}
// Replaces the content of record `i` (same length) and fixes its CRC-32.
void rewrite_record(std::string& z, const Layout& l, size_t i, const std::string& content) {
  const size_t c = l.central[i];
  ASSERT_EQ(content.size(), get32(z, c + 24));
  z.replace(data_of(z, c), content.size(), content);
  put32(z, c + 16, static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(content.data()),
                                               static_cast<uInt>(content.size()))));
}

const std::string kPrefix = "checkpoint X.pt is damaged or not a noisydarts checkpoint: ";

// Refused with one line "checkpoint X.pt is damaged ...: <reason>" whose reason holds `why`.
void expect_refused(const std::string& z, const std::string& why, const std::string& label) {
  try {
    nd::validate_checkpoint_bytes(z.data(), z.size(), "X.pt");
    ADD_FAILURE() << label << ": accepted";
  } catch (const nd::CheckpointError& e) {
    const std::string m = e.what();
    EXPECT_EQ(m.rfind(kPrefix, 0), 0u) << label << ": " << m;
    EXPECT_NE(m.find(why, kPrefix.size()), std::string::npos) << label << ": " << m;
    EXPECT_EQ(m.find('\n'), std::string::npos) << label << ": " << m;
    EXPECT_EQ(e.code(), nd::kExitCheckpoint);
  }
}

// LibTorch loads `z` and reads its header back.
std::string kind_of(const std::string& z) {
  torch::serialize::InputArchive a;
  a.load_from(z.data(), z.size());
  return nd::read_string(a, "kind");
}

}  // namespace

TEST(ArchiveCheck, AnIntactArchiveAndItsSaturatedZip64FormPassAndLoad) {
  const std::string z = small_archive();
  const Layout l = layout(z);
  ASSERT_EQ(l.central.size(), l.by_name.size());
  ASSERT_TRUE(l.by_name.count("archive/data.pkl"));
  ASSERT_TRUE(l.by_name.count("archive/version"));
  EXPECT_NO_THROW(nd::validate_checkpoint_bytes(z.data(), z.size(), "X.pt"));
  EXPECT_EQ(kind_of(z), "search");
  // The classic end record saturated (as for > 65535 records or > 4 GiB): the ZIP64 record's
  // values are used, and LibTorch reads it the same way.
  std::string s = z;
  put16(s, l.eocd + 8, 0xffff);
  put16(s, l.eocd + 10, 0xffff);
  put32(s, l.eocd + 12, 0xffffffff);
  put32(s, l.eocd + 16, 0xffffffff);
  EXPECT_NO_THROW(nd::validate_checkpoint_bytes(s.data(), s.size(), "X.pt"));
  EXPECT_EQ(kind_of(s), "search");
}

TEST(ArchiveCheck, TruncatedArchivesAreRefusedAtEveryCutPoint) {
  const std::string z = small_archive();
  const Layout l = layout(z);
  expect_refused("", "too short for a zip archive (0 bytes)", "empty");
  for (size_t cut : {size_t{1}, size_t{21}, size_t{100}, data_of(z, l.central[0]) + 3, l.cd, l.cd + 10, l.end64 + 5,
                     l.locator, l.eocd, z.size() - 1})
    expect_refused(z.substr(0, cut), cut < 22 ? "too short" : "no zip end-of-central-directory record",
                   "cut at " + std::to_string(cut));
}

TEST(ArchiveCheck, DamagedCentralDirectoryAndEndRecordsAreRefused) {
  const std::string z = small_archive();
  const Layout l = layout(z);
  const size_t pkl = l.by_name.at("archive/data.pkl");
  std::string s;

  s = z;
  s[l.central[1] + 1] ^= 0x20;  // signature of the second central entry
  expect_refused(s, "central directory entry #1 is missing or has a wrong signature", "signature");
  s = z;
  s[l.central[0] + 16] ^= 0x01;  // stored CRC-32
  expect_refused(s, "fails its CRC-32 check", "crc field");
  s = z;
  s[data_of(z, l.central[0]) + 2] ^= 0x01;  // a tensor's bytes: LibTorch alone would load them
  expect_refused(s, "fails its CRC-32 check", "tensor byte");
  s = z;
  put32(s, l.central[pkl] + 42, static_cast<uint32_t>(z.size() + 100));  // local header past the end
  expect_refused(s, "points to no local header", "offset past the end");
  s = z;
  put32(s, l.central[pkl] + 42, static_cast<uint32_t>(l.cd - 10));  // local header inside the directory's start
  expect_refused(s, "points to no local header", "offset at the directory");
  s = z;
  put32(s, l.central[pkl] + 20, 0x7fffffff);  // stored and original size far past the end
  put32(s, l.central[pkl] + 24, 0x7fffffff);
  expect_refused(s, "(2147483647 bytes) runs past the start of the central directory", "size past the end");
  s = z;
  put32(s, l.central[pkl] + 24, get32(z, l.central[pkl] + 24) + 1);
  expect_refused(s, "different stored and original sizes", "sizes");
  s = z;
  put16(s, l.central[pkl] + 10, 12);  // bzip2
  expect_refused(s, "uses compression method 12", "bzip2");
  s = z;
  put16(s, l.central[pkl] + 10, 8);  // says deflated, holds stored bytes
  put16(s, local_of(z, l.central[pkl]) + 8, 8);
  expect_refused(s, "does not inflate to its original size", "deflate claimed");
  s = z;
  put16(s, local_of(z, l.central[pkl]) + 8, 8);
  expect_refused(s, "local header has another compression method", "compressed local");
  s = z;
  put32(s, l.central[1] + 42, static_cast<uint32_t>(local_of(z, l.central[0])));  // two records, one place
  expect_refused(s, "local header names another record", "shared local header");
  s = z;
  put16(s, l.eocd + 10, static_cast<uint16_t>(get16(z, l.eocd + 10) + 1));
  put16(s, l.eocd + 8, static_cast<uint16_t>(get16(z, l.eocd + 8) + 1));
  expect_refused(s, "ZIP64 end record disagrees", "entry count");
  s = z;
  put32(s, l.eocd + 16, static_cast<uint32_t>(l.cd + 46));
  expect_refused(s, "ZIP64 end record disagrees", "directory offset");
  s = z;
  put32(s, l.locator + 8, static_cast<uint32_t>(z.size()));
  expect_refused(s, "locator points to no ZIP64 end record", "locator");
  s = z;
  s[l.locator] ^= 0x01;  // no locator: a classic archive, whose directory must end at the end record
  expect_refused(s, "does not end where the end record begins", "no locator");
  s = z;  // no locator and saturated fields
  s[l.locator] ^= 0x01;
  put32(s, l.eocd + 16, 0xffffffff);
  expect_refused(s, "ZIP64 sizes without a ZIP64 end record", "saturated without ZIP64");
  s = z;  // the same damage in both end records: the entry count exceeds the directory
  put16(s, l.eocd + 8, 0x7000);
  put16(s, l.eocd + 10, 0x7000);
  put32(s, l.end64 + 24, 0x7000);
  put32(s, l.end64 + 32, 0x7000);
  expect_refused(s, "more than its central directory holds", "count in both");
  s = z;
  put16(s, l.eocd + 20, 5);  // a comment length reaching past the end
  expect_refused(s, "no zip end-of-central-directory record", "comment");
}

TEST(ArchiveCheck, BadNamesAndMissingOrUnreadableRecordsAreRefused) {
  const std::string z = small_archive();
  const Layout l = layout(z);
  const size_t ver = l.by_name.at("archive/version"), pkl = l.by_name.at("archive/data.pkl");
  std::string s;

  s = z;
  rename_record(s, l, 1, "archivX" + s.substr(l.central[1] + 46 + 7, get16(z, l.central[1] + 28) - 7));
  expect_refused(s, "records are not all under one folder ('archive' and 'archivX')", "folder mix");
  s = z;
  rename_record(s, l, l.by_name.at("archive/data/0"), "archive/../a/0");
  expect_refused(s, "has an empty or '..' path component", "dot-dot");
  s = z;
  rename_record(s, l, l.by_name.at("archive/data/0"), "archive//ata/0");
  expect_refused(s, "has an empty or '..' path component", "empty component");
  s = z;
  rename_record(s, l, ver, "archive_version");
  expect_refused(s, "record #" + std::to_string(ver) + " (archive_version) is not a file inside a top-level folder",
                 "no folder");
  s = z;
  rename_record(s, l, l.by_name.at("archive/data/1"), "archive/data/0");
  expect_refused(s, "(archive/data/0) appears twice", "duplicate");
  s = z;  // control characters of a name never reach the one-line message
  rename_record(s, l, 1, "\n" + s.substr(l.central[1] + 46 + 1, get16(z, l.central[1] + 28) - 1));
  expect_refused(s, "records are not all under one folder ('archive' and '?rchive')", "newline in a name");
  s = z;
  rename_record(s, l, ver, "archive/versioX");
  expect_refused(s, "no version record", "no version");
  s = z;
  rename_record(s, l, pkl, "archive/data.pkX");
  expect_refused(s, "no data.pkl record", "no data.pkl");
  const std::string version = z.substr(data_of(z, l.central[ver]), get32(z, l.central[ver] + 24));
  ASSERT_EQ(version.size(), 2u);
  EXPECT_EQ(version.back(), '\n');
  s = z;
  rewrite_record(s, l, ver, "x\n");
  expect_refused(s, "version record is not a number", "version text");
  s = z;
  rewrite_record(s, l, ver, "0\n");
  expect_refused(s, "archive format version 0 is outside what LibTorch reads (1..", "version 0");
}

TEST(ArchiveCheck, EverySingleByteFlipOfTheDirectoryAndEndRecordsIsRefusedOrStillLoads) {
  const std::string z = small_archive();
  const Layout l = layout(z);
  int refused = 0, accepted = 0;
  for (size_t o = l.cd; o < z.size(); ++o) {
    std::string s = z;
    s[o] = static_cast<char>(s[o] ^ 0xff);
    try {
      nd::validate_checkpoint_bytes(s.data(), s.size(), "X.pt");
    } catch (const nd::CheckpointError& e) {
      ++refused;
      EXPECT_EQ(std::string(e.what()).rfind(kPrefix, 0), 0u) << e.what();
      continue;
    }
    ++accepted;  // a field nobody reads (times, attributes, "made by"): LibTorch must still load it
    EXPECT_EQ(kind_of(s), "search") << "flip at offset " << o << " of " << z.size();
  }
  EXPECT_GT(refused, 0);
  EXPECT_EQ(refused + accepted, static_cast<int>(z.size() - l.cd));
}

TEST(ArchiveCheck, ARealCheckpointPassesAndLoadsAndAFlippedTensorByteIsRefusedByTheCli) {
  const auto d = fresh("archive");
  ASSERT_EQ(run(kSmallSearch + " --epochs 1 --max-steps 1 --out " + d.string()), 0);
  std::string name = slurp(d / "checkpoints" / "latest");
  while (!name.empty() && name.back() == '\n') name.pop_back();
  const fs::path latest = d / "checkpoints" / name;
  ASSERT_TRUE(fs::exists(latest)) << latest;
  EXPECT_NO_THROW(nd::validate_checkpoint_file(latest.string()));
  {
    torch::serialize::InputArchive a;
    nd::open_checkpoint(latest.string(), "search", a);
    EXPECT_EQ(nd::read_int(a, "epoch"), 1);
    EXPECT_EQ(nd::read_int(a, "step"), 0);
  }
  // One bit of the largest tensor record flipped: the archive is otherwise intact and LibTorch
  // alone would load it.
  std::string z = slurp(latest);
  const Layout l = layout(z);
  size_t biggest = l.by_name.at("archive/data/0");  // the largest tensor storage
  for (const auto& [n, i] : l.by_name)
    if (n.rfind("archive/data/", 0) == 0 && get32(z, l.central[i] + 24) > get32(z, l.central[biggest] + 24)) biggest = i;
  ASSERT_GT(get32(z, l.central[biggest] + 24), 16u);
  z[data_of(z, l.central[biggest]) + 5] ^= 0x10;
  { std::ofstream(latest, std::ios::binary | std::ios::trunc) << z; }
  EXPECT_EQ(kind_of(z), "search");
  std::string out;
  EXPECT_EQ(run("search --resume -q --out " + d.string(), &out), 5);
  EXPECT_NE(out.find("checkpoint " + latest.string() + " is damaged or not a noisydarts checkpoint: record #"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("fails its CRC-32 check"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  fs::remove_all(d);
}
