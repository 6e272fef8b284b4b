#pragma once
// Child noisydarts processes for the commands that run others (launch, study): each child runs
// in its own process group (a terminal's Ctrl-C reaches the parent alone, which forwards it
// once) and gets SIGTERM when the parent dies, even by SIGKILL, so none is left behind.
#include <sys/types.h>

#include <string>
#include <utility>
#include <vector>

namespace noisydarts::cli {

/// The running noisydarts executable (/proc/self/exe). Throws Error when it cannot be found.
std::string self_exe();

/// Starts `exe args...` with `env` added to the environment; stdout and stderr go to `log`
/// (appended) when it is not empty. Returns the child's PID; throws Error when fork fails.
pid_t spawn_child(const std::string& exe, const std::vector<std::string>& args,
                  const std::vector<std::pair<std::string, std::string>>& env = {}, const std::string& log = "");

/// SIGINT/SIGTERM handlers that record the signals for forwarding (instead of stopping).
void install_forwarding_handlers();

/// The signals received since the last call, in arrival order.
std::vector<int> take_signals();

/// A waitpid status as an exit code (128 + signal for a child killed by one).
int exit_code_of(int status);

}  // namespace noisydarts::cli
