#pragma once
// The one helper the tests use to run a command line (usually the `noisydarts` CLI) and look at
// what it printed and how it exited.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

namespace noisydarts::test {

struct CommandResult {
  int code = -1;     ///< exit status (128 + signal when killed by a signal)
  std::string out;   ///< stdout followed by stderr (each complete; not interleaved)
  std::string err;   ///< stderr only
  std::string std_out;  ///< stdout only
};

/// Runs `cmd` through /bin/sh and captures stdout and stderr separately (stderr via a temporary
/// file, so a large stdout cannot dead-lock the pipe).
inline CommandResult run_command(const std::string& cmd) {
  char err_path[] = "/tmp/noisydarts_test_stderr_XXXXXX";
  const int fd = ::mkstemp(err_path);
  if (fd >= 0) ::close(fd);
  CommandResult r;
  FILE* p = ::popen(("( " + cmd + " ) 2>'" + std::string(err_path) + "'").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.std_out.append(buf, n);
  const int status = ::pclose(p);
  {
    std::ifstream f(err_path, std::ios::binary);
    r.err.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  std::remove(err_path);
  if (WIFEXITED(status)) r.code = WEXITSTATUS(status);
  else if (WIFSIGNALED(status)) r.code = 128 + WTERMSIG(status);
  r.out = r.std_out + r.err;
  return r;
}

/// The whole content of a file ("" when it cannot be read).
inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// The `noisydarts` binary under test: NOISYDARTS_TEST_CLI when set (e.g. the sanitizer
/// build's CLI, docs/reliability.md), else the one built with the tests.
inline std::string cli_path() {
  const char* env = std::getenv("NOISYDARTS_TEST_CLI");
  return env && *env ? std::string(env) : std::string(NOISYDARTS_CLI);
}

/// Runs the `noisydarts` binary under test with `args` (a shell-quoted argument string).
inline CommandResult run_cli(const std::string& args) {
  return run_command(cli_path() + " " + args);
}

}  // namespace noisydarts::test
