// `noisydarts search`: options -> SearchConfig (preset -> scale -> --config -> flags) -> run_search.
#include <cstdio>
#include <memory>

#include "commands.h"
#include "noisydarts/config.h"
#include "noisydarts/error.h"
#include "noisydarts/genotype.h"
#include "noisydarts/distributed.h"
#include "noisydarts/engine.h"
#include "noisydarts/search.h"

namespace nd = noisydarts;
using nlohmann::json;

namespace {

// A flag that overrides one key of the search configuration when given on the command line.
// Values are kept as text and converted to the key's JSON type after parsing, so the layering
// preset -> scale -> --config file -> flags needs no per-field code.
struct FlagBinding {
  std::string key;  // dotted path into SearchConfig::to_json()
  std::string value;
  CLI::Option* opt = nullptr;
};

json* find_key(json& root, const std::string& dotted) {
  json* cur = &root;
  size_t start = 0;
  while (true) {
    const auto dot = dotted.find('.', start);
    const auto part = dotted.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!cur->contains(part)) return nullptr;
    cur = &(*cur)[part];
    if (dot == std::string::npos) return cur;
    start = dot + 1;
  }
}

json convert_flag(const json& like, const std::string& flag, const std::string& text) {
  try {
    if (like.is_boolean()) {
      if (text == "true" || text == "1" || text == "on") return true;
      if (text == "false" || text == "0" || text == "off") return false;
      throw std::invalid_argument("bool");
    }
    size_t pos = 0;
    if (like.is_number_integer()) {
      const long long v = std::stoll(text, &pos);
      if (pos != text.size()) throw std::invalid_argument("int");
      return v;
    }
    if (like.is_number()) {
      const double v = std::stod(text, &pos);
      if (pos != text.size()) throw std::invalid_argument("float");
      return v;
    }
    if (like.is_array()) {  // comma-separated list of names
      json arr = json::array();
      size_t s = 0;
      while (s <= text.size()) {
        const auto c = text.find(',', s);
        const auto item = text.substr(s, c == std::string::npos ? std::string::npos : c - s);
        if (!item.empty()) arr.push_back(item);
        if (c == std::string::npos) break;
        s = c + 1;
      }
      return arr;
    }
    return text;
  } catch (const std::exception&) {
    throw nd::UsageError(flag + ": cannot read '" + text + "' as " +
                         (like.is_boolean() ? "true/false" : like.is_number_integer() ? "an integer" : "a number"));
  }
}

int run_search_command(const std::string& preset, const std::string& scale, const std::string& config_file,
                       std::vector<FlagBinding>& flags, bool resume, const std::string& resume_dir, bool quiet) {
  nd::SearchConfig cfg = nd::SearchConfig::preset_defaults(preset, scale);
  if (!config_file.empty()) {
    json j = nd::read_json_file(config_file);
    if (!j.is_object())
      throw nd::ConfigError(config_file + ": expected a JSON object of configuration keys, got " + j.type_name());
    // A saved config.json names its own preset/scale; the flags' choice stays authoritative.
    j.erase("preset");
    j.erase("scale");
    cfg.merge_json(j, config_file);
  }
  // Each flag given overrides its key; merged one by one, so a refused value names its flag.
  json like = cfg.to_json();
  bool threads_given = false;
  for (auto& f : flags) {
    if (f.opt->count() == 0) continue;
    json* target = find_key(like, f.key);
    json v = convert_flag(*target, f.opt->get_name(), f.value);
    json override = json::object();
    json* cur = &override;
    size_t start = 0;
    while (true) {
      const auto dot = f.key.find('.', start);
      const auto part = f.key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (dot == std::string::npos) {
        (*cur)[part] = v;
        break;
      }
      cur = &(*cur)[part];
      start = dot + 1;
    }
    try {
      cfg.merge_json(override, f.opt->get_name());
    } catch (const nd::ConfigError& e) {  // a bad command-line value is a usage error
      throw nd::UsageError(e.what());
    }
    threads_given |= f.key == "threads";
  }
  if (!resume_dir.empty()) {
    if (!cfg.out.empty() && cfg.out != resume_dir)
      throw nd::UsageError("--resume " + resume_dir + " and --out " + cfg.out + " name different run directories: give one");
    cfg.out = resume_dir;
  }
  cfg.apply_space(nd::SearchConfig::preset_defaults(preset, scale).primitives);
  if (resume && !threads_given) cfg.threads = -1;  // keep the run's own
  if (cfg.noise.mixture == nd::NoiseMixture::kMultiplicative) cfg.noise.scale = nd::NoiseScale::kAbsolute;
  nd::SearchCallbacks cb;
  cb.progress = !quiet;
  cb.info = [quiet](const std::string& s) {
    if (!quiet) std::fprintf(stderr, "%s\n", s.c_str());
  };
  nd::install_stop_handlers();  // SIGINT/SIGTERM: finish the step, checkpoint, exit 9
  const auto r = nd::run_search(cfg, resume, cb);
  if (nd::dist_env_from_environment().rank == 0) std::printf("%s\n", nd::genotype_to_text(r.genotype).c_str());
  return nd::kExitOk;
}

}  // namespace

namespace noisydarts::cli {

void add_search_command(CLI::App& app, Action& run) {
  struct State {
    std::string preset = "noisydarts", scale = "small", config_file;
    bool quiet = false;
    std::string resume_dir;
    CLI::Option* resume = nullptr;
    std::vector<FlagBinding> flags;
  };
  auto st = std::make_shared<State>();
  st->flags.reserve(64);
  auto& preset = st->preset;
  auto& scale = st->scale;
  auto& config_file = st->config_file;
  auto& quiet = st->quiet;
  auto& flags = st->flags;
  auto* search = app.add_subcommand("search", "Run a NoisyDARTS/DARTS search (DARTS cells, RobustDARTS op sets, NAS-Bench-201 or the mbv2 chain)");
  search->add_option("--preset", preset, "Method preset: noisydarts (7 ops, gaussian skip noise) or darts (8 ops, no noise)")
      ->check(CLI::IsMember({"noisydarts", "darts"}))->capture_default_str();
  search->add_option("--scale", scale, "Size: small (~10 min on 2 cores, Fashion-MNIST subset) or paper (SPEC 1.3: 50 epochs, 8 cells, 16 channels, full data)")
      ->check(CLI::IsMember({"small", "paper"}))->capture_default_str();
  search->add_option("--config", config_file, "JSON config file (keys as in a run's config.json); flags override it");
  st->resume = search->add_option("--resume", st->resume_dir,
                                  "Continue a search from its newest loadable checkpoint: --resume DIR, or --resume --out DIR")
                   ->expected(0, 1)->type_name("[DIR]");
  search->add_flag("-q,--quiet", quiet, "No progress or summary on stderr");

  auto bind = [&](const std::string& name, const std::string& key, const std::string& help) {
    flags.push_back({key, "", nullptr});
    flags.back().opt = search->add_option(name, flags.back().value, help);
    return flags.back().opt;
  };
  bind("-o,--out", "out", "Run directory (created; required unless --resume DIR)");
  bind("--dataset", "dataset", "fashion-mnist (default) | mnist | cifar10 | cifar100 | folder (--data-dir D: D/train/<class>/*.png|jpg, D/val/<class>/...) | synthetic")
      ->check(CLI::IsMember({"fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "synthetic"}));
  bind("--data-dir", "data_dir", "Dataset directory (default: the dataset's standard location)");
  bind("--image-size", "image_size", "folder dataset: resize (shorter side) and centre-crop every image to S x S pixels, 8..512 (32)");
  bind("--subset", "subset", "Use only N training images (0 = all; small scale: 2000)");
  bind("--train-portion", "train_portion", "Share of the training images in the weight half (0.5)");
  bind("--epochs", "epochs", "Search epochs");
  bind("--batch-size", "batch_size", "Batch size of both halves");
  bind("--space", "space", "Search space: darts (default) | darts-s2 | darts-s3 | darts-s4 (RobustDARTS op sets) | nb201 (NAS-Bench-201) | mbv2 (MobileNetV2-like chain); docs/spaces.md")
      ->check(CLI::IsMember({"darts", "darts-s2", "darts-s3", "darts-s4", "nb201", "mbv2"}));
  bind("--channels", "channels", "Initial channels C (even; nb201: the stem's C; mbv2: unused)");
  bind("--layers", "layers", "Number of cells L (reductions at L/3 and 2L/3; nb201: cells per stage N; mbv2: unused)");
  bind("--ops", "primitives", "Comma-separated candidate ops (default: the preset's; fixed by --space other than darts)");
  bind("--se-ratio", "se_ratio", "mbv2: squeeze-excite ratio of the candidate blocks (0 = none; NoisyDARTS-A: 0.25)");
  bind("--swish", "swish", "mbv2: swish activation in the candidate blocks (true/false)");
  bind("--seed", "seed", "Random seed (data split, init, noise)");
  bind("--noise", "noise.type", "gaussian | uniform | none")->check(CLI::IsMember({"gaussian", "uniform", "none"}));
  bind("--noise-lambda", "noise.lambda", "Noise std factor (relative) or std (absolute)");
  bind("--noise-mean", "noise.mean", "Noise mean mu");
  bind("--noise-mixture", "noise.mixture", "additive | multiplicative")->check(CLI::IsMember({"additive", "multiplicative"}));
  bind("--noise-scale", "noise.scale", "relative (sigma = lambda*std(x)) | absolute (sigma = lambda)")->check(CLI::IsMember({"relative", "absolute"}));
  bind("--noise-decay", "noise.decay", "none | cosine (scale the noise by (1+cos(pi*epoch/T))/2)")->check(CLI::IsMember({"none", "cosine"}));
  bind("--noise-ops", "noise.ops", "Comma-separated ops that get the noise (default skip_connect)");
  bind("--skip-drop-path", "noise.skip_drop_path", "Drop-path probability on the skip branch during search");
  bind("--lr", "lr", "Initial weight learning rate (cosine-annealed per epoch)");
  bind("--lr-min", "lr_min", "Final weight learning rate");
  bind("--momentum", "momentum", "SGD momentum");
  bind("--weight-decay", "weight_decay", "SGD weight decay");
  bind("--grad-clip", "grad_clip", "Gradient-norm clip of the weight step");
  bind("--arch-lr", "arch_lr", "Adam learning rate of the alphas");
  bind("--arch-weight-decay", "arch_weight_decay", "Adam weight decay of the alphas");
  bind("--order", "order", "Architecture gradient: first | second (unrolled, SPEC 1.1)")->check(CLI::IsMember({"first", "second"}));
  bind("--unrolled-xi", "unrolled_xi", "Virtual-step size of --order second (< 0: the current weight lr)");
  bind("--hessian-every", "hessian_every", "Log the dominant Hessian eigenvalue of the validation loss w.r.t. the alphas every K epochs (0 = off)");
  bind("--hessian-iters", "hessian_iters", "Power-iteration steps of the eigenvalue");
  bind("--early-stop", "early_stop_ratio", "DARTS-ES: stop when lambda(e - window) / lambda(e) < R and keep the genotype of epoch e - window (0 = off; paper: 0.75)");
  bind("--early-stop-window", "early_stop_window", "Epochs between the compared eigenvalues (paper: 5)");
  bind("--cutout", "augment.cutout", "Cutout side in pixels (0 = off)");
  bind("--crop-padding", "augment.crop_padding", "Random-crop padding in pixels (0 = off)");
  bind("--flip", "augment.flip", "Random horizontal flip (true/false)");
  bind("--threads", "threads", "Compute threads (0 = all cores)");
  bind("--workers", "workers", "Data-loading threads");
  bind("--device", "device", "cpu | cuda | cuda:N");
  bind("--eval-valid", "eval_valid", "Eval-mode accuracy on the architecture half each epoch (true/false)");
  bind("--checkpoint-every", "checkpoint_every_min", "Also checkpoint every N minutes (0 = at epoch ends only)");
  bind("--keep-checkpoints", "keep_checkpoints", "Newest checkpoints kept");
  bind("--dist-timeout", "dist_timeout_s", "Data-parallel runs: seconds to wait for another rank before failing (exit 8)");
  bind("--max-steps", "max_steps", "Limit steps per epoch (0 = full epochs; for tests and benchmarks)");

  search->callback([st, &run] {
    run = [st] { return run_search_command(st->preset, st->scale, st->config_file, st->flags, st->resume->count() > 0,
                                         st->resume_dir, st->quiet); };
  });
}

}  // namespace noisydarts::cli
