// Never lose a search (SPEC 8): SIGKILL + resume is bitwise identical to an uninterrupted run;
// divergence stops cleanly; hostile input gets one line, a documented exit code and no output.
#include <gtest/gtest.h>
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
