// `noisydarts study --out DIR --seeds 1,2,3 --vary KEY=V1,V2 ... -- <search flags>`: a grid of
// searches (settings x seeds) run as child noisydarts processes, each a normal run directory
// under DIR/runs/, optionally retrained (`train`) and their landscape computed (`landscape`);
// results in DIR/study.json, study.csv and report.html (study.h, docs/study.md). Re-running the
// same command continues an interrupted study: finished stages are kept, unfinished ones resume
// from their checkpoints.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "child_process.h"
#include "commands.h"
#include "noisydarts/config.h"
#include "noisydarts/engine.h"
#include "noisydarts/error.h"
#include "noisydarts/runtime.h"
#include "noisydarts/study.h"

namespace nd = noisydarts;
namespace fs = std::filesystem;
using nlohmann::json;

namespace noisydarts::cli {

namespace {

struct StudyArgs {
  std::string out, seeds = "1,2,3", train_args;
  std::vector<std::string> vary, search_args;
  int64_t train_epochs = 0;
  int landscape_grid = 0;
  int jobs = 1;
  int threads = 0;
};

enum class Stage { kSearch, kTrain, kLandscape, kDone };

const char* stage_name(Stage s) {
  switch (s) {
    case Stage::kSearch: return "search";
    case Stage::kTrain: return "retrain";
    case Stage::kLandscape: return "landscape";
    default: return "done";
  }
}

std::vector<std::string> split_words(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> w;
  for (std::string x; in >> x;) w.push_back(x);
  return w;
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

/// The last line starting with "noisydarts" in a child's log (its one-line error), or the last
/// non-empty line.
std::string error_line(const fs::path& log) {
  std::istringstream in(read_text(log));
  std::string line, last, err;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    last = line;
    if (line.rfind("noisydarts", 0) == 0) err = line;
  }
  std::string out = err.empty() ? last : err;
  for (const char* prefix : {"noisydarts: error: ", "noisydarts: "})
    if (out.rfind(prefix, 0) == 0) return out.substr(std::string(prefix).size());
  return out;
}

int wait_for(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return nd::kExitFailure;
  return exit_code_of(status);
}

class StudyRunner {
 public:
  explicit StudyRunner(const StudyArgs& a) : args_(a), dir_(a.out) {}

  int run() {
    spec_.seeds = parse_seeds(args_.seeds);
    for (const auto& v : args_.vary) spec_.vary.push_back(parse_vary(v));
    spec_.search_args = args_.search_args;
    spec_.train_epochs = args_.train_epochs;
    spec_.train_args = split_words(args_.train_args);
    spec_.landscape_grid = args_.landscape_grid;
    validate_study(spec_);
    if (spec_.landscape_grid != 0 && (spec_.landscape_grid < 3 || spec_.landscape_grid % 2 == 0))
      throw UsageError("--landscape-grid " + std::to_string(spec_.landscape_grid) + ": use an odd number from 3 (0 = no landscape)");
    threads_ = std::max(1, resolve_threads(args_.threads) / args_.jobs);
    runs_ = expand_study(spec_);
    exe_ = self_exe();
    resolve_settings();  // before anything is written: a corrected command line starts afresh
    open_directory();
    install_forwarding_handlers();
    std::fprintf(stderr, "[study] %s: %zu runs (%zu settings x %zu seeds), %d at a time with %d threads each\n", args_.out.c_str(),
                 runs_.size(), runs_.size() / spec_.seeds.size(), spec_.seeds.size(), args_.jobs, threads_);
    schedule();
    write_results();
    bool all_done = true;
    for (size_t i = 0; i < runs_.size(); ++i) all_done = all_done && next_stage(i) == Stage::kDone;
    if (stopped_ || (stopping_ && !all_done))
      throw StoppedError("study " + args_.out + " stopped; run the same command again to continue it (finished runs are kept)");
    if (!failed_.empty())
      throw Error(std::to_string(failed_.size()) + " of " + std::to_string(runs_.size()) + " runs failed (first: " + failed_.front() +
                  "); the others are in " + (dir_ / "study.csv").string() + "; run the same command again to retry");
    print_summary();
    return kExitOk;
  }

 private:
  fs::path run_dir(size_t i) const { return dir_ / "runs" / runs_[i].name; }
  fs::path log_of(size_t i, Stage s) const { return dir_ / "logs" / (runs_[i].name + "." + stage_name(s) + ".log"); }

  /// Creates DIR, locks it (one study per directory) and records the spec; a directory holding
  /// another study is refused.
  void open_directory() {
    std::error_code ec;
    fs::create_directories(dir_ / "runs", ec);
    if (!ec) fs::create_directories(dir_ / "logs", ec);
    if (ec) throw IoError("cannot create study directory " + args_.out + ": " + ec.message());
    lock_ = std::make_unique<RunDirectory>(args_.out, "study", true);
    lock_->lock();
    const fs::path spec_file = dir_ / "study-spec.json";
    if (fs::exists(spec_file)) {
      const StudySpec stored = StudySpec::from_json(read_json_file(spec_file.string()), spec_file.string());
      if (stored.to_json() != spec_.to_json())
        throw UsageError(args_.out + " holds another study (its --seeds, --vary, --train-*, --landscape-grid or search flags "
                         "differ; see " + spec_file.string() + "): repeat those options to continue it, or choose another --out");
      std::fprintf(stderr, "[study] continuing %s\n", args_.out.c_str());
    } else {
      write_file_atomic(spec_file.string(), spec_.to_json().dump(2) + "\n");
    }
  }

  /// `search --print-config` once per setting: refuses bad flags before anything runs and
  /// gives the resolved configuration (the retrain's dataset).
  void resolve_settings() {
    std::set<std::string> seen;
    for (size_t i = 0; i < runs_.size(); ++i) {
      if (!seen.insert(runs_[i].setting).second) continue;
      std::vector<std::string> a{"search"};
      for (const auto& x : runs_[i].search_args(spec_, run_dir(i).string())) a.push_back(x);
      a.push_back("--print-config");
      char tmp[] = "/tmp/noisydarts_study_XXXXXX";
      const int fd = ::mkstemp(tmp);
      if (fd < 0) throw IoError("cannot create a temporary file in /tmp");
      ::close(fd);
      const fs::path log = tmp;
      const int code = wait_for(spawn_child(exe_, a, {}, log.string()));
      const std::string text = read_text(log), line = error_line(log);
      fs::remove(log);
      if (code != 0) throw Error("setting " + runs_[i].setting + ": " + line, code);
      const auto b = text.find('{'), e = text.rfind('}');
      configs_[runs_[i].setting] = json::parse(text.substr(b, e + 1 - b));
    }
  }

  Stage next_stage(size_t i) const {
    const fs::path rd = run_dir(i);
    if (!fs::exists(rd / "summary.txt")) return Stage::kSearch;
    if (spec_.train_epochs > 0 && !fs::exists(rd / "retrain" / "result.json")) return Stage::kTrain;
    if (spec_.landscape_grid > 0 && !fs::exists(rd / "landscape" / "landscape.json")) return Stage::kLandscape;
    return Stage::kDone;
  }

  std::vector<std::string> command(size_t i, Stage s) const {
    const StudyRun& r = runs_[i];
    const std::string rd = run_dir(i).string(), t = std::to_string(threads_);
    if (s == Stage::kSearch) {
      if (!RunDirectory(rd, "search", false).resume_candidates().empty()) return {"search", "--resume", rd, "--threads", t};
      std::vector<std::string> a{"search"};
      for (const auto& x : r.search_args(spec_, rd)) a.push_back(x);
      a.insert(a.end(), {"--threads", t});
      return a;
    }
    if (s == Stage::kTrain) {
      const std::string td = (run_dir(i) / "retrain").string();
      if (!RunDirectory(td, "train", false).resume_candidates({(fs::path(td) / "checkpoint.pt").string()}).empty())
        return {"train", "--resume", td, "--threads", t};
      const json& cfg = configs_.at(r.setting);
      std::vector<std::string> a{"train", "--genotype", rd, "--out", td, "--seed", std::to_string(r.seed), "--epochs",
                                 std::to_string(spec_.train_epochs), "--dataset", cfg.value("dataset", "fashion-mnist")};
      if (!cfg.value("data_dir", std::string()).empty()) a.insert(a.end(), {"--data-dir", cfg["data_dir"].get<std::string>()});
      for (const auto& x : spec_.train_args) a.push_back(x);
      a.insert(a.end(), {"--threads", t});
      return a;
    }
    return {"landscape", "--checkpoint", rd, "--grid", std::to_string(spec_.landscape_grid), "--threads", t, "-q"};
  }

  struct Slot {
    pid_t pid;
    size_t run;
    Stage stage;
    std::chrono::steady_clock::time_point t0;
  };

  void start(size_t i, Stage s) {
    const fs::path log = log_of(i, s);
    const auto cmd = command(i, s);
    std::fprintf(stderr, "[study] %s: %s%s (log %s)\n", runs_[i].name.c_str(), stage_name(s),
                 cmd.size() > 1 && cmd[1] == "--resume" ? " resumed" : "", log.string().c_str());
    active_.push_back({spawn_child(exe_, cmd, {}, log.string()), i, s, std::chrono::steady_clock::now()});
  }

  void schedule() {
    std::vector<size_t> pending;
    for (size_t i = 0; i < runs_.size(); ++i)
      if (next_stage(i) != Stage::kDone) pending.push_back(i);
    if (pending.size() < runs_.size())
      std::fprintf(stderr, "[study] %zu of %zu runs already finished\n", runs_.size() - pending.size(), runs_.size());
    size_t next = 0;
    while (true) {
      for (const int sig : take_signals()) {
        if (!stopping_)
          std::fprintf(stderr, "[study] %s: stopping the running searches at their next step (again to stop at once)\n",
                       sig == SIGINT ? "SIGINT" : "SIGTERM");
        stopping_ = true;
        for (const auto& s : active_) ::kill(s.pid, sig);
      }
      while (!stopping_ && static_cast<int>(active_.size()) < args_.jobs && next < pending.size()) {
        const size_t i = pending[next++];
        start(i, next_stage(i));
      }
      if (active_.empty() && (stopping_ || next >= pending.size())) break;
      int status = 0;
      const pid_t p = ::waitpid(-1, &status, WNOHANG);
      if (p <= 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      for (size_t k = 0; k < active_.size(); ++k) {
        if (active_[k].pid != p) continue;
        const Slot s = active_[k];
        active_.erase(active_.begin() + static_cast<long>(k));
        finished(s, exit_code_of(status));
        break;
      }
    }
  }

  void finished(const Slot& s, int code) {
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - s.t0).count();
    const std::string& name = runs_[s.run].name;
    if (code == kExitStopped) {
      stopped_ = true;
      std::fprintf(stderr, "[study] %s: %s stopped after %s (checkpoint kept)\n", name.c_str(), stage_name(s.stage),
                   format_duration(secs).c_str());
      return;
    }
    if (code != 0) {
      failed_.push_back(name + " " + stage_name(s.stage) + ", exit " + std::to_string(code) + ", " + log_of(s.run, s.stage).string());
      std::fprintf(stderr, "[study] %s: %s failed (exit %d): %s\n", name.c_str(), stage_name(s.stage), code,
                   error_line(log_of(s.run, s.stage)).c_str());
      return;
    }
    const json row = study_row(run_dir(s.run).string(), runs_[s.run]);
    std::string what;
    auto n = [&](const char* k, const char* fmt) {
      char b[64];
      if (row[k].is_number()) std::snprintf(b, sizeof b, fmt, row[k].get<double>());
      else std::snprintf(b, sizeof b, "n/a");
      return std::string(b);
    };
    if (s.stage == Stage::kSearch)
      what = "skips normal " + n("skip_normal", "%.0f") + " reduce " + n("skip_reduce", "%.0f") + ", supernet valid acc " +
             n("valid_acc", "%.2f%%");
    else if (s.stage == Stage::kTrain)
      what = "test top-1 " + n("retrain_test_top1", "%.2f%%");
    else
      what = "centre loss " + n("landscape_center_loss", "%.4g");
    std::fprintf(stderr, "[study] %s: %s done in %s: %s\n", name.c_str(), stage_name(s.stage), format_duration(secs).c_str(),
                 what.c_str());
    write_results();
    const Stage next = next_stage(s.run);
    if (next != Stage::kDone && !stopping_) start(s.run, next);
  }

  void write_results() {
    std::vector<json> rows;
    for (size_t i = 0; i < runs_.size(); ++i) rows.push_back(study_row(run_dir(i).string(), runs_[i]));
    write_study_files(args_.out, spec_, runs_, rows);
  }

  void print_summary() const {
    const json study = read_json_file((dir_ / "study.json").string());
    std::fprintf(stderr, "[study] finished: %zu runs\n", runs_.size());
    for (const auto& s : study["settings"]) {
      auto ms = [&](const char* k, const char* fmt) {
        char b[80];
        if (s[k].is_null()) return std::string("n/a");
        std::snprintf(b, sizeof b, fmt, s[k]["mean"].get<double>(), s[k]["std"].get<double>());
        return std::string(b);
      };
      std::printf("%-40s skips normal %s  reduce %s  supernet acc %s  retrain acc %s\n", s["setting"].get<std::string>().c_str(),
                  ms("skip_normal", "%.2f+-%.2f").c_str(), ms("skip_reduce", "%.2f+-%.2f").c_str(),
                  ms("valid_acc", "%.2f+-%.2f").c_str(), ms("retrain_test_top1", "%.2f+-%.2f").c_str());
    }
    std::printf("files  %s %s %s %s\n", (dir_ / "study.json").string().c_str(), (dir_ / "study.csv").string().c_str(),
                (dir_ / "report.html").string().c_str(), (dir_ / "runs").string().c_str());
  }

  const StudyArgs& args_;
  fs::path dir_;
  StudySpec spec_;
  std::vector<StudyRun> runs_;
  std::map<std::string, json> configs_;
  std::unique_ptr<RunDirectory> lock_;
  std::string exe_;
  int threads_ = 1;
  std::vector<Slot> active_;
  std::vector<std::string> failed_;
  bool stopping_ = false, stopped_ = false;
};

}  // namespace

void add_study_command(CLI::App& app, Action& run) {
  auto st = std::make_shared<StudyArgs>();
  auto* cmd = app.add_subcommand(
      "study", "A grid of searches over settings and seeds, retrained and summarised: study --out DIR --seeds 1,2,3 "
               "--vary KEY=V1,V2 -- <search flags> (docs/study.md)");
  cmd->add_option("-o,--out", st->out, "Study directory (runs/, logs/, study.json, study.csv, report.html)")->required();
  cmd->add_option("--seeds", st->seeds, "Seeds, comma-separated")->capture_default_str();
  cmd->add_option("--vary", st->vary, "KEY=V1,V2: a search flag (without --) and its values; repeat for a grid")
      ->allow_extra_args(false);  // one value per --vary, so that "--vary K=V -- <search flags>" parses
  cmd->add_option("--train-epochs", st->train_epochs, "Retrain each found genotype for N epochs with `train` (0 = no retrain)")
      ->check(CLI::Range(int64_t{0}, int64_t{100000}))->capture_default_str();
  cmd->add_option("--train-args", st->train_args, "Extra `train` flags for the retrains, one string (default: train's own small preset)");
  cmd->add_option("--landscape-grid", st->landscape_grid, "Loss landscape of each run's last checkpoint on an NxN grid (odd; 0 = none)")
      ->check(CLI::Range(0, 201))->capture_default_str();
  cmd->add_option("--jobs", st->jobs, "Runs at once (the threads are split between them)")->check(CLI::Range(1, 256))->capture_default_str();
  cmd->add_option("--threads", st->threads, "Compute threads for the whole study (0 = all cores)")->check(CLI::Range(0, 4096))->capture_default_str();
  cmd->add_option("search", st->search_args, "Search flags common to every run, after --");
  cmd->callback([st, &run] {
    run = [st] { return StudyRunner(*st).run(); };
  });
}

}  // namespace noisydarts::cli
