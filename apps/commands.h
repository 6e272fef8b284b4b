#pragma once
// Each subcommand lives in its own apps/cmd_<name>.cpp: it adds its options to `app` and sets
// `run` to the action main() calls when that subcommand was given. Actions throw the
// noisydarts::Error family; main() turns them into one stderr line and the exit code.
#include <CLI/CLI.hpp>
#include <functional>

namespace noisydarts::cli {

using Action = std::function<int()>;

void add_search_command(CLI::App& app, Action& run);
void add_train_command(CLI::App& app, Action& run);
void add_eval_command(CLI::App& app, Action& run);
void add_profile_command(CLI::App& app, Action& run);
void add_export_command(CLI::App& app, Action& run);
void add_predict_command(CLI::App& app, Action& run);
void add_report_command(CLI::App& app, Action& run);
void add_compare_command(CLI::App& app, Action& run);
void add_analyze_command(CLI::App& app, Action& run);
void add_bench_command(CLI::App& app, Action& run);
void add_launch_command(CLI::App& app, Action& run);
void add_landscape_command(CLI::App& app, Action& run);
void add_study_command(CLI::App& app, Action& run);

}  // namespace noisydarts::cli
