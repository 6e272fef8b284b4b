// `noisydarts profile`: parameters and multiply-adds of a genotype's evaluation network.
#include <cstdio>
#include <memory>

#include "commands.h"
#include "noisydarts/data.h"
#include "noisydarts/error.h"
#include "noisydarts/genotype.h"
#include "noisydarts/profile.h"

namespace noisydarts::cli {

void add_profile_command(CLI::App& app, Action& run) {
  struct State {
    std::string genotype, dataset = "cifar10", network;
    int64_t channels = 0, layers = 0, classes = 0;
    bool json_out = false;
  };
  auto st = std::make_shared<State>();
  auto* cmd = app.add_subcommand("profile", "Parameters (auxiliary head excluded) and conv+linear multiply-adds of a genotype's network for one image");
  cmd->add_option("-g,--genotype", st->genotype, "Built-in name, .json/.txt file, or inline text/JSON")->required();
  cmd->add_option("--channels", st->channels, "Initial channels C (default 36; imagenet network 48; nb201 16; mbv2: unused)");
  cmd->add_option("--layers", st->layers, "Number of cells L (default 20; imagenet network 14; nb201: cells per stage N, default 5; mbv2: unused)");
  cmd->add_option("--dataset", st->dataset, "Input shape of: cifar10 | cifar100 | fashion-mnist | mnist | synthetic | imagenet (no data is read)")
      ->capture_default_str();
  cmd->add_option("--classes", st->classes, "Override the number of classes");
  cmd->add_option("--network", st->network, "cifar | imagenet (default: imagenet for --dataset imagenet, else cifar)")
      ->check(CLI::IsMember({"cifar", "imagenet"}));
  cmd->add_flag("--json", st->json_out, "Print {\"params\": N, \"macs\": M}");
  cmd->callback([st, &run] {
    run = [st] {
      DataShape shape = dataset_shape(st->dataset);
      if (st->classes > 0) shape.classes = st->classes;
      const std::string network = !st->network.empty() ? st->network : st->dataset == "imagenet" ? "imagenet" : "cifar";
      const EvalStyle style = parse_eval_style(network);
      const Genotype g = resolve_genotype(st->genotype);
      const auto size = default_eval_size(g, style);
      const int64_t c = st->channels > 0 ? st->channels : size.first;
      const int64_t l = st->layers > 0 ? st->layers : size.second;
      ModelProfile p;
      try {
        p = profile_genotype(g, c, l, shape, style);
      } catch (const c10::Error& e) {
        throw UsageError("cannot build this network for a " + std::to_string(shape.height) + "x" +
                         std::to_string(shape.width) + " input: " + e.what_without_backtrace());
      }
      if (st->json_out) {
        std::printf("{\"params\": %lld, \"macs\": %lld}\n", static_cast<long long>(p.params), static_cast<long long>(p.macs));
      } else {
        const std::string kind = g.space == "darts" ? network + " network" : g.space == "nb201" ? "NAS-Bench-201 network" : "mbv2 chain (" + network + " stem)";
        std::printf("%s, %s, input %lldx%lldx%lld, %lld classes\n", kind.c_str(),
                    eval_size_text(g, {c, l}).c_str(), static_cast<long long>(shape.channels),
                    static_cast<long long>(shape.height), static_cast<long long>(shape.width),
                    static_cast<long long>(shape.classes));
        std::printf("params  %lld (%.3f M, auxiliary head excluded)\n", static_cast<long long>(p.params), p.params / 1e6);
        std::printf("macs    %lld (%.1f M conv+linear multiply-adds per image)\n", static_cast<long long>(p.macs), p.macs / 1e6);
      }
      return kExitOk;
    };
  });
}

}  // namespace noisydarts::cli
