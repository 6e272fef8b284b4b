#pragma once
/// The run engine shared by `search` and `train` (docs/checkpoint.md, docs/run-directory.md):
///  - stop requests: SIGINT/SIGTERM (or request_stop()) make a run finish its step, checkpoint
///    it and end with StoppedError (exit 9);
///  - Stateful parts: everything a restart needs, each with save/load side by side, written
///    into one versioned archive by a Checkpoint;
///  - RunDirectory: an exclusive lock for the life of the run, checkpoint rotation, resume
///    candidates newest first, atomic result files;
///  - the live progress line and the metrics history both commands write.
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "noisydarts/data.h"
#include "noisydarts/distributed.h"
#include "noisydarts/error.h"

namespace noisydarts {

// ------------------------------------------------------------------------------------------
// Stop requests
// ------------------------------------------------------------------------------------------

/// Installs SIGINT/SIGTERM handlers: the first signal requests a stop (the run finishes its
/// step, checkpoints and throws StoppedError); a second one ends the process at once with the
/// signal's default action. Idempotent.
void install_stop_handlers();
/// Requests a stop as a signal would (also callable from another thread, e.g. Python's Ctrl-C).
void request_stop(int signal_number);
/// True once a stop was requested (and not cleared).
bool stop_requested();
/// The signal of the pending request (0: none).
int stop_signal();
/// Forgets a pending request (a new run in the same process starts unrequested).
void clear_stop();
/// "SIGTERM", "SIGINT", "signal N".
std::string signal_name(int signal_number);
/// The line a graceful stop of `command` ("search" | "train") on run directory `out` ends with,
/// at `epoch` finished epochs plus `step` steps.
std::string stop_message(const std::string& command, const std::string& out, int64_t epoch, int64_t step);

/// This rank's device for --device `device`: a data-parallel rank on CUDA without an index uses
/// its LOCAL_RANK's GPU.
torch::Device rank_device(const std::string& device, const Distributed* dist);

// ------------------------------------------------------------------------------------------
// Stateful parts and the checkpoint made of them
// ------------------------------------------------------------------------------------------

/// A piece of run state that survives a restart. save() and load() write and read the same
/// keys (docs/checkpoint.md lists them); load() throws on a missing or mismatching key.
struct Stateful {
  virtual ~Stateful() = default;
  virtual void save(torch::serialize::OutputArchive& a) const = 0;
  virtual void load(torch::serialize::InputArchive& a) = 0;
};

/// A module's parameters and buffers under `key` (a nested archive).
class ModuleState : public Stateful {
 public:
  ModuleState(torch::nn::Module& m, std::string key = "model") : m_(m), key_(std::move(key)) {}
  void save(torch::serialize::OutputArchive& a) const override;
  void load(torch::serialize::InputArchive& a) override;
 private:
  torch::nn::Module& m_;
  std::string key_;
};

/// An SGD or Adam optimiser's state by parameter position under `key` (checkpoint.h explains
/// why not LibTorch's own Optimizer::save).
template <class Optimizer>
class OptimizerState : public Stateful {
 public:
  OptimizerState(Optimizer& opt, std::vector<torch::Tensor> params, std::string key)
      : opt_(opt), params_(std::move(params)), key_(std::move(key)) {}
  void save(torch::serialize::OutputArchive& a) const override;
  void load(torch::serialize::InputArchive& a) override;
 private:
  Optimizer& opt_;
  std::vector<torch::Tensor> params_;
  std::string key_;
};
using SgdState = OptimizerState<torch::optim::SGD>;
using AdamState = OptimizerState<torch::optim::Adam>;

/// A batch stream's position as `<name>_pass` / `<name>_batch`. A checkpoint written by a run
/// of another world size (key `world_size`, 1 when absent) resumes at the same number of images
/// consumed in the pass: the batch index scales by stored_world / world.
class StreamState : public Stateful {
 public:
  StreamState(BatchStream& s, std::string name, int64_t world = 1) : s_(s), name_(std::move(name)), world_(world) {}
  void save(torch::serialize::OutputArchive& a) const override;
  void load(torch::serialize::InputArchive& a) override;
 private:
  BatchStream& s_;
  std::string name_;
  int64_t world_;
};

/// The default CPU generator's state as `rng_cpu` (noise, drop-path, augmentation draws).
class RngState : public Stateful {
 public:
  void save(torch::serialize::OutputArchive& a) const override;
  void load(torch::serialize::InputArchive& a) override;
};

/// Where a run is: `epoch` (epochs finished), `step` (steps done in the current epoch) and the
/// `world_size` that wrote it. load() rescales step to this run's world size (a checkpoint
/// without `step` or `world_size`, from an older train run, reads as step 0 of world 1).
struct LoopPosition : Stateful {
  int64_t epoch = 0, step = 0;
  int64_t world = 1;            ///< this run's world size
  int64_t steps_per_epoch = 0;  ///< load() clamps step to it (0: no clamp)
  void save(torch::serialize::OutputArchive& a) const override;
  void load(torch::serialize::InputArchive& a) override;
};

/// A JSON value stored as a string under `key` (running sums, metric history, a method's state).
/// An optional one is left alone by load() when the archive lacks it (older checkpoints).
class JsonState : public Stateful {
 public:
  JsonState(std::string key, std::function<nlohmann::json()> get, std::function<void(const nlohmann::json&)> set,
            bool optional = false)
      : key_(std::move(key)), get_(std::move(get)), set_(std::move(set)), optional_(optional) {}
  void save(torch::serialize::OutputArchive& a) const override;
  void load(torch::serialize::InputArchive& a) override;
 private:
  std::string key_;
  std::function<nlohmann::json()> get_;
  std::function<void(const nlohmann::json&)> set_;
  bool optional_;
};

/// The metric history of a run: one JSON object per finished epoch, written whole to
/// metrics.jsonl after each epoch and stored in the checkpoint as `metrics`.
struct MetricsLog {
  std::vector<nlohmann::json> epochs;
  std::string jsonl() const;
  double sum(const std::string& key) const;  ///< sum of a numeric key over the epochs (0 when absent)
  std::unique_ptr<Stateful> state();
};

/// A checkpoint: format version, kind ("search" | "train"), the run's config and a set of
/// Stateful parts, saved to and loaded from one archive.
class Checkpoint {
 public:
  Checkpoint(std::string kind, std::function<nlohmann::json()> config) : kind_(std::move(kind)), config_(std::move(config)) {}
  /// Adds a part (not owned) / takes ownership of one.
  Checkpoint& add(Stateful& part);
  Checkpoint& add(std::unique_ptr<Stateful> part);
  /// Extra ints written with every save (e.g. in_channels of a train checkpoint).
  Checkpoint& add_int(const std::string& key, std::function<int64_t()> get);
  void save(const std::string& path) const;
  /// Loads every part from `path`. Throws CheckpointError naming the file.
  void load(const std::string& path);
 private:
  std::string kind_;
  std::function<nlohmann::json()> config_;
  std::vector<Stateful*> parts_;
  std::vector<std::unique_ptr<Stateful>> owned_;
  std::vector<std::pair<std::string, std::function<int64_t()>>> ints_;
};

// ------------------------------------------------------------------------------------------
// Run directory
// ------------------------------------------------------------------------------------------

/// The directory a run writes. Only the writer (rank 0) creates, locks and writes it.
class RunDirectory {
 public:
  /// `prefix`: checkpoint file names are `<prefix>-eEEEE-sSSSSSS.pt` in DIR/checkpoints/.
  RunDirectory(std::string path, std::string prefix, bool writer);
  ~RunDirectory();
  RunDirectory(const RunDirectory&) = delete;
  RunDirectory& operator=(const RunDirectory&) = delete;

  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const;
  bool writer() const { return writer_; }
  bool exists() const;

  /// Creates the directory (and checkpoints/) and takes the exclusive lock on DIR/.lock (an
  /// fcntl lock: released by the OS when the process ends, so a killed run leaves no lock).
  /// Throws UsageError naming the PID holding it, IoError when it cannot be created. No-op for
  /// a non-writer.
  void create_and_lock();
  /// Takes the lock of an existing directory (resume). Same errors.
  void lock();

  /// Writes DIR/name atomically (writer only).
  void write(const std::string& name, const std::string& content) const;
  /// Saves `ckpt` as checkpoints/<prefix>-eEEEE-sSSSSSS.pt, points checkpoints/latest at it and
  /// keeps the newest `keep`. Returns its path ("" for a non-writer).
  std::string save_checkpoint(const Checkpoint& ckpt, int64_t epoch, int64_t step, int keep) const;
  /// The checkpoints to resume from, newest first: the one `latest` names, then the others of
  /// `prefix` by name, then any `extra` files that exist (e.g. a train run's legacy checkpoint.pt).
  std::vector<std::string> resume_candidates(const std::vector<std::string>& extra = {}) const;
  /// The newest checkpoint `latest` names ("" when none).
  std::string latest_checkpoint() const;
  /// Resume, first part: locks the directory, fills `candidates` (resume_candidates(extra)) and
  /// returns the configuration stored in the newest candidate of `kind` whose config reads, with
  /// that file. Throws CheckpointError `none_message` when the directory or every candidate is
  /// missing, or the newest one's error when none reads.
  struct StoredConfig {
    nlohmann::json config;
    std::string file;
  };
  StoredConfig open_for_resume(const std::string& kind, const std::vector<std::string>& extra,
                                 const std::string& none_message, std::vector<std::string>& candidates);
  /// Makes DIR/name the same file as `checkpoint` (a hard link, replaced atomically; a copy
  /// where the file system has no hard links). Writer only.
  void publish(const std::string& checkpoint, const std::string& name) const;

 private:
  /// checkpoints/<prefix>-*.pt, sorted by name (= chronologically).
  std::vector<std::string> checkpoint_files() const;
  std::string path_, prefix_;
  bool writer_;
  int lock_fd_ = -1;
};

/// Merges a configuration stored in a checkpoint into `cfg`; one this build cannot read is an
/// incompatible checkpoint (CheckpointError), not a config error.
template <class Config>
void merge_stored_config(Config& cfg, const nlohmann::json& stored, const std::string& where) {
  try {
    cfg.merge_json(stored, where);
  } catch (const ConfigError& e) {
    throw CheckpointError(std::string(e.what()) + " (checkpoint of another noisydarts version?)");
  }
}

/// Loads the newest candidate that loads: `load(path)` is tried on each of `candidates` in
/// order; a CheckpointError moves on to the next one (reported through `info` in one line once
/// one loads). Returns the path loaded. When none loads, rethrows the newest one's error; no
/// candidates: CheckpointError `none_message`.
std::string load_newest(const std::vector<std::string>& candidates, const std::function<void(const std::string&)>& load,
                        const std::function<void(const std::string&)>& info, const std::string& none_message);

// ------------------------------------------------------------------------------------------
// Progress line
// ------------------------------------------------------------------------------------------

/// Live progress on stderr: rewritten in place on a terminal (every 0.5 s), one line every 15 s
/// otherwise (logs, CI).
class Progress {
 public:
  explicit Progress(bool enabled);
  void update(const std::string& line, bool force = false);
  void finish();
 private:
  bool enabled_, tty_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point last_;
};

/// "epoch E/N step S/M  <body>  ETA T": the progress line of both commands.
std::string progress_line(int64_t epoch, int64_t epochs, int64_t step, int64_t steps, const std::string& body,
                          double seconds_left);

}  // namespace noisydarts
