// Data parallelism on c10d/Gloo (distributed.h): two ranks on 127.0.0.1 stay bitwise identical,
// half batches on two ranks give the full-batch alpha gradient, a killed rank makes the other exit
// with code 8 within the timeout, a peer that never starts fails the rank alone within the
// timeout, and `noisydarts launch` runs a two-rank search, forwards SIGTERM to its ranks and
// leaves none behind when it is killed.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iterator>
#include <fstream>
#include <sstream>
#include <thread>

#include "noisydarts/architect.h"
#include "noisydarts/distributed.h"
#include "noisydarts/error.h"
#include "noisydarts/hessian.h"
#include "noisydarts/search.h"
#include "cli_helpers.h"

namespace nd = noisydarts;
namespace fs = std::filesystem;

namespace {

int test_port(int offset) { return 20000 + (static_cast<int>(::getpid()) * 7 + offset * 101) % 20000; }

nd::DistEnv env(int rank, int world, int port) {
  nd::DistEnv e;
  e.rank = rank;
  e.world = world;
  e.local_rank = rank;
  e.master_addr = "127.0.0.1";
  e.master_port = port;
  return e;
}

nd::SearchNetwork small_net(uint64_t seed, bool noise) {
  torch::manual_seed(seed);
  nd::SearchNetworkOptions o(4, 10, 3);
  o.in_channels(1).steps(2).multiplier(2).primitives({"skip_connect", "sep_conv_3x3", "max_pool_3x3", "dil_conv_3x3"});
  nd::NoiseOptions n;
  if (!noise) n.type = nd::NoiseType::kNone;
  o.noise(n);
  return nd::make_search_network(o);
}

nd::Batch batch(uint64_t seed, int64_t n) {
  auto g = at::make_generator<at::CPUGeneratorImpl>(seed);
  return {torch::randn({n, 1, 12, 12}, g, torch::TensorOptions()), torch::randint(0, 10, {n}, g, torch::kLong)};
}

using noisydarts::test::slurp;

// Runs rank_main(0) and rank_main(1) on two threads; returns what each threw ("" if nothing).
std::vector<std::string> run_two_ranks(const std::function<void(int)>& rank_main) {
  std::vector<std::string> errors(2);
  auto guarded = [&](int r) {
    try {
      rank_main(r);
    } catch (const std::exception& e) {
      errors[r] = e.what();
    }
  };
  std::thread t0(guarded, 0), t1(guarded, 1);
  t0.join();
  t1.join();
  return errors;
}

}  // namespace

TEST(Distributed, TwoRanksHoldBitwiseIdenticalWeightsAndAlphasAfterSeveralSteps) {
  at::set_num_threads(1);
  const int port = test_port(1);
  std::vector<std::vector<torch::Tensor>> final_params(2);
  const auto errors = run_two_ranks([&](int r) {
    nd::Distributed d(env(r, 2, port), std::chrono::seconds(60));
    auto net = small_net(100 + r, /*noise=*/true);  // different inits: the broadcast must fix it
    net->train();
    d.broadcast_module(*net);
    nd::Architect arch(net, nd::ArchitectOptions{});
    arch.set_grad_reducer(d.mean_reducer());
    auto w = net->weight_parameters();
    torch::optim::SGD sgd(w, torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(3e-4));
    for (int step = 0; step < 3; ++step) {
      arch.step(batch(1000 + 10 * r + step, 4));  // each rank its own data
      nd::search_weight_step(net, sgd, w, batch(2000 + 10 * r + step, 4), 5.0, d.mean_reducer());
    }
    for (auto& p : net->parameters()) final_params[r].push_back(p.detach().clone());
  });
  ASSERT_EQ(errors[0], "");
  ASSERT_EQ(errors[1], "");
  ASSERT_EQ(final_params[0].size(), final_params[1].size());
  ASSERT_GT(final_params[0].size(), 10u);
  for (size_t i = 0; i < final_params[0].size(); ++i)
    EXPECT_TRUE(torch::equal(final_params[0][i], final_params[1][i])) << "parameter " << i;
  // And training did move them away from the (broadcast) initialisation of rank 0.
  auto init = small_net(100, true);
  EXPECT_FALSE(torch::equal(init->parameters().back(), final_params[0].back()));
}

TEST(Distributed, HalfBatchesOnTwoRanksGiveTheFullBatchAlphaGradient) {
  at::set_num_threads(1);
  // Eval-mode BatchNorm (running statistics) and no noise: the loss is a plain mean over images.
  const auto full = batch(77, 8);
  auto ref_net = small_net(5, false);
  ref_net->eval();
  const auto ref = nd::grads_or_zero(
      torch::nn::functional::cross_entropy(ref_net->forward(full.x), full.y), ref_net->arch_parameters());

  const int port = test_port(2);
  // Built here, one after the other: the global generator is not to be shared by two threads.
  std::vector<nd::SearchNetwork> nets{small_net(5, false), small_net(5, false)};
  std::vector<std::vector<torch::Tensor>> got(2);
  const auto errors = run_two_ranks([&](int r) {
    nd::Distributed d(env(r, 2, port), std::chrono::seconds(60));
    auto net = nets[r];
    net->eval();
    const nd::Batch half{full.x.narrow(0, 4 * r, 4), full.y.narrow(0, 4 * r, 4)};
    auto g = nd::grads_or_zero(torch::nn::functional::cross_entropy(net->forward(half.x), half.y),
                               net->arch_parameters());
    d.allreduce_mean(g);
    got[r] = g;
  });
  ASSERT_EQ(errors[0], "");
  ASSERT_EQ(errors[1], "");
  for (int r = 0; r < 2; ++r)
    for (size_t i = 0; i < ref.size(); ++i) {
      const double scale = ref[i].abs().max().item<double>();
      ASSERT_GT(scale, 0);
      EXPECT_LT((got[r][i] - ref[i]).abs().max().item<double>(), 1e-5 * scale) << "rank " << r << " alphas " << i;
    }
  EXPECT_TRUE(torch::equal(got[0][0], got[1][0]));
}

namespace {

// Starts the CLI as one rank of a world with the torchrun variables; stderr goes to `err`.
pid_t start_rank(const std::vector<std::string>& args, int rank, int world, int port, const fs::path& err) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::setenv("RANK", std::to_string(rank).c_str(), 1);
  ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
  ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
  ::setenv("MASTER_ADDR", "127.0.0.1", 1);
  ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
  const int fd = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  ::dup2(fd, 2);
  const int devnull = ::open("/dev/null", O_WRONLY);
  ::dup2(devnull, 1);
  std::vector<std::string> a = args;
  a.insert(a.begin(), NOISYDARTS_CLI);
  std::vector<char*> argv;
  for (auto& s : a) argv.push_back(s.data());
  argv.push_back(nullptr);
  ::execv(argv[0], argv.data());
  ::_exit(127);
}

}  // namespace

TEST(Distributed, AKilledRankMakesTheOtherExitWithCode8WithinTheTimeout) {
  const auto dir = fs::temp_directory_path() / ("noisydarts_dist_kill_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto out = dir / "run";
  const std::vector<std::string> args{"search", "--dataset", "synthetic", "--channels", "4", "--layers", "3",
                                      "--batch-size", "8", "--subset", "256", "--epochs", "50", "--threads", "1",
                                      "--dist-timeout", "20", "-q", "--out", out.string()};
  const int port = test_port(3);
  const pid_t r0 = start_rank(args, 0, 2, port, dir / "err0"), r1 = start_rank(args, 1, 2, port, dir / "err1");
  // Let both ranks get into the search (rank 0 writes config.json after the rendezvous).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!fs::exists(out / "config.json") && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(fs::exists(out / "config.json"));
  std::this_thread::sleep_for(std::chrono::seconds(2));
  ::kill(r1, SIGKILL);
  const auto t_kill = std::chrono::steady_clock::now();
  int status = 0;
  ::waitpid(r1, &status, 0);
  // Rank 0 must stop by itself: poll with a hard limit above the 20 s timeout.
  bool exited = false;
  while (std::chrono::steady_clock::now() - t_kill < std::chrono::seconds(45)) {
    if (::waitpid(r0, &status, WNOHANG) == r0) {
      exited = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!exited) {
    ::kill(r0, SIGKILL);
    ::waitpid(r0, &status, 0);
  }
  ASSERT_TRUE(exited) << "rank 0 still running 45 s after rank 1 was killed";
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_kill).count();
  EXPECT_LT(waited, 30.0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), nd::kExitDistributed);
  const std::string err = slurp(dir / "err0");
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_NE(err.find("rank 0 of 2"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(out / "genotype.json"));
  fs::remove_all(dir);
}

TEST(Distributed, LaunchRunsATwoRankSearchAndOnlyRankZeroWrites) {
  const auto dir = fs::temp_directory_path() / ("noisydarts_dist_launch_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  const auto r = nd::test::run_cli("launch --nproc 2 --master-port " + std::to_string(test_port(4)) +
                                   " -- search --dataset synthetic --channels 4 --layers 3 --batch-size 8 --subset 128"
                                   " --epochs 1 --threads 1 -q --out " + dir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  // stdout: the genotype, printed once (rank 0); nothing on stderr with -q.
  EXPECT_EQ(std::count(r.std_out.begin(), r.std_out.end(), '\n'), 1) << r.out;
  EXPECT_EQ(r.std_out.rfind("Genotype(", 0), 0u) << r.out;
  EXPECT_EQ(r.err, "");
  EXPECT_TRUE(fs::exists(dir / "genotype.json"));
  EXPECT_TRUE(fs::exists(dir / "metrics.jsonl"));
  fs::remove_all(dir);
}

TEST(Distributed, LaunchRunsATwoRankTrainingRun) {
  const auto dir = fs::temp_directory_path() / ("noisydarts_dist_train_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  const auto r = nd::test::run_cli("launch --nproc 2 --master-port " + std::to_string(test_port(5)) +
                                   " -- train --genotype NoisyDARTS_a --dataset synthetic --channels 4 --layers 3"
                                   " --batch-size 8 --subset 64 --epochs 1 --max-steps 2 --threads 1 -q --out " +
                                   dir.string());
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(std::count(r.std_out.begin(), r.std_out.end(), '\n'), 1) << r.out;  // rank 0's result line
  EXPECT_EQ(r.std_out.rfind("test top-1", 0), 0u) << r.out;
  EXPECT_TRUE(fs::exists(dir / "result.json"));
  fs::remove_all(dir);
}

TEST(Distributed, ACheckpointOfTwoRanksResumesOnOneWithTheSameImagesConsumed) {
  const auto base = fs::temp_directory_path() / ("noisydarts_dist_world_" + std::to_string(::getpid()));
  fs::remove_all(base);
  const auto a = base / "two", b = base / "one";
  // 2 ranks x 8 images = global batch 16: 64 weight-half images give 4 steps per epoch.
  const auto r = nd::test::run_cli("launch --nproc 2 --master-port " + std::to_string(test_port(6)) +
                                   " -- search --dataset synthetic --channels 4 --layers 3 --batch-size 8 --subset 128"
                                   " --epochs 2 --threads 1 --checkpoint-every 0.000001 --keep-checkpoints 1000 -q --out " +
                                   a.string());
  ASSERT_EQ(r.code, 0) << r.out;
  const std::string mid = "search-e0001-s000002.pt";  // epoch 2, after 2 of its 4 steps
  ASSERT_TRUE(fs::exists(a / "checkpoints" / mid));
  fs::create_directories(b / "checkpoints");
  fs::copy_file(a / "config.json", b / "config.json");
  fs::copy_file(a / "checkpoints" / mid, b / "checkpoints" / mid);
  std::ofstream(b / "checkpoints" / "latest") << mid << "\n";

  // One process, batch 8: 8 steps per epoch; 2 steps of 16 images = 4 steps of 8.
  const auto one = nd::test::run_cli("search --resume --out " + b.string());
  ASSERT_EQ(one.code, 0) << one.out;
  EXPECT_NE(one.err.find("(epoch 2, step 4)"), std::string::npos) << one.err;
  std::ifstream m(b / "metrics.jsonl");
  std::string line1, line2, extra;
  ASSERT_TRUE(std::getline(m, line1));
  ASSERT_TRUE(std::getline(m, line2));
  EXPECT_FALSE(std::getline(m, extra));
  std::ifstream ma(a / "metrics.jsonl");
  std::string a1;
  ASSERT_TRUE(std::getline(ma, a1));
  EXPECT_EQ(line1, a1);  // the first epoch is the two-rank run's, carried in the checkpoint
  EXPECT_TRUE(fs::exists(b / "genotype.json"));
  fs::remove_all(base);
}

namespace {

// The state letter of /proc/<pid>/stat ('\0' when there is no such process).
char proc_state(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto close = s.rfind(')');
  return close == std::string::npos || close + 2 >= s.size() ? '\0' : s[close + 2];
}
// Running (a zombie has ended: only its parent has not collected it yet).
bool alive(pid_t pid) {
  const char st = proc_state(pid);
  return st != '\0' && st != 'Z' && st != 'X';
}

// The processes whose parent is `parent`.
std::vector<pid_t> children_of(pid_t parent) {
  std::vector<pid_t> out;
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    std::ifstream f(e.path() / "stat");
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const auto close = s.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(s.substr(close + 2));
    char state = 0;
    long ppid = 0;
    if (rest >> state >> ppid && ppid == parent) out.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return out;
}

// Starts `noisydarts launch --nproc 2 -- search <a long tiny search>`; stderr goes to `err`.
pid_t start_launch(int port, const fs::path& out, const fs::path& err) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  const int fd = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  ::dup2(fd, 2);
  const int devnull = ::open("/dev/null", O_WRONLY);
  ::dup2(devnull, 1);
  std::vector<std::string> a{NOISYDARTS_CLI, "launch", "--nproc", "2", "--master-port", std::to_string(port), "--",
                             "search", "--dataset", "synthetic", "--channels", "4", "--layers", "3", "--batch-size",
                             "8", "--subset", "256", "--epochs", "1000", "--threads", "1", "-q", "--out", out.string()};
  std::vector<char*> argv;
  for (auto& s : a) argv.push_back(s.data());
  argv.push_back(nullptr);
  ::execv(argv[0], argv.data());
  ::_exit(127);
}

// Waits until both ranks of `launcher` run and have met (rank 0 writes config.json after the
// rendezvous); returns their pids.
std::vector<pid_t> wait_for_two_ranks(pid_t launcher, const fs::path& out) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(90);
  std::vector<pid_t> ranks;
  while (std::chrono::steady_clock::now() < deadline) {
    ranks = children_of(launcher);
    if (ranks.size() == 2 && fs::exists(out / "config.json")) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return ranks;
}

// Waits for `pid` (a child of this process) at most `limit`; SIGKILLs it after that.
bool wait_child(pid_t pid, std::chrono::seconds limit, int* status) {
  const auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t0 < limit) {
    if (::waitpid(pid, status, WNOHANG) == pid) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, status, 0);
  return false;
}

}  // namespace

TEST(Distributed, LaunchForwardsSigtermToEveryRankAndWaitsForThem) {
  const auto dir = fs::temp_directory_path() / ("noisydarts_dist_sigterm_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const pid_t launcher = start_launch(test_port(7), dir / "run", dir / "err");
  const auto ranks = wait_for_two_ranks(launcher, dir / "run");
  ASSERT_EQ(ranks.size(), 2u);
  ASSERT_TRUE(fs::exists(dir / "run" / "config.json"));
  // Each rank leads its own process group, so a terminal's Ctrl-C reaches it only through launch.
  for (pid_t r : ranks) EXPECT_EQ(::getpgid(r), r);
  EXPECT_NE(::getpgid(ranks[0]), ::getpgid(launcher));
  ::kill(launcher, SIGTERM);
  int status = 0;
  const bool exited = wait_child(launcher, std::chrono::seconds(60), &status);
  for (pid_t r : ranks)
    if (alive(r)) ::kill(r, SIGKILL);  // clean up before failing
  ASSERT_TRUE(exited) << "launch still running 60 s after SIGTERM";
  // launch reaped both ranks before exiting: none is left running.
  for (pid_t r : ranks) EXPECT_FALSE(alive(r)) << "rank " << r << " outlived launch";
  ASSERT_TRUE(WIFEXITED(status));
  // Both ranks stopped gracefully at the same step: rank 0 checkpointed it, all exited 9.
  const std::string err = noisydarts::test::slurp((dir / "err").string());
  EXPECT_EQ(WEXITSTATUS(status), nd::kExitStopped) << err;
  EXPECT_NE(err.find("stopped by SIGTERM"), std::string::npos) << err;
  EXPECT_TRUE(fs::exists(dir / "run" / "checkpoints" / "latest")) << err;
  EXPECT_FALSE(fs::exists(dir / "run" / "genotype.json"));
  fs::remove_all(dir);
}

TEST(Distributed, RanksOfAKilledLaunchStopToo) {
  const auto dir = fs::temp_directory_path() / ("noisydarts_dist_orphan_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const pid_t launcher = start_launch(test_port(8), dir / "run", dir / "err");
  const auto ranks = wait_for_two_ranks(launcher, dir / "run");
  if (ranks.size() != 2u) {
    ::kill(launcher, SIGKILL);
    for (pid_t r : ranks) ::kill(r, SIGKILL);
    ::waitpid(launcher, nullptr, 0);
    FAIL() << "the ranks did not start";
  }
  ::kill(launcher, SIGKILL);  // no chance to forward anything: PR_SET_PDEATHSIG sends SIGTERM
  ::waitpid(launcher, nullptr, 0);
  const auto t0 = std::chrono::steady_clock::now();
  while ((alive(ranks[0]) || alive(ranks[1])) && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const bool left = alive(ranks[0]) || alive(ranks[1]);
  for (pid_t r : ranks)
    if (alive(r)) ::kill(r, SIGKILL);
  EXPECT_FALSE(left) << "a rank still ran 60 s after launch was killed";
  fs::remove_all(dir);
}

TEST(Distributed, APeerThatNeverStartsFailsTheRankAloneWithinTheTimeout) {
  // Rank 0 alone (serves the store, nobody joins) and rank 1 alone (no store to connect to),
  // both with --dist-timeout 5: exit code 8 with one line well before twice the timeout.
  const auto dir = fs::temp_directory_path() / ("noisydarts_dist_alone_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::vector<pid_t> pids;
  const auto t0 = std::chrono::steady_clock::now();
  for (int rank : {0, 1}) {
    const auto out = dir / ("run" + std::to_string(rank));
    const std::vector<std::string> args{"search", "--dataset", "synthetic", "--channels", "4", "--layers", "3",
                                        "--batch-size", "8", "--subset", "256", "--epochs", "1", "--threads", "1",
                                        "--dist-timeout", "5", "-q", "--out", out.string()};
    pids.push_back(start_rank(args, rank, 2, test_port(9 + rank), dir / ("err" + std::to_string(rank))));
  }
  std::vector<double> took(2, -1);
  std::vector<int> status(2, 0);
  std::vector<bool> done(2, false);
  while ((!done[0] || !done[1]) && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60)) {
    for (int r = 0; r < 2; ++r)
      if (!done[r] && ::waitpid(pids[r], &status[r], WNOHANG) == pids[r]) {
        done[r] = true;
        took[r] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (int r = 0; r < 2; ++r)
    if (!done[r]) {
      ::kill(pids[r], SIGKILL);
      ::waitpid(pids[r], &status[r], 0);
    }
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(done[r]) << "rank " << r << " alone still running after 60 s";
    EXPECT_LT(took[r], 5.0 + 10.0) << "rank " << r;  // the timeout plus start-up, not twice it
    ASSERT_TRUE(WIFEXITED(status[r])) << "rank " << r;
    EXPECT_EQ(WEXITSTATUS(status[r]), nd::kExitDistributed) << "rank " << r;
    const std::string err = slurp(dir / ("err" + std::to_string(r)));
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    EXPECT_NE(err.find("rank " + std::to_string(r) + " of 2: rendezvous at 127.0.0.1:"), std::string::npos) << err;
    EXPECT_FALSE(fs::exists(dir / ("run" + std::to_string(r)) / "genotype.json"));
  }
  fs::remove_all(dir);
}
