// `noisydarts launch --nproc N -- search ...`: starts N ranks of a noisydarts command on this
// machine with the torchrun environment (docs/distributed.md), the way `torchrun --no-python`
// would, without Python. SIGINT/SIGTERM sent to launch are forwarded to every rank (each rank
// stops gracefully on the first, at once on the second); each rank runs in its own process group
// and gets SIGTERM if launch dies.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>


#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "commands.h"
#include "noisydarts/error.h"

namespace nd = noisydarts;

namespace noisydarts::cli {

namespace {

std::string self_exe() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) throw nd::Error("cannot find the noisydarts executable (/proc/self/exe)");
  buf[n] = '\0';
  return buf;
}

// Signals received by launch, in arrival order (at most a few matter; the rest are counted).
volatile sig_atomic_t g_signals_received = 0;
volatile sig_atomic_t g_signal_log[8] = {};

extern "C" void on_stop_signal(int sig) {
  const sig_atomic_t i = g_signals_received;
  g_signal_log[i % 8] = sig;
  g_signals_received = i + 1;
}

void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace

void add_launch_command(CLI::App& app, Action& run) {
  struct State {
    int nproc = 2;
    std::string addr = "127.0.0.1";
    int port = 29500;
    double grace = 30;
    std::vector<std::string> args;
  };
  auto st = std::make_shared<State>();
  auto* cmd = app.add_subcommand(
      "launch", "Run N data-parallel ranks of a command on this machine: launch --nproc N -- search ... (docs/distributed.md)");
  cmd->add_option("--nproc", st->nproc, "Number of ranks (processes)")->check(CLI::Range(1, 1024))->capture_default_str();
  cmd->add_option("--master-addr", st->addr, "Rendezvous address (MASTER_ADDR)")->capture_default_str();
  cmd->add_option("--master-port", st->port, "Rendezvous port (MASTER_PORT)")->check(CLI::Range(1, 65535))->capture_default_str();
  cmd->add_option("--grace", st->grace, "Seconds the other ranks get to stop by themselves after one fails, then SIGKILL")
      ->check(CLI::Range(0.0, 86400.0))->capture_default_str();
  cmd->add_option("command", st->args, "The noisydarts command and its options, after --")->required();
  cmd->prefix_command();
  cmd->callback([st, &run] {
    run = [st] {
      const std::string exe = self_exe();
      install_stop_handlers();
      const pid_t launcher = ::getpid();
      std::vector<pid_t> pids;
      for (int r = 0; r < st->nproc; ++r) {
        const pid_t pid = ::fork();
        if (pid < 0) throw nd::Error("fork failed while starting rank " + std::to_string(r));
        if (pid == 0) {
          // Its own process group: a terminal's Ctrl-C reaches launch alone, which forwards it
          // once. SIGTERM when launch dies (even by SIGKILL), so no rank is left behind.
          ::setpgid(0, 0);
          ::prctl(PR_SET_PDEATHSIG, SIGTERM);
          if (::getppid() != launcher) ::_exit(nd::kExitFailure);  // launch died before prctl
          struct sigaction dfl {};
          dfl.sa_handler = SIG_DFL;
          ::sigaction(SIGINT, &dfl, nullptr);
          ::sigaction(SIGTERM, &dfl, nullptr);
          ::setenv("RANK", std::to_string(r).c_str(), 1);
          ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
          ::setenv("WORLD_SIZE", std::to_string(st->nproc).c_str(), 1);
          ::setenv("LOCAL_WORLD_SIZE", std::to_string(st->nproc).c_str(), 1);
          ::setenv("MASTER_ADDR", st->addr.c_str(), 1);
          ::setenv("MASTER_PORT", std::to_string(st->port).c_str(), 1);
          std::vector<char*> argv;
          argv.push_back(const_cast<char*>(exe.c_str()));
          for (auto& a : st->args) argv.push_back(a.data());
          argv.push_back(nullptr);
          ::execv(exe.c_str(), argv.data());
          std::fprintf(stderr, "noisydarts: error: cannot start rank %d (%s)\n", r, exe.c_str());
          ::_exit(nd::kExitFailure);
        }
        ::setpgid(pid, pid);  // also here, so it holds before launch forwards anything
        pids.push_back(pid);
      }
      // Wait for every rank. A signal to launch goes to every live rank, once per signal. A
      // rank that exits with kExitStopped stopped on request; after the first other failure the
      // others get `grace` seconds (they stop by themselves at their next collective), then
      // SIGKILL.
      int failure = 0;
      bool stopped = false;
      size_t left = pids.size();
      auto failed_at = std::chrono::steady_clock::time_point::max();
      std::vector<bool> done(pids.size(), false);
      sig_atomic_t forwarded = 0;
      while (left > 0) {
        while (forwarded < g_signals_received) {
          const int sig = g_signal_log[forwarded % 8];
          ++forwarded;
          for (size_t i = 0; i < pids.size(); ++i)
            if (!done[i]) ::kill(pids[i], sig);
        }
        int status = 0;
        const pid_t p = ::waitpid(-1, &status, WNOHANG);
        if (p > 0) {
          for (size_t i = 0; i < pids.size(); ++i) {
            if (pids[i] != p || done[i]) continue;
            done[i] = true;
            --left;
            const int code = exit_code_of(status);
            if (code == nd::kExitStopped) {
              stopped = true;
            } else if (code != 0 && failure == 0) {
              failure = code;
              failed_at = std::chrono::steady_clock::now();
              std::fprintf(stderr, "noisydarts launch: rank %zu exited with code %d\n", i, code);
            }
          }
          continue;
        }
        if (failed_at != std::chrono::steady_clock::time_point::max() &&
            std::chrono::steady_clock::now() - failed_at > std::chrono::duration<double>(st->grace)) {
          for (size_t i = 0; i < pids.size(); ++i)
            if (!done[i]) ::kill(pids[i], SIGKILL);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      // A real failure wins; else ranks that stopped on request make launch "stopped" too.
      const int result = failure != 0 ? failure : stopped ? static_cast<int>(nd::kExitStopped) : 0;
      return result;
    };
  });
}

}  // namespace noisydarts::cli
