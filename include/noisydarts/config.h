#pragma once
/// Search configuration: one options tree, resolved from preset -> scale -> config file -> flags,
/// validated once and written back as `config.json` (SPEC 1.3).
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "noisydarts/data.h"
#include "noisydarts/noise.h"

namespace noisydarts {

/// The settings of every search method (docs/methods.md), config key `method_settings`, one
/// object per method; a method reads only its own. Defaults are its authors' (docs/methods.md
/// names the file each comes from). Schedules run over the search: value_start at the first
/// epoch, value_end at the last (method.h schedule_progress).
struct MethodSettings {
  struct FairDarts {
    double zero_one_weight = 10;  ///< weight of the zero-one loss -mean((sigmoid(alpha) - 0.5)^2)
    double threshold = 0.85;      ///< derivation: kept ops below it are reported
  } fair_darts;
  struct PcDarts {
    int64_t k = 4;                ///< 1/K of the channels go through the mixed op
    bool edge_norm = true;        ///< per-node edge weights beta (softmax over a node's inputs)
  } pc_darts;
  struct Sdarts {
    double epsilon_start = 0.03, epsilon_end = 0.3;  ///< perturbation radius ramp
    int64_t attack_steps = 7;     ///< sdarts-adv: PGD steps
  } sdarts;
  struct DartsMinus {
    double beta_start = 1, beta_end = 0;  ///< coefficient of the auxiliary skip
  } darts_minus;
  struct BetaDarts {
    double lambda_start = 0, lambda_end = 50;  ///< weight of the beta-decay regulariser
  } beta_darts;
  struct Gdas {
    double tau_start = 10, tau_end = 0.1;  ///< Gumbel-softmax temperature
  } gdas;
  struct Drnas {
    std::string reg = "l2";       ///< l2 (--arch-weight-decay, no loss term) | kl (reg_weight * KL to Dirichlet(1))
    double reg_weight = 1e-3;
  } drnas;
};

struct SearchConfig {
  // Identity of the run.
  std::string preset = "noisydarts";  ///< a method name (method.h): its paper's search recipe
  std::string method;                 ///< method.h: the search algorithm; empty: the preset's name
  std::string scale = "small";        ///< small (~10 min on 2 cores) | paper (SPEC 1.3 sizes)
  std::string out;                    ///< run directory
  // Data.
  std::string dataset = "fashion-mnist";
  std::string data_dir;               ///< empty: the dataset's default directory
  int64_t subset = 0;                 ///< use only this many training images (0 = all)
  int64_t image_size = 32;            ///< folder dataset: image side in pixels, [8, 512]
  double train_portion = 0.5;         ///< weight half / architecture half split
  int64_t batch_size = 128;
  AugmentOptions augment{};
  int workers = 1;                    ///< data threads preparing batches
  // Network.
  std::string space = "darts";        ///< spaces.h: darts | darts-s2..s4 | nb201 | mbv2
  double se_ratio = 0;                ///< mbv2: squeeze-excite ratio of the candidates (0 = none)
  bool swish = false;                 ///< mbv2: swish instead of ReLU in the candidates
  int64_t channels = 16;
  int64_t layers = 8;
  int64_t steps = 4;
  int64_t multiplier = 4;
  std::vector<std::string> primitives;
  double alpha_init_std = 1e-3;
  NoiseOptions noise{};
  // Weight optimiser (SGD, cosine lr per epoch).
  int64_t epochs = 50;
  double lr = 0.05, lr_min = 0.001, momentum = 0.9, weight_decay = 3e-4, grad_clip = 5.0;
  // Architecture optimiser (Adam).
  double arch_lr = 3e-4, arch_beta1 = 0.5, arch_beta2 = 0.999, arch_weight_decay = 1e-3;
  std::string order = "first";        ///< first | second
  double arch_warmup = 0;             ///< share of the epochs before the first alpha update
  MethodSettings method_settings{};
  double unrolled_xi = -1;            ///< virtual-step lr for --order second; < 0: current lr
  // Curvature analysis (hessian.h) and DARTS-ES early stop.
  int64_t hessian_every = 0;          ///< dominant Hessian eigenvalue every K epochs (0 = off)
  int64_t hessian_iters = 20;         ///< power-iteration steps
  double early_stop_ratio = 0;        ///< stop when lambda(e - window) / lambda(e) < ratio (0 = off)
  int64_t early_stop_window = 5;      ///< epochs between the two compared eigenvalues
  // Running.
  uint64_t seed = 0;
  int threads = 0;                    ///< 0 = all cores
  std::string device = "cpu";
  bool eval_valid = true;             ///< eval-mode accuracy on the architecture half each epoch
  double checkpoint_every_min = 0;    ///< also checkpoint every N minutes (0 = epoch ends only)
  int keep_checkpoints = 2;           ///< newest checkpoints kept
  int64_t max_steps = 0;              ///< stop after this many steps per epoch (0 = whole epoch)
  double dist_timeout_s = 300;        ///< data-parallel runs: longest wait for another rank

  /// Defaults of a preset (every method name of method.h) at a scale (small | paper). Throws
  /// UsageError.
  static SearchConfig preset_defaults(const std::string& preset, const std::string& scale);
  nlohmann::json to_json() const;
  /// Overrides the fields present in `j` (same keys as to_json()); unknown keys or wrong types
  /// throw ConfigError naming the key (`where` names the source, e.g. the file).
  void merge_json(const nlohmann::json& j, const std::string& where);
  /// For a space with a fixed op set (space_primitives of spaces.h): takes that set when
  /// `primitives` are still `preset_primitives` (none were given). validate() then refuses any
  /// other set for such a space.
  void apply_space(const std::vector<std::string>& preset_primitives);
  /// The last step of the layering preset -> scale -> config file -> overrides, for every front
  /// end (CLI, Python): the space's fixed op set unless the ops were overridden
  /// (apply_space with the preset's), and multiplicative noise always on an absolute scale.
  void finish_layering();
  /// Range checks; throws UsageError naming the option.
  void validate() const;
  /// What a run records as its config.json: validate(), then the dataset's default directory
  /// filled in. Reads no data, writes nothing (`search --print-config`).
  void finalize();
};

/// Reads a JSON file; ConfigError naming the file on missing/malformed content.
nlohmann::json read_json_file(const std::string& path);

/// Reads a config value into `field`, refusing what the field cannot hold: an integer outside
/// the field's range (--threads 4294967297 would become 1, --seed -1 would wrap to 2^64-1), a
/// fraction for an integer, a wrong type. Throws ConfigError "<where>: key '<key>' ...".
template <class T>
void read_config_value(const nlohmann::json& v, T& field, const std::string& key, const std::string& where);

}  // namespace noisydarts
