#include "child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>

#include "noisydarts/error.h"

namespace noisydarts::cli {

namespace {
// Signals received, in arrival order (a ring of the last 8; more than that between two polls
// would only repeat a stop request).
volatile sig_atomic_t g_signals_received = 0;
volatile sig_atomic_t g_signal_log[8] = {};
sig_atomic_t g_signals_taken = 0;

extern "C" void on_forwarded_signal(int sig) {
  const sig_atomic_t i = g_signals_received;
  g_signal_log[i % 8] = sig;
  g_signals_received = i + 1;
}
}  // namespace

std::string self_exe() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) throw Error("cannot find the noisydarts executable (/proc/self/exe)");
  buf[n] = '\0';
  return buf;
}

pid_t spawn_child(const std::string& exe, const std::vector<std::string>& args,
                  const std::vector<std::pair<std::string, std::string>>& env, const std::string& log) {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw Error("fork failed while starting " + exe);
  if (pid == 0) {
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(kExitFailure);  // the parent died before prctl
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    ::sigaction(SIGINT, &dfl, nullptr);
    ::sigaction(SIGTERM, &dfl, nullptr);
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    if (!log.empty()) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (fd < 0) {
        std::fprintf(stderr, "noisydarts: error: cannot write the log %s\n", log.c_str());
        ::_exit(kExitIo);
      }
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(exe.c_str()));
    for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(exe.c_str(), argv.data());
    std::fprintf(stderr, "noisydarts: error: cannot start %s\n", exe.c_str());
    ::_exit(kExitFailure);
  }
  ::setpgid(pid, pid);  // also here, so it holds before the parent forwards anything
  return pid;
}

void install_forwarding_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_forwarded_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

std::vector<int> take_signals() {
  std::vector<int> s;
  while (g_signals_taken < g_signals_received) {
    s.push_back(static_cast<int>(g_signal_log[g_signals_taken % 8]));
    ++g_signals_taken;
  }
  return s;
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace noisydarts::cli
