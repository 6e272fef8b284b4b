// `noisydarts search`: options -> SearchConfig (preset -> scale -> --config -> flags) -> run_search.
#include <cstdio>
#include <memory>

#include "commands.h"
#include "config_flags.h"
#include "noisydarts/config.h"
#include "noisydarts/distributed.h"
#include "noisydarts/engine.h"
#include "noisydarts/error.h"
#include "noisydarts/genotype.h"
#include "noisydarts/method.h"
#include "noisydarts/search.h"
#include "noisydarts/spaces.h"

namespace nd = noisydarts;
using nlohmann::json;

namespace noisydarts::cli {

namespace {

struct SearchArgs {
  std::string preset = "noisydarts", scale = "small", method;
  CLI::Option* preset_opt = nullptr;
  RunOptions run;
  std::unique_ptr<ConfigFlags> flags;
};

/// The configuration the command line describes: preset -> scale -> --config file -> flags.
SearchConfig resolve_config(const SearchArgs& a, bool resume) {
  // --method M alone means --preset M: the method's own search recipe.
  const std::string preset = a.preset_opt->count() == 0 && !a.method.empty() ? a.method : a.preset;
  SearchConfig cfg = SearchConfig::preset_defaults(preset, a.scale);
  // A saved config.json names its own preset/scale; the flags' choice stays authoritative.
  cfg.merge_json(a.run.config_overrides(), a.run.config_file);
  a.flags->apply([&](const json& o, const std::string& flag) { cfg.merge_json(o, flag); });
  if (!a.method.empty()) cfg.method = a.method;
  a.run.resolve_out(cfg.out);
  cfg.finish_layering();
  if (resume && !a.flags->given("threads")) cfg.threads = -1;  // keep the run's own
  return cfg;
}

int run_search_command(const SearchArgs& a) {
  const bool resume = a.run.resuming();
  SearchConfig cfg = resolve_config(a, resume);
  if (a.run.print_config) {
    // What config.json of a new run with these flags holds; touches neither data nor disk.
    cfg.finalize();
    a.run.print(cfg.to_json());
    return kExitOk;
  }
  SearchCallbacks cb;
  cb.progress = !a.run.quiet;
  cb.info = a.run.info();
  install_stop_handlers();  // SIGINT/SIGTERM: finish the step, checkpoint, exit 9
  const auto r = run_search(cfg, resume, cb);
  if (dist_env_from_environment().rank == 0) std::printf("%s\n", genotype_to_text(r.genotype).c_str());
  return kExitOk;
}

/// The --help lines of what each method's preset changes from the shown defaults.
std::string method_differences(const ConfigFlags& flags) {
  std::string s;
  for (const auto& m : nd::method_names()) {
    if (m == "noisydarts") continue;
    s += flags.differences(std::string(m == "darts" ? "--preset darts" : "--method " + m) + " changes",
                           SearchConfig::preset_defaults(m, "small").to_json());
  }
  return s;
}

}  // namespace

void add_search_command(CLI::App& app, Action& run) {
  auto st = std::make_shared<SearchArgs>();
  auto* search = app.add_subcommand("search", "Run a NoisyDARTS/DARTS search (DARTS cells, RobustDARTS op sets, NAS-Bench-201 or the mbv2 chain)");
  st->preset_opt = search->add_option("--preset", st->preset, "Search recipe (weight and arch optimisers, ops, noise, batch) of a method's paper: noisydarts (7 ops, gaussian skip noise), darts (8 ops, no noise) or any --method name")
      ->check(CLI::IsMember(nd::method_names()))->capture_default_str();
  search->add_option("--method", st->method, "Search algorithm (docs/methods.md): " + nd::join_names(nd::method_names()) +
                                                 ". Alone it also picks its recipe (--preset M); the noise flags combine with every method")
      ->check(CLI::IsMember(nd::method_names()))->type_name("METHOD");
  search->add_option("--scale", st->scale, "Size: small (~7 min on 2 cores, Fashion-MNIST subset, arch lr 3e-2) or paper (SPEC 1.3: 50 epochs, 8 cells, 16 channels, full data)")
      ->check(CLI::IsMember({"small", "paper"}))->capture_default_str();
  st->run.add(search, "search");

  const json shown = SearchConfig::preset_defaults("noisydarts", "small").to_json();
  st->flags = std::make_unique<ConfigFlags>(search, shown);
  ConfigFlags& flags = *st->flags;
  flags.bind("-o,--out", "out", "Run directory (created; required unless --resume DIR)");
  flags.bind("--dataset", "dataset", "fashion-mnist (default) | mnist | cifar10 | cifar100 | folder (--data-dir D: D/train/<class>/*.png|jpg, D/val/<class>/...) | synthetic")
      ->check(CLI::IsMember({"fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "synthetic"}));
  flags.bind("--data-dir", "data_dir", "Dataset directory (default: the dataset's standard location)");
  flags.bind("--image-size", "image_size", "folder dataset: resize (shorter side) and centre-crop every image to S x S pixels, 8..512")->check(CLI::Range(8, 512));
  flags.bind("--subset", "subset", "Use only N training images (0 = all)")->check(CLI::NonNegativeNumber);
  flags.bind("--train-portion", "train_portion", "Share of the training images in the weight half")->check(CLI::Range(0.0, 1.0));
  flags.bind("--epochs", "epochs", "Search epochs")->check(at_least(1));
  flags.bind("--batch-size", "batch_size", "Batch size of both halves")->check(at_least(2));
  flags.bind("--space", "space", "Search space: darts (default) | darts-s1 .. darts-s4 (RobustDARTS op sets) | nb201 (NAS-Bench-201) | mbv2 (MobileNetV2-like chain); docs/spaces.md")
      ->check(CLI::IsMember(nd::search_space_names()));
  flags.bind("--channels", "channels", "Initial channels C (even; nb201: the stem's C; mbv2: unused)")->check(CLI::Range(2, 1024));
  flags.bind("--layers", "layers", "Number of cells L (reductions at L/3 and 2L/3; nb201: cells per stage N; mbv2: unused)")->check(CLI::Range(1, 100));
  flags.bind("--ops", "primitives", "Comma-separated candidate ops (default: the preset's; fixed by --space other than darts)");
  flags.bind("--se-ratio", "se_ratio", "mbv2: squeeze-excite ratio of the candidate blocks (0 = none; NoisyDARTS-A: 0.25)")->check(CLI::Range(0.0, 1.0));
  flags.bind("--swish", "swish", "mbv2: swish activation in the candidate blocks (true/false)");
  flags.bind("--seed", "seed", "Random seed (data split, init, noise)");
  flags.bind("--noise", "noise.type", "gaussian | uniform | none")->check(CLI::IsMember({"gaussian", "uniform", "none"}));
  flags.bind("--noise-lambda", "noise.lambda", "Noise std factor (relative) or std (absolute)")->check(CLI::NonNegativeNumber);
  flags.bind("--noise-mean", "noise.mean", "Noise mean mu");
  flags.bind("--noise-mixture", "noise.mixture", "additive | multiplicative")->check(CLI::IsMember({"additive", "multiplicative"}));
  flags.bind("--noise-scale", "noise.scale", "relative (sigma = lambda*std(x)) | absolute (sigma = lambda)")->check(CLI::IsMember({"relative", "absolute"}));
  flags.bind("--noise-decay", "noise.decay", "none | cosine (scale the noise by (1+cos(pi*epoch/T))/2)")->check(CLI::IsMember({"none", "cosine"}));
  flags.bind("--noise-ops", "noise.ops", "Comma-separated ops that get the noise (default skip_connect)");
  flags.bind("--skip-drop-path", "noise.skip_drop_path", "Drop-path probability on the skip branch during search")->check(CLI::Range(0.0, 1.0));
  flags.bind("--lr", "lr", "Initial weight learning rate (cosine-annealed per epoch)")->check(CLI::PositiveNumber);
  flags.bind("--lr-min", "lr_min", "Final weight learning rate")->check(CLI::NonNegativeNumber);
  flags.bind("--momentum", "momentum", "SGD momentum")->check(CLI::Range(0.0, 1.0));
  flags.bind("--weight-decay", "weight_decay", "SGD weight decay")->check(CLI::NonNegativeNumber);
  flags.bind("--grad-clip", "grad_clip", "Gradient-norm clip of the weight step")->check(CLI::PositiveNumber);
  flags.bind("--arch-lr", "arch_lr", "Adam learning rate of the alphas")->check(CLI::NonNegativeNumber);
  flags.bind("--arch-weight-decay", "arch_weight_decay", "Adam weight decay of the alphas")->check(CLI::NonNegativeNumber);
  flags.bind("--order", "order", "Architecture gradient: first | second (unrolled, SPEC 1.1)")->check(CLI::IsMember({"first", "second"}));
  flags.bind("--unrolled-xi", "unrolled_xi", "Virtual-step size of --order second (< 0: the current weight lr)");
  flags.bind("--hessian-every", "hessian_every", "Log the dominant Hessian eigenvalue of the validation loss w.r.t. the alphas every K epochs (0 = off)")->check(CLI::NonNegativeNumber);
  flags.bind("--hessian-iters", "hessian_iters", "Power-iteration steps of the eigenvalue")->check(CLI::Range(1, 10000));
  flags.bind("--early-stop", "early_stop_ratio", "DARTS-ES: stop when lambda(e - window) / lambda(e) < R and keep the genotype of epoch e - window (0 = off; paper: 0.75)")->check(CLI::Range(0.0, 1.0));
  flags.bind("--early-stop-window", "early_stop_window", "Epochs between the compared eigenvalues (paper: 5)")->check(at_least(1));
  flags.bind("--cutout", "augment.cutout", "Cutout side in pixels (0 = off)")->check(CLI::NonNegativeNumber);
  flags.bind("--crop-padding", "augment.crop_padding", "Random-crop padding in pixels (0 = off)")->check(CLI::NonNegativeNumber);
  flags.bind("--flip", "augment.flip", "Random horizontal flip (true/false)");
  flags.bind("--threads", "threads", "Compute threads (0 = all cores)")->check(CLI::Range(0, 256));
  flags.bind("--workers", "workers", "Data-loading threads")->check(CLI::Range(1, 64));
  flags.bind("--device", "device", "cpu | cuda | cuda:N");
  flags.bind("--eval-valid", "eval_valid", "Eval-mode accuracy on the architecture half each epoch (true/false)");
  flags.bind("--checkpoint-every", "checkpoint_every_min", "Also checkpoint every N minutes (0 = at epoch ends only)")->check(CLI::NonNegativeNumber);
  flags.bind("--keep-checkpoints", "keep_checkpoints", "Newest checkpoints kept")->check(CLI::Range(1, 1000000));
  flags.bind("--dist-timeout", "dist_timeout_s", "Data-parallel runs: seconds to wait for another rank before failing (exit 8)")->check(CLI::PositiveNumber);
  flags.bind("--max-steps", "max_steps", "Limit steps per epoch (0 = full epochs; for tests and benchmarks)")->check(CLI::NonNegativeNumber);
  // The methods' settings (docs/methods.md); each method reads only its own.
  flags.bind("--arch-warmup", "arch_warmup", "Share of the epochs before the first alpha update (pc-darts: 0.3 = epoch 15 of 50)")->check(CLI::Range(0.0, 1.0));
  flags.bind("--fair-zero-one-weight", "method_settings.fair_darts.zero_one_weight", "fair-darts: weight of the zero-one loss")->check(CLI::NonNegativeNumber);
  flags.bind("--fair-threshold", "method_settings.fair_darts.threshold", "fair-darts: sigmoid threshold of a kept op")->check(CLI::Range(0.0, 1.0));
  flags.bind("--pc-k", "method_settings.pc_darts.k", "pc-darts: 1/K of the channels go through each mixed op")->check(CLI::Range(1, 64));
  flags.bind("--pc-edge-norm", "method_settings.pc_darts.edge_norm", "pc-darts: edge normalisation (true/false)");
  flags.bind("--sdarts-epsilon-start", "method_settings.sdarts.epsilon_start", "sdarts-rs/-adv: perturbation radius at the start")->check(CLI::Range(0.0, 1.0));
  flags.bind("--sdarts-epsilon-end", "method_settings.sdarts.epsilon_end", "sdarts-rs/-adv: radius the linear ramp heads to")->check(CLI::Range(0.0, 1.0));
  flags.bind("--sdarts-attack-steps", "method_settings.sdarts.attack_steps", "sdarts-adv: PGD steps per weight step")->check(CLI::Range(1, 100));
  flags.bind("--dminus-beta-start", "method_settings.darts_minus.beta_start", "darts-minus: auxiliary-skip coefficient at the start");
  flags.bind("--dminus-beta-end", "method_settings.darts_minus.beta_end", "darts-minus: coefficient the linear decay heads to");
  flags.bind("--beta-lambda-start", "method_settings.beta_darts.lambda_start", "beta-darts: regulariser weight at the start")->check(CLI::NonNegativeNumber);
  flags.bind("--beta-lambda-end", "method_settings.beta_darts.lambda_end", "beta-darts: weight the linear ramp heads to")->check(CLI::NonNegativeNumber);
  flags.bind("--gdas-tau-start", "method_settings.gdas.tau_start", "gdas: Gumbel-softmax temperature at the first epoch")->check(CLI::PositiveNumber);
  flags.bind("--gdas-tau-end", "method_settings.gdas.tau_end", "gdas: temperature at the last epoch")->check(CLI::PositiveNumber);
  flags.bind("--drnas-reg", "method_settings.drnas.reg", "drnas: l2 (the arch weight decay) | kl (KL to Dirichlet(1))")->check(CLI::IsMember({"l2", "kl"}));
  flags.bind("--drnas-reg-weight", "method_settings.drnas.reg_weight", "drnas: weight of the KL regulariser")->check(CLI::NonNegativeNumber);


  search->footer(
      "Defaults shown are those of --preset noisydarts --scale small. Layering: preset -> scale -> --config -> "
      "the flags given (each overrides only its key).\n" +
      method_differences(flags) +
      flags.differences("--scale paper changes", SearchConfig::preset_defaults("noisydarts", "paper").to_json()));
  search->callback([st, &run] {
    run = [st] { return run_search_command(*st); };
  });
}

}  // namespace noisydarts::cli
