#pragma once
/// Error family of noisydarts. Library code throws these; the CLI maps each to one line on
/// stderr and a documented exit code (docs/cli.md).
#include <stdexcept>
#include <string>

namespace noisydarts {

/// Exit codes of the `noisydarts` binary.
enum ExitCode : int {
  kExitOk = 0,
  kExitFailure = 1,      ///< unexpected internal error
  kExitUsage = 2,        ///< bad command line / option value
  kExitData = 3,         ///< dataset file missing, corrupt or inconsistent
  kExitConfig = 4,       ///< invalid config file or genotype
  kExitCheckpoint = 5,   ///< checkpoint unreadable or incompatible
  kExitIo = 6,           ///< output cannot be written
  kExitDiverged = 7,     ///< NaN/Inf loss; last good checkpoint kept
  kExitDistributed = 8,  ///< data-parallel run: another rank died, stopped or timed out
  kExitStopped = 9,      ///< stopped by SIGINT/SIGTERM after writing a checkpoint; resumable
};

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg, int code = kExitFailure)
      : std::runtime_error(msg), code_(code) {}
  int code() const { return code_; }
 private:
  int code_;
};
struct DataError : Error { explicit DataError(const std::string& m) : Error(m, kExitData) {} };
struct ConfigError : Error { explicit ConfigError(const std::string& m) : Error(m, kExitConfig) {} };
struct CheckpointError : Error { explicit CheckpointError(const std::string& m) : Error(m, kExitCheckpoint) {} };
struct IoError : Error { explicit IoError(const std::string& m) : Error(m, kExitIo) {} };
struct DivergedError : Error { explicit DivergedError(const std::string& m) : Error(m, kExitDiverged) {} };
struct DistributedError : Error { explicit DistributedError(const std::string& m) : Error(m, kExitDistributed) {} };
/// A run stopped on request (SIGINT/SIGTERM) after checkpointing the step it had finished.
struct StoppedError : Error { explicit StoppedError(const std::string& m) : Error(m, kExitStopped) {} };
struct UsageError : Error { explicit UsageError(const std::string& m) : Error(m, kExitUsage) {} };

/// Writes `content` to `path` atomically: a temporary file in the same directory, flushed,
/// then renamed over `path`. Throws IoError naming the path, also when `path` exists and is not
/// a regular file (a device such as /dev/full, a directory), which a rename would replace.
void write_file_atomic(const std::string& path, const std::string& content);

}  // namespace noisydarts
