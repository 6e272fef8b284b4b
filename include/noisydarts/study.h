#pragma once
/// Multi-seed studies (docs/study.md): a grid of searches (settings x seeds), each a normal run
/// directory under DIR/runs/, optionally retrained and their landscape computed, summarised in
/// DIR/study.json, DIR/study.csv and DIR/report.html. This header holds what does not start
/// processes: the grid, the rows read back from the run directories, and the result files. The
/// `study` command (apps/cmd_study.cpp) runs the grid.
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace noisydarts {

struct StudySpec {
  std::vector<uint64_t> seeds;
  /// --vary key=v1,v2: a search flag (without its dashes) and its values, in the order given.
  std::vector<std::pair<std::string, std::vector<std::string>>> vary;
  std::vector<std::string> search_args;  ///< the search flags after --, common to every run
  int64_t train_epochs = 0;              ///< > 0: retrain each genotype for this many epochs
  std::vector<std::string> train_args;   ///< extra `train` flags for the retrain
  int landscape_grid = 0;                ///< > 0: landscape of each run's last checkpoint at this grid

  nlohmann::json to_json() const;
  static StudySpec from_json(const nlohmann::json& j, const std::string& where);
};

/// One search of the grid.
struct StudyRun {
  std::string setting;  ///< "key=value key=value" ("base" without --vary)
  std::string name;     ///< directory name under runs/: key-value_..._seed-S
  std::vector<std::pair<std::string, std::string>> values;
  uint64_t seed = 0;
  /// The `search` flags of a fresh run (common flags, then the setting's, then seed and out).
  std::vector<std::string> search_args(const StudySpec& spec, const std::string& run_dir) const;
};

/// "1,2,3" -> {1, 2, 3}; UsageError on anything else (empty, negative, duplicates).
std::vector<uint64_t> parse_seeds(const std::string& text);
/// "noise-lambda=0,0.1" -> {"noise-lambda", {"0", "0.1"}}; UsageError naming the option.
std::pair<std::string, std::vector<std::string>> parse_vary(const std::string& text);
/// Refuses (UsageError) a spec the study cannot run: no seeds, a key varied twice or also given
/// after --, flags the study sets itself (--out, --seed, --resume, --threads, -q).
void validate_study(const StudySpec& spec);
/// The grid: every combination of the varied values (first key slowest), times every seed.
std::vector<StudyRun> expand_study(const StudySpec& spec);

/// The row of one run, read back from its run directory: setting, seed, status, epochs, the
/// final epoch's skip counts, mean softmax weight of skip_connect per cell, supernet accuracy,
/// the last Hessian eigenvalue, genotype, search seconds (sum of the epochs' `seconds`), and
/// the retrain's test accuracy and seconds (retrain/result.json) and the landscape's centre
/// loss (landscape/landscape.json) when present. Missing numbers are null.
nlohmann::json study_row(const std::string& run_dir, const StudyRun& run);

/// Writes DIR/study.json (spec, settings, rows, per-setting means and spreads), DIR/study.csv and
/// DIR/report.html, atomically. `rows` in the order of `runs`.
void write_study_files(const std::string& dir, const StudySpec& spec, const std::vector<StudyRun>& runs,
                       const std::vector<nlohmann::json>& rows);

/// study.csv: a header line, then one line per row (RFC 4180 quoting).
std::string study_csv(const StudySpec& spec, const std::vector<nlohmann::json>& rows);

}  // namespace noisydarts
