// `noisydarts train` (preset -> --config -> flags -> run_train) and `noisydarts eval`.
#include <cstdio>
#include <memory>

#include "commands.h"
#include "noisydarts/config.h"
#include "noisydarts/distributed.h"
#include "noisydarts/engine.h"
#include "noisydarts/error.h"
#include "noisydarts/train.h"

namespace nd = noisydarts;
using nlohmann::json;

namespace {

// A flag overriding one key of TrainConfig::to_json(); converted to that key's JSON type after
// parsing, so preset -> --config -> flags needs no per-field code.
struct Flag {
  std::string key, value;
  CLI::Option* opt = nullptr;
};

json convert(const json& like, const std::string& flag, const std::string& text) {
  try {
    size_t pos = 0;
    if (like.is_boolean()) {
      if (text == "true" || text == "1" || text == "on") return true;
      if (text == "false" || text == "0" || text == "off") return false;
      throw std::invalid_argument("bool");
    }
    if (like.is_number_unsigned()) {
      const unsigned long long v = std::stoull(text, &pos);
      if (pos != text.size() || text.find('-') != std::string::npos) throw std::invalid_argument("uint");
      return v;
    }
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
    return text;
  } catch (const std::exception&) {
    throw nd::UsageError(flag + ": cannot read '" + text + "' as " +
                         (like.is_boolean() ? "true/false" : like.is_number_integer() ? "an integer" : "a number"));
  }
}

}  // namespace

namespace noisydarts::cli {

void add_train_command(CLI::App& app, Action& run) {
  struct State {
    std::string preset = "default", config_file;
    bool quiet = false;
    std::string resume_dir;
    CLI::Option* resume = nullptr;
    std::vector<Flag> flags;
  };
  auto st = std::make_shared<State>();
  st->flags.reserve(64);
  auto* cmd = app.add_subcommand("train", "Train a genotype's evaluation network from scratch (SPEC 3)");
  cmd->add_option("--preset", st->preset,
                  "default (~10 min on 2 cores: Fashion-MNIST 6000-image subset, C 16, L 8, 6 epochs, 1 thread) or paper "
                  "(CIFAR-10, C 36, L 20, batch 96, lr 0.025, 600 epochs, cutout 16, drop-path 0.2, aux 0.4)")
      ->check(CLI::IsMember({"default", "paper"}))->capture_default_str();
  cmd->add_option("--config", st->config_file, "JSON config file (keys as in a run's config.json); flags override it");
  st->resume = cmd->add_option("--resume", st->resume_dir,
                               "Continue a run from its newest loadable checkpoint: --resume DIR, or --resume --out DIR")
                   ->expected(0, 1)->type_name("[DIR]");
  cmd->add_flag("-q,--quiet", st->quiet, "No progress or summary on stderr");
  auto bind = [&](const std::string& name, const std::string& key, const std::string& help) {
    st->flags.push_back({key, "", nullptr});
    st->flags.back().opt = cmd->add_option(name, st->flags.back().value, help);
    return st->flags.back().opt;
  };
  bind("-o,--out", "out", "Run directory (created; required unless --resume DIR)");
  bind("-g,--genotype", "genotype", "Built-in name (DARTS_V1, DARTS_V2, NASNet, AmoebaNet, NoisyDARTS_a, NoisyDARTS_b), a .json/.txt file, or inline text/JSON");
  bind("--dataset", "dataset", "fashion-mnist | mnist | cifar10 | cifar100 | folder (--data-dir D: D/train/<class>/*.png|jpg, D/val/<class>/...) | synthetic")
      ->check(CLI::IsMember({"fashion-mnist", "mnist", "cifar10", "cifar100", "folder", "synthetic"}));
  bind("--data-dir", "data_dir", "Dataset directory (default: the dataset's standard location)");
  bind("--image-size", "image_size", "folder dataset: resize (shorter side) and centre-crop every image to S x S pixels, 8..512 (32)");
  bind("--subset", "subset", "Use only N training images (0 = all)");
  bind("--valid-portion", "valid_portion", "Share of the training images held out for model selection (0 = none: last epoch)");
  bind("--batch-size", "batch_size", "Training batch size");
  bind("--crop-padding", "crop_padding", "Random-crop padding in pixels (0 = off)");
  bind("--flip", "flip", "Random horizontal flip (true/false)");
  bind("--cutout", "cutout", "Cutout side in pixels (0 = off)");
  bind("--workers", "workers", "Data-loading threads");
  bind("--channels", "channels", "Initial channels C (even)");
  bind("--layers", "layers", "Number of cells L (reductions at L/3 and 2L/3)");
  bind("--network", "network", "cifar | imagenet (stem and auxiliary-head layout)")->check(CLI::IsMember({"cifar", "imagenet"}));
  bind("--auxiliary", "auxiliary", "Auxiliary head after cell 2L/3 (true/false)");
  bind("--auxiliary-weight", "auxiliary_weight", "Weight of the auxiliary loss");
  bind("--drop-path", "drop_path_prob", "Final drop-path probability (grows linearly from 0)");
  bind("--init-from", "init_from", "Start from a PyTorch state dict (reference layout, torch.save)");
  bind("--epochs", "epochs", "Training epochs");
  bind("--lr", "lr", "Initial learning rate (cosine-annealed per epoch)");
  bind("--lr-min", "lr_min", "Final learning rate");
  bind("--momentum", "momentum", "SGD momentum");
  bind("--weight-decay", "weight_decay", "SGD weight decay");
  bind("--grad-clip", "grad_clip", "Gradient-norm clip");
  bind("--seed", "seed", "Random seed (split, init, augmentation, drop-path)");
  bind("--threads", "threads", "Compute threads (0 = all cores)");
  bind("--device", "device", "cpu | cuda | cuda:N");
  bind("--dist-timeout", "dist_timeout_s", "Data-parallel runs: seconds to wait for another rank before failing (exit 8)");
  bind("--max-steps", "max_steps", "Limit steps per epoch (0 = full epochs; for tests and benchmarks)");
  bind("--checkpoint-every", "checkpoint_every_min", "Also checkpoint every N minutes mid-epoch (0 = at epoch ends only)");
  bind("--keep-checkpoints", "keep_checkpoints", "Newest checkpoints kept in checkpoints/");

  cmd->callback([st, &run] {
    run = [st] {
      TrainConfig cfg = TrainConfig::preset_defaults(st->preset);
      if (!st->config_file.empty()) {
        json j = read_json_file(st->config_file);
        if (!j.is_object())
          throw ConfigError(st->config_file + ": expected a JSON object of configuration keys, got " + j.type_name());
        j.erase("preset");  // the flag's preset stays authoritative
        cfg.merge_json(j, st->config_file);
      }
      // Each flag given overrides its key; merged one by one, so a refused value names its flag.
      const json like = cfg.to_json();
      bool threads_given = false;
      for (auto& f : st->flags) {
        if (f.opt->count() == 0) continue;
        try {
          cfg.merge_json(json{{f.key, convert(like.at(f.key), f.opt->get_name(), f.value)}}, f.opt->get_name());
        } catch (const ConfigError& e) {  // a bad command-line value is a usage error
          throw UsageError(e.what());
        }
        threads_given |= f.key == "threads";
      }
      const bool resume = st->resume->count() > 0;
      if (!st->resume_dir.empty()) {
        if (!cfg.out.empty() && cfg.out != st->resume_dir)
          throw UsageError("--resume " + st->resume_dir + " and --out " + cfg.out + " name different run directories: give one");
        cfg.out = st->resume_dir;
      }
      if (resume && !threads_given) cfg.threads = -1;  // keep the run's own
      TrainCallbacks cb;
      cb.progress = !st->quiet;
      const bool quiet = st->quiet;
      cb.info = [quiet](const std::string& s) {
        if (!quiet) std::fprintf(stderr, "%s\n", s.c_str());
      };
      install_stop_handlers();  // SIGINT/SIGTERM: finish the step, checkpoint, exit 9
      const TrainResult r = run_train(cfg, resume, cb);
      if (nd::dist_env_from_environment().rank != 0) return nd::kExitOk;  // rank 0 reports
      std::printf("test top-1 %.2f%%  top-5 %.2f%%  (epoch %lld, %s)\n", r.test.top1, r.test.top5,
                  static_cast<long long>(r.best_epoch), r.best_valid_top1 >= 0 ? "selected on validation" : "last epoch");
      return kExitOk;
    };
  });
}

void add_eval_command(CLI::App& app, Action& run) {
  struct State {
    std::string checkpoint, data_dir;
    int64_t batch_size = 64;
    int threads = 0;
    bool json_out = false;
  };
  auto st = std::make_shared<State>();
  auto* cmd = app.add_subcommand("eval", "Top-1/top-5 accuracy of a trained checkpoint on its dataset's test set");
  cmd->add_option("-c,--checkpoint", st->checkpoint, "A train checkpoint (RUN/best.pt or RUN/checkpoint.pt)")->required();
  cmd->add_option("--data-dir", st->data_dir, "Dataset directory (default: the one stored in the checkpoint)");
  cmd->add_option("--batch-size", st->batch_size, "Evaluation batch size")->capture_default_str();
  cmd->add_option("--threads", st->threads, "Compute threads (0 = all cores)");
  cmd->add_flag("--json", st->json_out, "Print {\"top1\": ..., \"top5\": ..., \"loss\": ..., \"images\": ...}");
  cmd->callback([st, &run] {
    run = [st] {
      const EvalResult r = evaluate_checkpoint(st->checkpoint, st->data_dir, st->batch_size, st->threads);
      if (st->json_out) {
        std::printf("%s\n", json({{"top1", r.top1}, {"top5", r.top5}, {"loss", r.loss}, {"images", r.images}}).dump().c_str());
      } else {
        std::printf("test top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%lld images)\n", r.top1, r.top5, r.loss,
                    static_cast<long long>(r.images));
      }
      return kExitOk;
    };
  });
}

}  // namespace noisydarts::cli
