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

#include "child_process.h"
#include "commands.h"
#include "noisydarts/error.h"

namespace nd = noisydarts;

namespace noisydarts::cli {

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
      install_forwarding_handlers();
      std::vector<pid_t> pids;
      for (int r = 0; r < st->nproc; ++r)
        pids.push_back(spawn_child(exe, st->args,
                                   {{"RANK", std::to_string(r)},
                                    {"LOCAL_RANK", std::to_string(r)},
                                    {"WORLD_SIZE", std::to_string(st->nproc)},
                                    {"LOCAL_WORLD_SIZE", std::to_string(st->nproc)},
                                    {"MASTER_ADDR", st->addr},
                                    {"MASTER_PORT", std::to_string(st->port)}}));
      // Wait for every rank. A signal to launch goes to every live rank, once per signal. A
      // rank that exits with kExitStopped stopped on request; after the first other failure the
      // others get `grace` seconds (they stop by themselves at their next collective), then
      // SIGKILL.
      int failure = 0;
      bool stopped = false;
      size_t left = pids.size();
      auto failed_at = std::chrono::steady_clock::time_point::max();
      std::vector<bool> done(pids.size(), false);
      while (left > 0) {
        for (const int sig : take_signals())
          for (size_t i = 0; i < pids.size(); ++i)
            if (!done[i]) ::kill(pids[i], sig);
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
