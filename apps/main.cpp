// noisydarts command-line tool: parses options and calls the library. Every failure ends as one
// line on stderr and a documented exit code (docs/cli.md).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>

#include "commands.h"
#include "noisydarts/error.h"

namespace nd = noisydarts;

namespace {
// First line of a message: errors are reported as exactly one line.
std::string first_line(const std::string& s) {
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"noisydarts: NoisyDARTS differentiable architecture search in C++ (LibTorch)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "noisydarts 0.1.0");
  nd::cli::Action run;
  nd::cli::add_search_command(app, run);
  nd::cli::add_train_command(app, run);
  nd::cli::add_eval_command(app, run);
  nd::cli::add_profile_command(app, run);
  nd::cli::add_export_command(app, run);
  nd::cli::add_predict_command(app, run);
  nd::cli::add_report_command(app, run);
  nd::cli::add_compare_command(app, run);
  nd::cli::add_analyze_command(app, run);
  nd::cli::add_bench_command(app, run);
  nd::cli::add_launch_command(app, run);
  nd::cli::add_landscape_command(app, run);
  nd::cli::add_study_command(app, run);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    if (app.get_subcommands().empty() && argc > 1 && argv[1][0] != '-') {
      std::string names;
      for (const auto* sub : app.get_subcommands(std::function<bool(CLI::App*)>{})) names += (names.empty() ? "" : ", ") + sub->get_name();
      std::fprintf(stderr, "noisydarts: unknown command '%s' (commands: %s; see --help)\n", argv[1], names.c_str());
      return nd::kExitUsage;
    }
    std::fprintf(stderr, "noisydarts: %s (see --help)\n", first_line(e.what()).c_str());
    return nd::kExitUsage;
  } catch (const nd::Error& e) {
    std::fprintf(stderr, "noisydarts: error: %s\n", first_line(e.what()).c_str());
    return e.code();
  }

  try {
    return run ? run() : nd::kExitOk;
  } catch (const nd::StoppedError& e) {  // a graceful stop is not a failure: say how to continue
    std::fprintf(stderr, "noisydarts: %s\n", first_line(e.what()).c_str());
    return e.code();
  } catch (const nd::Error& e) {
    std::fprintf(stderr, "noisydarts: error: %s\n", first_line(e.what()).c_str());
    return e.code();
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "noisydarts: error: %s\n", first_line(e.what_without_backtrace()).c_str());
    return nd::kExitUsage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "noisydarts: internal error: %s\n", first_line(e.what()).c_str());
    return nd::kExitFailure;
  }
}
