// `noisydarts train` (preset -> --config -> flags -> run_train) and `noisydarts eval`.
#include <cstdio>
#include <memory>

#include "commands.h"
#include "config_flags.h"
#include "noisydarts/config.h"
#include "noisydarts/distributed.h"
#include "noisydarts/engine.h"
#include "noisydarts/error.h"
#include "noisydarts/train.h"

namespace nd = noisydarts;
using nlohmann::json;

namespace noisydarts::cli {

namespace {

struct TrainArgs {
  std::string preset = "default";
  RunOptions run;
  std::unique_ptr<ConfigFlags> flags;
};

int run_train_command(const TrainArgs& a) {
  TrainConfig cfg = TrainConfig::preset_defaults(a.preset);
  cfg.merge_json(a.run.config_overrides(), a.run.config_file);  // the flag's preset stays authoritative
  a.flags->apply([&](const json& o, const std::string& flag) { cfg.merge_json(o, flag); });
  const bool resume = a.run.resuming();
  a.run.resolve_out(cfg.out);
  if (a.run.print_config) {
    // What config.json of a new run with these flags holds; touches neither data nor disk.
    cfg.finalize();
    a.run.print(cfg.to_json());
    return kExitOk;
  }
  if (resume && !a.flags->given("threads")) cfg.threads = -1;  // keep the run's own
  TrainCallbacks cb;
  cb.progress = !a.run.quiet;
  cb.info = a.run.info();
  install_stop_handlers();  // SIGINT/SIGTERM: finish the step, checkpoint, exit 9
  const TrainResult r = run_train(cfg, resume, cb);
  if (dist_env_from_environment().rank != 0) return kExitOk;  // rank 0 reports
  std::printf("test top-1 %.2f%%  top-5 %.2f%%  (epoch %lld, %s)\n", r.test.top1, r.test.top5,
              static_cast<long long>(r.best_epoch), r.best_valid_top1 >= 0 ? "selected on validation" : "last epoch");
  return kExitOk;
}

}  // namespace

void add_train_command(CLI::App& app, Action& run) {
  auto st = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand("train", "Train a genotype's evaluation network from scratch (SPEC 3)");
  cmd->add_option("--preset", st->preset,
                  "default (~10 min on 2 cores: Fashion-MNIST 6000-image subset, C 16, L 8, 6 epochs, 1 thread) or paper "
                  "(CIFAR-10, C 36, L 20, batch 96, lr 0.025, 600 epochs, cutout 16, drop-path 0.2, aux 0.4)")
      ->check(CLI::IsMember({"default", "paper"}))->capture_default_str();
  st->run.add(cmd, "run");
  st->flags = std::make_unique<ConfigFlags>(cmd, TrainConfig::preset_defaults("default").to_json());
  ConfigFlags& flags = *st->flags;
  flags.bind("-o,--out", "out", "Run directory (created; required unless --resume DIR)");
  flags.bind("-g,--genotype", "genotype", "Built-in name (DARTS_V1, DARTS_V2, NASNet, AmoebaNet, NoisyDARTS_a, NoisyDARTS_b), a .json/.txt file, or inline text/JSON");
  flags.bind("--dataset", "dataset", "fashion-mnist | mnist | cifar10 | cifar100 | folder (--data-dir D: D/train/<class>/*.png|jpg, D/val/<class>/...) | synthetic")
      ->check(CLI::IsMember({"fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "synthetic"}));
  flags.bind("--data-dir", "data_dir", "Dataset directory (default: the dataset's standard location)");
  flags.bind("--image-size", "image_size", "folder dataset: resize (shorter side) and centre-crop every image to S x S pixels, 8..512 (32)")->check(CLI::Range(8, 512));
  flags.bind("--subset", "subset", "Use only N training images (0 = all)")->check(CLI::NonNegativeNumber);
  flags.bind("--valid-portion", "valid_portion", "Share of the training images held out for model selection (0 = none: last epoch)")->check(CLI::Range(0.0, 1.0));
  flags.bind("--batch-size", "batch_size", "Training batch size")->check(at_least(1));
  flags.bind("--crop-padding", "crop_padding", "Random-crop padding in pixels (0 = off)")->check(CLI::NonNegativeNumber);
  flags.bind("--flip", "flip", "Random horizontal flip (true/false)");
  flags.bind("--cutout", "cutout", "Cutout side in pixels (0 = off)")->check(CLI::NonNegativeNumber);
  flags.bind("--workers", "workers", "Data-loading threads")->check(CLI::PositiveNumber);
  flags.bind("--channels", "channels", "Initial channels C (even)")->check(CLI::Range(2, 1024));
  flags.bind("--layers", "layers", "Number of cells L (reductions at L/3 and 2L/3)")->check(CLI::Range(1, 100));
  flags.bind("--network", "network", "cifar | imagenet (stem and auxiliary-head layout)")->check(CLI::IsMember({"cifar", "imagenet"}));
  flags.bind("--auxiliary", "auxiliary", "Auxiliary head after cell 2L/3 (true/false)");
  flags.bind("--auxiliary-weight", "auxiliary_weight", "Weight of the auxiliary loss")->check(CLI::NonNegativeNumber);
  flags.bind("--drop-path", "drop_path_prob", "Final drop-path probability (grows linearly from 0)")->check(CLI::Range(0.0, 1.0));
  flags.bind("--init-from", "init_from", "Start from a PyTorch state dict (reference layout, torch.save)");
  flags.bind("--epochs", "epochs", "Training epochs")->check(at_least(1));
  flags.bind("--lr", "lr", "Initial learning rate (cosine-annealed per epoch)")->check(CLI::PositiveNumber);
  flags.bind("--lr-min", "lr_min", "Final learning rate")->check(CLI::NonNegativeNumber);
  flags.bind("--momentum", "momentum", "SGD momentum")->check(CLI::Range(0.0, 1.0));
  flags.bind("--weight-decay", "weight_decay", "SGD weight decay")->check(CLI::NonNegativeNumber);
  flags.bind("--grad-clip", "grad_clip", "Gradient-norm clip")->check(CLI::PositiveNumber);
  flags.bind("--seed", "seed", "Random seed (split, init, augmentation, drop-path)");
  flags.bind("--threads", "threads", "Compute threads (0 = all cores)")->check(CLI::Range(0, 256));
  flags.bind("--device", "device", "cpu | cuda | cuda:N");
  flags.bind("--dist-timeout", "dist_timeout_s", "Data-parallel runs: seconds to wait for another rank before failing (exit 8)")->check(CLI::PositiveNumber);
  flags.bind("--max-steps", "max_steps", "Limit steps per epoch (0 = full epochs; for tests and benchmarks)")->check(CLI::NonNegativeNumber);
  flags.bind("--checkpoint-every", "checkpoint_every_min", "Also checkpoint every N minutes mid-epoch (0 = at epoch ends only)")->check(CLI::NonNegativeNumber);
  flags.bind("--keep-checkpoints", "keep_checkpoints", "Newest checkpoints kept in checkpoints/")->check(CLI::Range(1, 1000000));

  cmd->footer("Defaults shown are those of --preset default. Layering: preset -> --config -> the flags given (each "
              "overrides only its key).\n" +
              flags.differences("--preset paper changes", TrainConfig::preset_defaults("paper").to_json()));
  cmd->callback([st, &run] {
    run = [st] { return run_train_command(*st); };
  });
}

void add_eval_command(CLI::App& app, Action& run) {
  struct State {
    std::string checkpoint, data_dir;
    int64_t batch_size = 64;
    int threads = 0;
    bool json_out = false;
    std::string precision = "fp32";
  };
  auto st = std::make_shared<State>();
  auto* cmd = app.add_subcommand("eval", "Top-1/top-5 accuracy of a trained checkpoint on its dataset's test set");
  cmd->add_option("-c,--checkpoint", st->checkpoint, "A train checkpoint (RUN/best.pt or RUN/checkpoint.pt)")->required();
  cmd->add_option("--data-dir", st->data_dir, "Dataset directory (default: the one stored in the checkpoint)");
  cmd->add_option("--batch-size", st->batch_size, "Evaluation batch size")->capture_default_str();
  cmd->add_option("--threads", st->threads, "Compute threads (0 = all cores)");
  add_precision_option(cmd, st->precision);
  cmd->add_flag("--json", st->json_out, "Print {\"top1\": ..., \"top5\": ..., \"loss\": ..., \"images\": ..., \"precision\": ...}");
  cmd->callback([st, &run] {
    run = [st] {
      const EvalResult r = evaluate_checkpoint(st->checkpoint, st->data_dir, st->batch_size, st->threads,
                                               parse_precision(st->precision));
      if (st->json_out) {
        std::printf("%s\n", json({{"top1", r.top1}, {"top5", r.top5}, {"loss", r.loss}, {"images", r.images},
                                  {"precision", st->precision}}).dump().c_str());
      } else {
        std::printf("test top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%lld images)\n", r.top1, r.top5, r.loss,
                    static_cast<long long>(r.images));
      }
      return kExitOk;
    };
  });
}

}  // namespace noisydarts::cli
