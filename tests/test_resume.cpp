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

TEST(Resume, ADamagedCheckpointIsRefusedWithOneLine) {
  const auto d = fresh("damaged");
  ASSERT_EQ(run(kSmallSearch + " --epochs 2 --max-steps 1 --out " + d.string()), 0);
  const auto latest = d / "checkpoints" / slurp(d / "checkpoints" / "latest").substr(0, 23);
  ASSERT_TRUE(fs::exists(latest)) << latest;
  { std::ofstream(latest, std::ios::binary | std::ios::trunc) << "garbage"; }
  std::string out;
  EXPECT_EQ(run("search --resume -q --out " + d.string(), &out), 5);
  EXPECT_NE(out.find(latest.string()), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  fs::remove_all(d);
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
