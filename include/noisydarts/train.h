#pragma once
/// Training a genotype's evaluation network from scratch (SPEC 3) and evaluating it: SGD with a
/// cosine learning rate, auxiliary loss, cutout, drop-path growing linearly, gradient clipping,
/// a checkpoint each epoch, model selection on a validation split carved from the training set
/// and the test accuracy measured once at the end. Writes the run directory documented in
/// docs/train.md.
#include <torch/torch.h>
#include <nlohmann/json.hpp>
#include <cstdint>
#include <functional>
#include <string>

#include "noisydarts/data.h"
#include "noisydarts/eval_network.h"
#include "noisydarts/genotype.h"
#include "noisydarts/profile.h"
#include "noisydarts/runtime.h"

namespace noisydarts {

/// One options tree for `noisydarts train`: preset -> --config file -> flags; validated once and
/// written back as config.json (every key of to_json() is documented in docs/train.md).
struct TrainConfig {
  std::string preset = "default";     ///< default (~10 min on 2 cores, Fashion-MNIST) | paper (SPEC 3)
  std::string out;                    ///< run directory
  std::string genotype = "NoisyDARTS_a";  ///< built-in name, .json/.txt path, or inline text
  // Data.
  std::string dataset = "fashion-mnist";
  std::string data_dir;               ///< empty: the dataset's default directory
  int64_t subset = 0;                 ///< use only this many training images (0 = all)
  int64_t image_size = 32;            ///< folder dataset: image side in pixels, [8, 512]
  double valid_portion = 0.1;         ///< share of the training images held out for model selection
  int64_t batch_size = 96;
  int64_t crop_padding = 4;           ///< random-crop padding in pixels (0 = off)
  bool flip = true;                   ///< random horizontal flip
  int64_t cutout = 16;                ///< cutout side in pixels (0 = off)
  int workers = 1;                    ///< data threads preparing batches
  // Network.
  int64_t channels = 36;
  int64_t layers = 20;
  std::string network = "cifar";      ///< cifar | imagenet (stem/head layout)
  bool auxiliary = true;
  double auxiliary_weight = 0.4;      ///< loss = CE(logits) + auxiliary_weight * CE(aux logits)
  double drop_path_prob = 0.2;        ///< final drop-path probability; epoch e uses p * e / epochs
  std::string init_from;              ///< PyTorch state dict (reference layout) to start from
  // Optimiser: SGD, lr cosine-annealed per epoch from lr to lr_min.
  int64_t epochs = 600;
  double lr = 0.025, lr_min = 0.0, momentum = 0.9, weight_decay = 3e-4, grad_clip = 5.0;
  // Running.
  uint64_t seed = 0;
  int threads = 0;                    ///< 0 = all cores
  std::string device = "cpu";
  int64_t max_steps = 0;              ///< limit steps per epoch (0 = whole epochs; tests/benchmarks)
  double dist_timeout_s = 300;        ///< data-parallel runs: longest wait for another rank
  double checkpoint_every_min = 0;    ///< also checkpoint every N minutes mid-epoch (0 = epoch ends only)
  int keep_checkpoints = 2;           ///< newest checkpoints kept in checkpoints/

  /// Defaults of a preset (default | paper). Throws UsageError.
  static TrainConfig preset_defaults(const std::string& preset);
  nlohmann::json to_json() const;
  /// Overrides the keys present in `j`; unknown keys or wrong types throw ConfigError naming
  /// the key and `where`.
  void merge_json(const nlohmann::json& j, const std::string& where);
  /// Range checks; throws UsageError naming the option.
  void validate() const;
  /// What a run records as its config.json: validate(), the genotype resolved to DARTS text,
  /// the dataset's default directory, no auxiliary head for a non-DARTS genotype (returns the
  /// genotype). Reads no data, writes nothing (`train --print-config`). Throws like validate()
  /// and resolve_genotype().
  Genotype finalize();
};

struct TrainCallbacks {
  /// Receives human-readable lines (start-up, epoch summaries, the closing summary).
  std::function<void(const std::string&)> info;
  /// Show a live progress line on stderr.
  bool progress = true;
  /// Called by the writer after every epoch with that epoch's metrics.jsonl object. To stop a
  /// run gracefully, call request_stop() (engine.h).
  std::function<void(const nlohmann::json&)> on_epoch;
};

/// Top-1/top-5 accuracy (%) and mean cross-entropy of one pass.
struct EvalResult {
  double top1 = 0, top5 = 0, loss = 0;
  int64_t images = 0;
};

struct TrainResult {
  Genotype genotype;
  ModelProfile profile;
  int64_t epochs_done = 0;
  int64_t best_epoch = 0;      ///< 1-based epoch of the selected model
  double best_valid_top1 = -1; ///< validation top-1 of the selected model (-1: no validation split)
  EvalResult test;             ///< the selected model on the test set (measured once)
  double seconds = 0;
};

/// Runs (or, with `resume`, continues from the newest loadable checkpoint of `cfg.out`) a
/// training run. On resume, `cfg.threads` < 0 keeps the run's stored thread count. Throws the
/// Error family on bad input and DivergedError on NaN/Inf loss (last checkpoint kept).
TrainResult run_train(TrainConfig cfg, bool resume, const TrainCallbacks& cb = {});

/// One eval-mode pass over `stream` (one full pass from its current position), in inference
/// mode at `precision` (runtime.h).
EvalResult evaluate(EvalNetwork& net, BatchStream& stream, torch::Device device,
                    Precision precision = Precision::kFp32);

/// Rebuilds the evaluation network of a "train" checkpoint and loads its weights (eval mode).
/// `cfg`, when given, receives the stored configuration. Throws CheckpointError.
EvalNetwork load_trained_network(const std::string& checkpoint, TrainConfig* cfg = nullptr);

/// `noisydarts eval`: the checkpoint's network on the test set of its dataset (`data_dir`
/// overrides the stored directory when not empty).
EvalResult evaluate_checkpoint(const std::string& checkpoint, const std::string& data_dir = "",
                               int64_t batch_size = 64, int threads = 0,
                               Precision precision = Precision::kFp32);

}  // namespace noisydarts
