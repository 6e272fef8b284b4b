// `noisydarts report RUN_DIR` and `noisydarts compare RUN_A RUN_B ... [--out PAGE]`: thin wrappers
// over report.h (docs/report.md).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "noisydarts/error.h"
#include "noisydarts/report.h"

namespace nd = noisydarts;

namespace noisydarts::cli {

void add_report_command(CLI::App& app, Action& run) {
  auto dir = std::make_shared<std::string>();
  auto* cmd = app.add_subcommand("report", "Write RUN_DIR/report.html: cells, alpha evolution, curves (docs/report.md)");
  cmd->add_option("run_dir", *dir, "Run directory of a search (or train) run")->required();
  cmd->callback([dir, &run] {
    run = [dir] {
      const std::string path = nd::write_report(*dir);
      std::printf("%s\n", path.c_str());
      return nd::kExitOk;
    };
  });
}

void add_compare_command(CLI::App& app, Action& run) {
  struct State {
    std::vector<std::string> dirs;
    std::string out = "compare.html";
  };
  auto st = std::make_shared<State>();
  auto* cmd = app.add_subcommand("compare", "Compare runs: one HTML page and a text table on stdout (docs/report.md)");
  cmd->add_option("run_dirs", st->dirs, "Run directories to compare")->required()->expected(1, -1);
  cmd->add_option("-o,--out", st->out, "HTML page to write")->capture_default_str();
  cmd->callback([st, &run] {
    run = [st] {
      std::vector<nd::RunData> runs;
      for (const auto& d : st->dirs) runs.push_back(nd::load_run(d));
      nd::write_file_atomic(st->out, nd::render_compare(runs));
      std::fputs(nd::compare_table(runs).c_str(), stdout);
      std::fprintf(stderr, "wrote %s\n", st->out.c_str());
      return nd::kExitOk;
    };
  });
}

}  // namespace noisydarts::cli
