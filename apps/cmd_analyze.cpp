// `noisydarts analyze --checkpoint X`: the dominant Hessian eigenvalue of the validation loss
// w.r.t. the alphas of a search checkpoint (hessian.h, docs/analysis.md).
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "noisydarts/error.h"
#include "noisydarts/search.h"

namespace nd = noisydarts;

namespace noisydarts::cli {

void add_analyze_command(CLI::App& app, Action& run) {
  struct State {
    std::string checkpoint;
    nd::AnalyzeOptions opt;
    bool json = false;
  };
  auto st = std::make_shared<State>();
  auto* cmd = app.add_subcommand("analyze", "Dominant Hessian eigenvalue (alphas) of a search checkpoint (docs/analysis.md)");
  cmd->add_option("-c,--checkpoint", st->checkpoint, "Search checkpoint (.pt) or run directory (its latest checkpoint)")->required();
  cmd->add_option("--iters", st->opt.iters, "Power-iteration steps (0 = the run's --hessian-iters)")->check(CLI::Range(0, 10000));
  cmd->add_option("--tol", st->opt.tol, "Relative change of the eigenvalue that ends the iteration")->check(CLI::Range(0.0, 1.0))->capture_default_str();
  cmd->add_option("--threads", st->opt.threads, "Compute threads (default: the run's)");
  cmd->add_option("--device", st->opt.device, "cpu | cuda | cuda:N (default: the run's)");
  cmd->add_flag("--json", st->json, "Print one JSON object instead of text");
  cmd->callback([st, &run] {
    run = [st] {
      const auto r = nd::analyze_checkpoint(st->checkpoint, st->opt);
      if (st->json) {
        nlohmann::json j{{"checkpoint", r.checkpoint},
                         {"epoch", r.epoch},
                         {"step", r.step},
                         {"batch_size", r.batch_size},
                         {"hessian_eigenvalue", r.eigen.eigenvalue},
                         {"iterations", r.eigen.iterations},
                         {"converged", r.eigen.converged},
                         {"genotype", nd::genotype_to_text(r.genotype)},
                         {"seconds", r.seconds}};
        std::printf("%s\n", j.dump().c_str());
      } else {
        std::printf("checkpoint          %s (epoch %lld, step %lld)\n", r.checkpoint.c_str(),
                    static_cast<long long>(r.epoch), static_cast<long long>(r.step));
        std::printf("hessian eigenvalue  %.6g (%d power iterations, %s, batch of %lld)\n", r.eigen.eigenvalue,
                    r.eigen.iterations, r.eigen.converged ? "converged" : "not converged",
                    static_cast<long long>(r.batch_size));
        std::printf("genotype            %s\n", nd::genotype_to_text(r.genotype).c_str());
      }
      return nd::kExitOk;
    };
  });
}

}  // namespace noisydarts::cli
