// `noisydarts landscape --checkpoint RUN|FILE`: the validation loss over a 2-D grid of alpha
// perturbations (landscape.h, docs/analysis.md). Writes landscape.json and landscape.svg.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "commands.h"
#include "noisydarts/error.h"
#include "noisydarts/landscape.h"
#include "noisydarts/report.h"

namespace nd = noisydarts;
namespace fs = std::filesystem;

namespace noisydarts::cli {

namespace {

/// The run directory a checkpoint argument belongs to: the directory itself, or for a file the
/// folder above its `checkpoints/`, else the file's folder.
fs::path run_dir_of(const std::string& checkpoint) {
  fs::path p(checkpoint);
  if (fs::is_directory(p)) return p;
  fs::path d = p.parent_path();
  if (d.filename() == "checkpoints") d = d.parent_path();
  return d.empty() ? fs::path(".") : d;
}

}  // namespace

void add_landscape_command(CLI::App& app, Action& run) {
  struct State {
    std::string checkpoint, compare, out, norm = "filter";
    nd::LandscapeOptions opt;
    bool quiet = false;
  };
  auto st = std::make_shared<State>();
  auto* cmd = app.add_subcommand("landscape", "Validation loss over a 2-D grid of alpha perturbations (docs/analysis.md)");
  cmd->add_option("-c,--checkpoint", st->checkpoint, "Search checkpoint (.pt) or run directory (its latest checkpoint)")->required();
  cmd->add_option("--grid", st->opt.grid, "Points per axis (odd, 3-201; the centre is the checkpoint's alphas)")
      ->check(CLI::Range(3, 201))->capture_default_str();
  cmd->add_option("--span", st->opt.span, "The grid covers [-span, span] along each direction")
      ->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_option("--directions", st->opt.directions, "random (per-edge normalised) | hessian (top-2 eigenvectors)")
      ->check(CLI::IsMember({"random", "hessian"}))->capture_default_str();
  cmd->add_option("--norm", st->norm, "Random directions: filter (each edge scaled to its alphas' norm) | unit (unit rows)")
      ->check(CLI::IsMember({"filter", "unit"}))->capture_default_str();
  cmd->add_option("--batches", st->opt.batches, "Architecture-half batches (fixed order) the loss is averaged over")
      ->check(CLI::Range(int64_t{1}, int64_t{100000}))->capture_default_str();
  cmd->add_option("--seed", st->opt.seed, "Seed of the random directions")->capture_default_str();
  cmd->add_option("--hessian-iters", st->opt.hessian_iters, "Power-iteration steps per eigenvector (--directions hessian)")
      ->check(CLI::Range(1, 10000))->capture_default_str();
  cmd->add_option("--compare", st->compare, "A second run (or checkpoint) drawn beside the first on the same colour scale");
  cmd->add_option("-o,--out", st->out, "Output directory (default: RUN/landscape)");
  cmd->add_option("--threads", st->opt.threads, "Compute threads (default: the run's)")->check(CLI::Range(1, 4096));
  cmd->add_option("--device", st->opt.device, "cpu | cuda | cuda:N (default: the run's)");
  cmd->add_flag("-q,--quiet", st->quiet, "No progress output");
  cmd->callback([st, &run] {
    run = [st] {
      st->opt.filter_norm = st->norm == "filter";
      const fs::path out = st->out.empty() ? run_dir_of(st->checkpoint) / "landscape" : fs::path(st->out);
      std::vector<std::string> inputs{st->checkpoint};
      if (!st->compare.empty()) inputs.push_back(st->compare);
      std::vector<nd::Landscape> panels;
      for (const auto& in : inputs) {
        auto opt = st->opt;
        if (!st->quiet)
          opt.progress = [&in](int done, int rows) {
            std::fprintf(stderr, "\rlandscape %s: row %d/%d", in.c_str(), done, rows);
            if (done == rows) std::fprintf(stderr, "\n");
            std::fflush(stderr);
          };
        panels.push_back(nd::compute_landscape(in, opt));
      }
      std::error_code ec;
      fs::create_directories(out, ec);
      if (ec) throw nd::IoError("cannot create " + out.string() + ": " + ec.message());
      nlohmann::json j{{"format", "noisydarts-landscape"}, {"version", 1}, {"panels", nlohmann::json::array()}};
      for (const auto& p : panels) j["panels"].push_back(p.to_json());
      nd::write_file_atomic((out / "landscape.json").string(), j.dump(1) + "\n");
      nd::write_file_atomic((out / "landscape.svg").string(), nd::landscape_svg(panels));
      // Written into a run directory's landscape/: its report embeds the picture now.
      const fs::path run_dir = run_dir_of(st->checkpoint);
      if (st->out.empty() && fs::exists(run_dir / "report.html")) {
        try {
          nd::write_report(run_dir.string());
        } catch (const std::exception& e) {
          std::fprintf(stderr, "warning: %s/report.html not rewritten: %s\n", run_dir.string().c_str(), e.what());
        }
      }
      for (const auto& p : panels) {
        const auto pj = p.to_json();
        std::printf("landscape  %s (epoch %lld): centre loss %.6g, minimum %.6g at a=%.4g b=%.4g, %s directions, %dx%d grid, %.1f s\n",
                    p.checkpoint.c_str(), static_cast<long long>(p.epoch), pj["center_loss"].get<double>(),
                    pj["min"]["loss"].get<double>(), pj["min"]["a"].get<double>(), pj["min"]["b"].get<double>(),
                    p.options.directions.c_str(), p.options.grid, p.options.grid, p.seconds);
      }
      std::printf("files      %s %s\n", (out / "landscape.json").string().c_str(), (out / "landscape.svg").string().c_str());
      return nd::kExitOk;
    };
  });
}

}  // namespace noisydarts::cli
