#pragma once
/// HTML reports of run directories (SPEC 5, docs/report.md): `report.html` with the derived
/// cells, the softmax(alpha) evolution of every op on every edge, loss/accuracy curves, skip
/// connection counts, noise scale, Hessian eigenvalue (when recorded) and timings; and a page plus
/// a text table comparing several runs.
///
/// The page is well-formed XHTML with inline SVG: no scripts, no network, one file. Every plotted
/// line carries its exact values (`data-x`, `data-values`, printed as in metrics.jsonl) and every
/// plot its axis mapping (`data-area`, `data-x-range`, `data-y-range`), and all plotted series are
/// also in `<script type="application/json" id="report-data">`, so tools and tests can check that
/// the pictures show the recorded numbers.
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace noisydarts {

/// Everything a report reads from one run directory.
struct RunData {
  std::string dir;                    ///< the run directory as given
  std::string label;                  ///< short name (directory name) used in tables and legends
  nlohmann::json config;              ///< config.json, or an empty object when absent
  std::vector<nlohmann::json> epochs; ///< metrics.jsonl, one object per completed epoch
  nlohmann::json genotype;            ///< genotype.json, or null when absent (run not finished)
  std::string normal_svg, reduce_svg; ///< Graphviz cell diagrams (normal.svg/reduce.svg) or empty
  std::string landscape_svg;          ///< landscape/landscape.svg (`noisydarts landscape`) or empty
};

/// Reads a run directory. It must hold config.json or metrics.jsonl (else ConfigError naming the
/// directory); malformed config.json/genotype.json -> ConfigError naming the file; a malformed or
/// inconsistent metrics.jsonl line -> DataError naming the file and line.
RunData load_run(const std::string& run_dir);

/// The report page of one run (a complete XHTML document).
std::string render_report(const RunData& run);

/// Loads `run_dir` and writes `run_dir/report.html` atomically. When the run has a genotype but no
/// normal.svg/reduce.svg and Graphviz `dot` is installed, the cell diagrams (.dot/.svg/.png) are
/// (re)written first. Returns the path of the report.
std::string write_report(const std::string& run_dir);

/// Plain-text table comparing runs, one row per run (preset, noise, epochs, final skip counts,
/// accuracies, Hessian eigenvalue when any run has one, total time), then each run's genotype.
std::string compare_table(const std::vector<RunData>& runs);

/// The comparison page (complete XHTML document): the table, overlaid curves, cells side by side.
std::string render_compare(const std::vector<RunData>& runs);

/// Mean and sample standard deviation (n - 1; 0 for fewer than two values) of `v` (non-empty).
struct MeanSd {
  double mean = 0, sd = 0;
};
MeanSd mean_and_sd(const std::vector<double>& v);

/// A study's page (complete XHTML document, docs/study.md): per setting the mean and spread over
/// seeds of skip counts, softmax(alpha) of skip, supernet accuracy and Hessian eigenvalue per
/// epoch, the settings' table (with retrain accuracy) and every run's row. `study` is
/// study.json's content; `settings` the loaded runs of each setting, in the table's order.
std::string render_study(const nlohmann::json& study,
                         const std::vector<std::pair<std::string, std::vector<RunData>>>& settings);

}  // namespace noisydarts
