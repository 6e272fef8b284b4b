#include "noisydarts/study.h"

#include <algorithm>
#include <cctype>
#include <optional>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "noisydarts/config.h"
#include "noisydarts/error.h"
#include "noisydarts/report.h"

namespace noisydarts {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  if (!s.empty() && s.back() == sep) out.push_back("");
  return out;
}

/// A value as part of a directory name: letters, digits, '.', '+' and '-' kept, others '-'.
std::string name_part(const std::string& s) {
  std::string o;
  for (char c : s) o += (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '+' || c == '-') ? c : '-';
  return o;
}

/// The flags the study sets itself for every run.
const std::set<std::string>& reserved_flags() {
  static const std::set<std::string> k{"out", "o", "seed", "resume", "threads", "q", "quiet", "print-config"};
  return k;
}

/// "--key", "--key=value", "-k" -> "key" / "k"; "" for a value.
std::string flag_name(const std::string& arg) {
  if (arg.size() < 2 || arg[0] != '-') return "";
  std::string n = arg.substr(arg[1] == '-' ? 2 : 1);
  return n.substr(0, n.find('='));
}

std::optional<double> number(const json& j, const char* key) {
  if (!j.contains(key) || !j[key].is_number()) return std::nullopt;
  return j[key].get<double>();
}

json or_null(const std::optional<double>& v) { return v ? json(*v) : json(); }

/// Mean over the edges (rows) of one op's weight in a metrics.jsonl weight table.
std::optional<double> mean_weight(const json& m, const char* table, const std::string& op) {
  if (!m.contains(table) || !m.contains("primitives")) return std::nullopt;
  const auto& prims = m["primitives"];
  const auto it = std::find(prims.begin(), prims.end(), op);
  if (it == prims.end()) return std::nullopt;
  const size_t k = static_cast<size_t>(it - prims.begin());
  double s = 0;
  size_t n = 0;
  for (const auto& row : m[table])
    if (row.size() > k) s += row[k].get<double>(), ++n;
  return n ? std::optional<double>(s / static_cast<double>(n)) : std::nullopt;
}

std::optional<json> read_json_if(const fs::path& p) {
  if (!fs::exists(p)) return std::nullopt;
  return read_json_file(p.string());
}

/// Mean and sample standard deviation (n - 1; 0 for one value) of the non-null values.
json mean_spread(const std::vector<json>& rows, const std::vector<size_t>& idx, const char* key) {
  std::vector<double> v;
  for (size_t i : idx)
    if (rows[i].contains(key) && rows[i][key].is_number()) v.push_back(rows[i][key].get<double>());
  if (v.empty()) return json();
  const MeanSd ms = mean_and_sd(v);
  return {{"mean", ms.mean}, {"std", ms.sd}, {"n", v.size()}, {"min", *std::min_element(v.begin(), v.end())},
          {"max", *std::max_element(v.begin(), v.end())}};
}

const char* const kRowNumbers[] = {"epochs", "skip_normal", "skip_reduce", "skip_weight_normal", "skip_weight_reduce",
                                   "valid_acc", "hessian_eigenvalue", "retrain_test_top1", "search_seconds",
                                   "retrain_seconds", "landscape_center_loss"};

}  // namespace

json StudySpec::to_json() const {
  json v = json::array();
  for (const auto& [k, vals] : vary) v.push_back({{"key", k}, {"values", vals}});
  return {{"seeds", seeds}, {"vary", v}, {"search_args", search_args}, {"train_epochs", train_epochs},
          {"train_args", train_args}, {"landscape_grid", landscape_grid}};
}

StudySpec StudySpec::from_json(const json& j, const std::string& where) {
  StudySpec s;
  try {
    s.seeds = j.at("seeds").get<std::vector<uint64_t>>();
    for (const auto& v : j.at("vary")) s.vary.emplace_back(v.at("key").get<std::string>(), v.at("values").get<std::vector<std::string>>());
    s.search_args = j.at("search_args").get<std::vector<std::string>>();
    s.train_epochs = j.at("train_epochs").get<int64_t>();
    s.train_args = j.at("train_args").get<std::vector<std::string>>();
    s.landscape_grid = j.at("landscape_grid").get<int>();
  } catch (const json::exception& e) {
    throw ConfigError(where + ": not a study specification (" + std::string(e.what()).substr(0, 120) + ")");
  }
  return s;
}

std::vector<std::string> StudyRun::search_args(const StudySpec& spec, const std::string& run_dir) const {
  std::vector<std::string> a = spec.search_args;
  for (const auto& [k, v] : values) {
    a.push_back("--" + k);
    a.push_back(v);
  }
  a.insert(a.end(), {"--seed", std::to_string(seed), "--out", run_dir});
  return a;
}

std::vector<uint64_t> parse_seeds(const std::string& text) {
  std::vector<uint64_t> seeds;
  for (const auto& part : split(text, ',')) {
    if (part.empty() || part.size() > 19 || part.find_first_not_of("0123456789") != std::string::npos)
      throw UsageError("--seeds " + text + ": give non-negative integers separated by commas, e.g. --seeds 1,2,3");
    const uint64_t s = std::stoull(part);
    if (std::find(seeds.begin(), seeds.end(), s) != seeds.end()) throw UsageError("--seeds " + text + ": seed " + part + " is listed twice");
    seeds.push_back(s);
  }
  if (seeds.empty()) throw UsageError("--seeds: give at least one seed, e.g. --seeds 1,2,3");
  return seeds;
}

std::pair<std::string, std::vector<std::string>> parse_vary(const std::string& text) {
  const auto eq = text.find('=');
  std::string key = text.substr(0, eq);
  while (!key.empty() && key[0] == '-') key.erase(0, 1);
  const bool key_ok = !key.empty() && std::islower(static_cast<unsigned char>(key[0])) &&
                      key.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789-") == std::string::npos;
  if (eq == std::string::npos || !key_ok)
    throw UsageError("--vary " + text + ": use KEY=V1,V2 with KEY a search flag without its dashes, e.g. --vary noise-lambda=0,0.1");
  std::vector<std::string> values = split(text.substr(eq + 1), ',');
  for (const auto& v : values)
    if (v.empty()) throw UsageError("--vary " + text + ": an empty value");
  for (size_t i = 0; i < values.size(); ++i)
    for (size_t k = 0; k < i; ++k)
      if (values[i] == values[k]) throw UsageError("--vary " + text + ": value " + values[i] + " is listed twice");
  if (values.empty()) throw UsageError("--vary " + text + ": no values");
  return {key, values};
}

void validate_study(const StudySpec& spec) {
  if (spec.seeds.empty()) throw UsageError("--seeds: give at least one seed, e.g. --seeds 1,2,3");
  std::set<std::string> given;
  for (const auto& a : spec.search_args) {
    const std::string f = flag_name(a);
    if (f.empty()) continue;
    if (reserved_flags().count(f))
      throw UsageError("search flag " + a + " after --: the study sets it for every run (use study's own --threads; seeds go in --seeds)");
    given.insert(f);
  }
  std::set<std::string> varied;
  for (const auto& [k, v] : spec.vary) {
    if (reserved_flags().count(k)) throw UsageError("--vary " + k + ": the study sets --" + k + " itself (seeds go in --seeds)");
    if (!varied.insert(k).second) throw UsageError("--vary " + k + " is given twice: list every value in one --vary " + k + "=V1,V2");
    if (given.count(k)) throw UsageError("--" + k + " is both varied and given after --: keep one");
  }
  for (const auto& a : spec.train_args) {
    const std::string f = flag_name(a);
    if (f == "out" || f == "o" || f == "genotype" || f == "resume" || f == "threads" || f == "seed" || f == "epochs")
      throw UsageError("--train-args " + a + ": the study sets it for every retrain (--train-epochs sets the epochs)");
  }
}

std::vector<StudyRun> expand_study(const StudySpec& spec) {
  std::vector<std::vector<std::pair<std::string, std::string>>> settings{{}};
  for (const auto& [k, vals] : spec.vary) {
    std::vector<std::vector<std::pair<std::string, std::string>>> next;
    for (const auto& s : settings)
      for (const auto& v : vals) {
        auto t = s;
        t.emplace_back(k, v);
        next.push_back(t);
      }
    settings = next;
  }
  std::vector<StudyRun> runs;
  for (const auto& s : settings) {
    std::string setting, name;
    for (const auto& [k, v] : s) {
      setting += (setting.empty() ? "" : " ") + k + "=" + v;
      name += name_part(k) + "-" + name_part(v) + "_";
    }
    if (setting.empty()) setting = "base";
    for (uint64_t seed : spec.seeds) {
      StudyRun r;
      r.setting = setting;
      r.values = s;
      r.seed = seed;
      r.name = name + "seed-" + std::to_string(seed);
      runs.push_back(r);
    }
  }
  return runs;
}

json study_row(const std::string& run_dir, const StudyRun& run) {
  const fs::path dir(run_dir);
  json values = json::object();
  for (const auto& [k, v] : run.values) values[k] = v;
  json r{{"setting", run.setting}, {"values", values}, {"seed", run.seed}, {"run", run.name}, {"status", "not started"}};
  for (const char* k : kRowNumbers) r[k] = json();
  r["genotype"] = json();
  if (!fs::exists(dir / "config.json") && !fs::exists(dir / "metrics.jsonl")) return r;
  const RunData data = load_run(run_dir);
  r["status"] = fs::exists(dir / "summary.txt") ? "searched" : "incomplete";
  if (!data.epochs.empty()) {
    const json& last = data.epochs.back();
    r["epochs"] = last["epoch"];
    r["skip_normal"] = last.contains("skip_normal") ? last["skip_normal"] : last.value("skips", json());
    r["skip_reduce"] = last.value("skip_reduce", json());
    const bool darts = last.contains("alphas_normal");
    r["skip_weight_normal"] = or_null(mean_weight(last, darts ? "alphas_normal" : "alphas", "skip_connect"));
    r["skip_weight_reduce"] = or_null(darts ? mean_weight(last, "alphas_reduce", "skip_connect") : std::nullopt);
    const auto acc = number(last, "valid_acc");
    r["valid_acc"] = acc && *acc >= 0 ? json(*acc) : json();
    for (const auto& m : data.epochs)
      if (m.contains("hessian_eigenvalue")) r["hessian_eigenvalue"] = m["hessian_eigenvalue"];
    double secs = 0;
    for (const auto& m : data.epochs) secs += m.value("seconds", 0.0);
    r["search_seconds"] = secs;
  }
  if (r["status"] == "searched") {
    std::ifstream g(dir / "genotype.txt");
    std::string text;
    if (std::getline(g, text)) r["genotype"] = text;
  }
  if (const auto res = read_json_if(dir / "retrain" / "result.json")) {
    r["status"] = "retrained";
    r["retrain_test_top1"] = res->value("test_top1", json());
    r["retrain_seconds"] = res->value("train_seconds", json());
  }
  if (const auto land = read_json_if(dir / "landscape" / "landscape.json"))
    if (land->contains("panels") && !(*land)["panels"].empty()) r["landscape_center_loss"] = (*land)["panels"][0].value("center_loss", json());
  return r;
}

std::string study_csv(const StudySpec& spec, const std::vector<json>& rows) {
  auto quote = [](const std::string& s) {
    if (s.find_first_of(",\"\n") == std::string::npos) return s;
    std::string o = "\"";
    for (char c : s) o += c == '"' ? std::string("\"\"") : std::string(1, c);
    return o + "\"";
  };
  auto cell = [&](const json& v) -> std::string {
    if (v.is_null()) return "";
    if (v.is_string()) return quote(v.get<std::string>());
    return v.dump();  // numbers exactly as in JSON (round-trip precision)
  };
  std::ostringstream o;
  o << "setting";
  for (const auto& [k, v] : spec.vary) o << "," << quote(k);
  o << ",seed,status";
  for (const char* k : kRowNumbers) o << "," << k;
  o << ",genotype,run\n";
  for (const auto& r : rows) {
    o << quote(r["setting"].get<std::string>());
    for (const auto& [k, v] : spec.vary) o << "," << cell(r["values"].value(k, json()));
    o << "," << r["seed"].get<uint64_t>() << "," << cell(r["status"]);
    for (const char* k : kRowNumbers) o << "," << cell(r[k]);
    o << "," << cell(r["genotype"]) << "," << cell(r["run"]) << "\n";
  }
  return o.str();
}

void write_study_files(const std::string& dir, const StudySpec& spec, const std::vector<StudyRun>& runs,
                       const std::vector<json>& rows) {
  std::vector<std::string> settings;
  for (const auto& r : runs)
    if (std::find(settings.begin(), settings.end(), r.setting) == settings.end()) settings.push_back(r.setting);
  json summary = json::array();
  std::vector<std::pair<std::string, std::vector<RunData>>> groups;
  for (const auto& s : settings) {
    std::vector<size_t> idx;
    std::vector<RunData> data;
    size_t n_runs = 0;
    for (size_t i = 0; i < runs.size(); ++i) {
      if (runs[i].setting != s) continue;
      ++n_runs;
      // Means and spreads over the finished searches only: a run still going would mix its
      // early epochs into the final numbers.
      const std::string status = rows[i]["status"].get<std::string>();
      if (status == "searched" || status == "retrained") idx.push_back(i);
      const fs::path rd = fs::path(dir) / "runs" / runs[i].name;
      if (rows[i]["status"] != "not started") data.push_back(load_run(rd.string()));
    }
    json agg{{"setting", s}, {"runs", n_runs}, {"finished", idx.size()}};
    for (const char* k : kRowNumbers) agg[k] = mean_spread(rows, idx, k);
    summary.push_back(agg);
    groups.emplace_back(s, std::move(data));
  }
  const json study{{"format", "noisydarts-study"}, {"version", 1}, {"spec", spec.to_json()},
                   {"settings", summary}, {"rows", rows}};
  write_file_atomic((fs::path(dir) / "study.json").string(), study.dump(2) + "\n");
  write_file_atomic((fs::path(dir) / "study.csv").string(), study_csv(spec, rows));
  write_file_atomic((fs::path(dir) / "report.html").string(), render_study(study, groups));
}

}  // namespace noisydarts
