// The broken-input corpus (SPEC 8, docs/reliability.md): the real `noisydarts` binary on missing,
// empty, truncated, corrupt and inconsistent inputs, out-of-range options and unwritable outputs.
// Every case must end with the documented exit code, exactly one line on stderr that names the
// file or option, nothing on stdout, and no output written (the --out directory does not exist
// afterwards, or everything that was there is byte-identical).
// The corpus files are made by scripts/make_corpus.py; incompatible but real checkpoints are
// made here from a tiny search run.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "cli_helpers.h"
#include "noisydarts/checkpoint.h"
#include "noisydarts/config.h"
#include "noisydarts/error.h"
#include "noisydarts/search_network.h"

using namespace noisydarts;
using noisydarts::test::CommandResult;
using noisydarts::test::run_cli;
using noisydarts::test::run_command;
namespace fs = std::filesystem;

namespace {

const fs::path kCorpus = fs::path(NOISYDARTS_TESTDATA) / "corpus";

std::string q(const fs::path& p) { return "'" + p.string() + "'"; }

using noisydarts::test::slurp;

void spit(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << s;
}

/// Every regular file under `dir` (relative path -> content) and every directory (-> "<dir>").
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> m;
  if (!fs::exists(dir)) return m;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    const std::string rel = fs::relative(e.path(), dir).string();
    // The run-directory lock (docs/run-directory.md) is created by any run that gets as far as
    // the directory, refused or not; it holds no result. Left out on purpose.
    if (rel == ".lock") continue;
    m[rel] = e.is_directory() ? std::string("<dir>") : slurp(e.path());
  }
  return m;
}

/// A temporary directory for one test, removed at the end.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() / ("noisydarts_corpus_" + name + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& s) const { return path / s; }
};

/// The contract of every failure: `code`, one non-empty line on stderr holding `hint`, nothing
/// on stdout.
void expect_one_line_failure(const CommandResult& r, int code, const std::string& hint) {
  EXPECT_EQ(r.code, code) << r.out;
  EXPECT_TRUE(r.std_out.empty()) << "stdout: " << r.std_out;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.back(), '\n') << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_GT(r.err.size(), 20u) << r.err;
  EXPECT_NE(r.err.find(hint), std::string::npos) << "stderr lacks '" << hint << "': " << r.err;
  EXPECT_EQ(r.err.find("internal error"), std::string::npos) << r.err;
}

/// One hostile invocation: the command line, the exit code and the hint its one stderr line
/// must hold, and an output path that must not exist afterwards (empty: none).
struct Case {
  std::string name, command;
  int code;
  std::string hint;
  fs::path out;
};

std::string cli(const std::string& args) { return noisydarts::test::cli_path() + " " + args; }

/// Runs the cases' commands, a few at a time (each costs ~1 s, mostly LibTorch's start-up),
/// then checks each.
void run_cases(const std::vector<Case>& cases) {
  std::vector<CommandResult> results(cases.size());
  std::atomic<size_t> next{0};
  const unsigned n = std::max(2u, std::min(4u, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < n; ++t)
    pool.emplace_back([&] {
      for (size_t i; (i = next++) < cases.size();) results[i] = run_command(cases[i].command);
    });
  for (auto& t : pool) t.join();
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].name + ": " + cases[i].command);
    expect_one_line_failure(results[i], cases[i].code, cases[i].hint);
    if (!cases[i].out.empty()) EXPECT_FALSE(fs::exists(cases[i].out)) << "output created";
  }
}

// A tiny, fast search (fails on its inputs before any real work in the cases below).
const std::string kTinySearch =
    "search -q --epochs 1 --max-steps 1 --channels 4 --layers 1 --batch-size 4 --threads 1 ";

// ---- IDX data sets ----------------------------------------------------------------------

/// A copy of the valid tiny Fashion-MNIST directory.
fs::path valid_idx_dir(const TempDir& t, const std::string& name) {
  const fs::path d = t / name;
  fs::create_directories(d);
  for (const auto& e : fs::directory_iterator(kCorpus / "idx" / "valid"))
    fs::copy_file(e.path(), d / e.path().filename());
  return d;
}

struct IdxCase {
  std::string target;  // file of the valid directory replaced (or removed)
  std::string corpus;  // corpus/idx/ file put in its place; empty: the target is missing
  std::string as;      // name it gets (default: target)
  std::string labels = {};  // corpus/idx/ file put in place of train-labels-idx1-ubyte
};

TEST(Corpus, BrokenIdxFilesFailWithOneLineAndNoRunDirectory) {
  TempDir t("idx");
  const std::vector<IdxCase> idx = {
      {"train-images-idx3-ubyte", "", ""},
      {"train-labels-idx1-ubyte", "", ""},
      {"train-images-idx3-ubyte", "images.empty", ""},
      {"train-images-idx3-ubyte", "images.header-truncated", ""},
      {"train-images-idx3-ubyte", "images.data-truncated", ""},
      {"train-images-idx3-ubyte", "images.trailing-bytes", ""},
      {"train-images-idx3-ubyte", "images.wrong-magic", ""},
      {"train-images-idx3-ubyte", "images.absurd-dims", ""},
      {"train-images-idx3-ubyte", "images.huge-declared", ""},
      {"train-images-idx3-ubyte", "images.huge-declared.gz", "train-images-idx3-ubyte.gz"},
      {"train-images-idx3-ubyte", "images.corrupt-gzip", "train-images-idx3-ubyte.gz"},
      // Counts agree (10M), so the gzip payload is read: it must end as "truncated" after
      // reading the few bytes present, not by allocating the declared 1.6e14 bytes.
      {"train-images-idx3-ubyte", "images.huge-declared.gz", "train-images-idx3-ubyte.gz",
       "labels.huge-declared"},
      {"train-labels-idx1-ubyte", "labels.empty", ""},
      {"train-labels-idx1-ubyte", "labels.count-mismatch", ""},
      {"train-labels-idx1-ubyte", "labels.wrong-magic", ""},
      {"train-labels-idx1-ubyte", "labels.truncated", ""},
      {"t10k-images-idx3-ubyte", "images.data-truncated", ""},
      {"t10k-labels-idx1-ubyte", "labels.count-mismatch", ""},
  };
  std::vector<Case> cases;
  int i = 0;
  for (const auto& c : idx) {
    const fs::path d = valid_idx_dir(t, "data" + std::to_string(i));
    const fs::path out = t / ("run" + std::to_string(i++));
    fs::remove(d / c.target);
    if (!c.corpus.empty()) fs::copy_file(kCorpus / "idx" / c.corpus, d / (c.as.empty() ? c.target : c.as));
    if (!c.labels.empty())
      fs::copy_file(kCorpus / "idx" / c.labels, d / "train-labels-idx1-ubyte", fs::copy_options::overwrite_existing);
    // The message names the file (a count mismatch names the image and the label file).
    cases.push_back({c.target + " <- " + (c.corpus.empty() ? "(missing)" : c.corpus),
                     cli(kTinySearch + "--dataset fashion-mnist --data-dir " + q(d) + " --out " + q(out)),
                     kExitData, (d / c.target.substr(0, 10)).string(), out});
  }
  run_cases(cases);
}

TEST(Corpus, ValidTinyIdxDirectoryLoads) {
  // The base of the IDX cases is itself valid, so each case fails because of its one defect.
  TempDir t("idxok");
  const fs::path d = valid_idx_dir(t, "data");
  const auto r = run_cli(kTinySearch + "--dataset fashion-mnist --data-dir " + q(d) + " --out " + q(t / "run"));
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(t / "run" / "genotype.json"));
}

// ---- CIFAR binary ------------------------------------------------------------------------

TEST(Corpus, BrokenCifarFilesFailWithOneLineAndNoRunDirectory) {
  TempDir t("cifar");
  struct C {
    std::string dataset, file, corpus;
  };
  const std::vector<C> cifar = {
      {"cifar10", "data_batch_1.bin", ""},
      {"cifar10", "data_batch_1.bin", "data_batch.truncated"},
      {"cifar10", "data_batch_1.bin", "data_batch.short"},
      {"cifar10", "data_batch_1.bin", "data_batch.empty"},
      {"cifar10", "data_batch_1.bin", "data_batch.bad-label"},
      {"cifar100", "train.bin", "data_batch.valid"},  // 3073-byte records are not CIFAR-100's 3074
  };
  std::vector<Case> cases;
  int i = 0;
  for (const auto& c : cifar) {
    const fs::path d = t / ("data" + std::to_string(i));
    const fs::path out = t / ("run" + std::to_string(i++));
    fs::create_directories(d);
    if (!c.corpus.empty()) fs::copy_file(kCorpus / "cifar" / c.corpus, d / c.file);
    cases.push_back({c.dataset + " " + c.file + " <- " + c.corpus,
                     cli(kTinySearch + "--dataset " + c.dataset + " --data-dir " + q(d) + " --out " + q(out)),
                     kExitData, (d / c.file).string(), out});
  }
  run_cases(cases);
}

// ---- Genotypes ---------------------------------------------------------------------------

TEST(Corpus, BrokenGenotypeFilesFailWithOneLine) {
  TempDir t("genotype");
  std::vector<Case> cases;
  int i = 0;
  for (const char* f : {"unknown-op.json", "unknown-op.txt", "bad-index.json", "bad-index.txt",
                        "negative-index.txt", "malformed.json", "malformed.txt", "odd-edges.json",
                        "empty.json", "empty.txt"}) {
    const fs::path g = kCorpus / "genotype" / f;
    const fs::path out = t / ("run" + std::to_string(i++));
    cases.push_back({f, cli("train -q --dataset synthetic --epochs 1 --max-steps 1 --channels 4 --layers 2 "
                            "--threads 1 --genotype " + q(g) + " --out " + q(out)),
                     kExitConfig, f, out});
  }
  // profile reads genotypes too; inline (not a file) malformed text; an unknown built-in.
  cases.push_back({"profile", cli("profile --genotype " + q(kCorpus / "genotype" / "bad-index.txt")),
                   kExitConfig, "bad-index.txt", {}});
  cases.push_back({"inline", cli("profile --genotype \"Genotype(normal=[('sep_conv_3x3', 0)\""),
                   kExitConfig, "genotype", {}});
  cases.push_back({"builtin", cli("profile --genotype DARTS_V9"), kExitConfig, "DARTS_V9", {}});
  run_cases(cases);
  // The valid seeds are valid.
  for (const char* f : {"valid.json", "valid.txt"}) {
    const auto r = run_cli("profile --genotype " + q(kCorpus / "genotype" / f));
    EXPECT_EQ(r.code, 0) << f << ": " << r.out;
  }
}

// ---- Configuration files -------------------------------------------------------------------

TEST(Corpus, BrokenConfigFilesFailWithOneLineAndNoRunDirectory) {
  TempDir t("config");
  struct C {
    std::string file;
    int code;
    std::string hint;
  };
  const std::vector<C> config = {
      {"malformed.json", kExitConfig, "malformed.json"},
      {"unknown-key.json", kExitConfig, "epochz"},
      {"wrong-type.json", kExitConfig, "epochs"},
      {"wrong-type-nested.json", kExitConfig, "noise.lambda"},
      {"not-object.json", kExitConfig, "not-object.json"},
      {"empty.json", kExitConfig, "empty.json"},
      {"missing.json", kExitConfig, "missing.json"},
      {"bad-value.json", kExitUsage, "--train-portion"},
  };
  std::vector<Case> cases;
  int i = 0;
  for (const auto& c : config) {
    const fs::path out = t / ("run" + std::to_string(i++));
    cases.push_back({c.file, cli(kTinySearch + "--dataset synthetic --config " + q(kCorpus / "config" / c.file) +
                                 " --out " + q(out)),
                     c.code, c.hint, out});
  }
  // train reads --config files the same way.
  cases.push_back({"train not-object", cli("train -q --genotype DARTS_V2 --config " +
                                           q(kCorpus / "config" / "not-object.json") + " --out " + q(t / "train")),
                   kExitConfig, "not-object.json", t / "train"});
  run_cases(cases);
}

// ---- Options -----------------------------------------------------------------------------

TEST(Corpus, OutOfRangeOptionsFailWithOneLineNamingTheOption) {
  TempDir t("options");
  struct C {
    std::string args, hint;
  };
  const std::string s = "search -q --dataset synthetic ";
  const std::vector<C> options = {
      {s + "--epochs -1", "--epochs"},
      {s + "--epochs 99999999999999999999", "--epochs"},
      {s + "--batch-size 0", "--batch-size"},
      {s + "--channels 3", "--channels"},
      {s + "--channels 1000000", "--channels"},  // ran out of memory after creating the run directory
      {s + "--layers 100000", "--layers"},       // crashed with SIGSEGV
      {s + "--subset -5", "--subset"},
      {s + "--train-portion 1.5", "--train-portion"},
      {s + "--threads -1", "--threads"},
      {s + "--threads 99999999", "--threads"},  // LibTorch stalls on set_num_threads(99999999)
      {s + "--noise-lambda abc", "--noise-lambda"},
      {s + "--ops conv_9x9", "conv_9x9"},
      {s + "--bogus-flag 3", "--bogus-flag"},
      {"search -q --dataset foo", "--dataset"},
      {"search -q --preset foo", "--preset"},
      {"train -q --dataset synthetic --genotype DARTS_V2 --epochs -3", "--epochs"},
      {"train -q --dataset synthetic --genotype DARTS_V2 --batch-size 0", "--batch-size"},
      {"eval --checkpoint /nonexistent.pt --batch-size 0", "--batch-size"},
      {"eval --checkpoint /nonexistent.pt --precision fp16", "--precision"},
      {"bench eval-step --precision half", "--precision"},
      {"profile --genotype DARTS_V2 --dataset foo", "--dataset"},
      {"frobnicate", "frobnicate"},
      {"search -q --dataset synthetic --epochs 1", "--out"},  // a search needs --out
  };
  std::vector<Case> cases;
  int i = 0;
  for (const auto& c : options) {
    const fs::path out = t / ("run" + std::to_string(i++));
    const bool takes_out = (c.args.rfind("search", 0) == 0 || c.args.rfind("train", 0) == 0) && c.hint != "--out";
    cases.push_back({c.args, cli(c.args + (takes_out ? " --out " + q(out) : std::string())), kExitUsage, c.hint,
                     takes_out ? out : fs::path()});
  }
  run_cases(cases);
}

// ---- Checkpoints ---------------------------------------------------------------------------

/// One tiny real search (1 cell, 1 step), shared by the checkpoint and output cases.
class CorpusRun : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir("run");
    const auto r = run_cli(kTinySearch + "--dataset synthetic --subset 64 --seed 3 --out " + q(run()));
    ASSERT_EQ(r.code, 0) << r.out;
    checkpoint_ = (run() / "checkpoints" / std::string(slurp(run() / "checkpoints" / "latest"))).string();
    while (!checkpoint_.empty() && checkpoint_.back() == '\n') checkpoint_.pop_back();
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static fs::path run() { return dir_->path / "a"; }
  static fs::path base() { return dir_->path; }
  static const std::string& checkpoint() { return checkpoint_; }

  /// A copy of the run directory whose newest checkpoint is replaced by `ckpt_bytes`.
  static fs::path run_with_checkpoint(const std::string& name, const std::string& ckpt_bytes) {
    const fs::path d = base() / name;
    fs::remove_all(d);
    fs::copy(run(), d, fs::copy_options::recursive);
    spit(d / "checkpoints" / fs::path(checkpoint()).filename(), ckpt_bytes);
    return d;
  }

  /// A search checkpoint archive with the given header, `config` and (optionally) the model of
  /// a network with `layers` cells.
  static std::string make_checkpoint(int64_t version, const std::string& kind, int64_t layers) {
    const nlohmann::json cfg = read_checkpoint_config(checkpoint(), "search");
    torch::serialize::OutputArchive a;
    write_int(a, "format_version", version);
    write_string(a, "kind", kind);
    write_string(a, "config", cfg.dump());
    if (layers > 0) {
      SearchNetworkOptions o(cfg["channels"].get<int64_t>(), 10, layers);
      o.in_channels(1).primitives(cfg["primitives"].get<std::vector<std::string>>());
      SearchNetwork net = make_search_network(o);
      torch::serialize::OutputArchive m;
      net->save(m);
      a.write("model", m);
    }
    const fs::path tmp = base() / "made.pt";
    a.save_to(tmp.string());
    std::string bytes = slurp(tmp);
    fs::remove(tmp);
    return bytes;
  }

  static TempDir* dir_;
  static std::string checkpoint_;
};
TempDir* CorpusRun::dir_ = nullptr;
std::string CorpusRun::checkpoint_;

TEST_F(CorpusRun, IncompatibleCheckpointsAreRefusedWithOneLineAndNothingChanges) {
  const std::string real = slurp(checkpoint());
  const std::string name = fs::path(checkpoint()).filename().string();
  struct C {
    std::string name, bytes, hint;
  };
  const std::vector<C> ckpts = {
      {"other-version", make_checkpoint(kCheckpointFormatVersion + 1, "search", 0), "format version"},
      {"other-kind", make_checkpoint(kCheckpointFormatVersion, "train", 0), "'train'"},
      {"other-architecture", make_checkpoint(kCheckpointFormatVersion, "search", 4), "does not match"},
      {"no-header", slurp(kCorpus / "checkpoint" / "garbage.pt"), name},
      {"empty", "", name},
      {"truncated", real.substr(0, real.size() / 2), name},
  };
  std::vector<Case> cases;
  std::vector<std::pair<fs::path, std::map<std::string, std::string>>> before;
  for (const auto& c : ckpts) {
    const fs::path d = run_with_checkpoint(c.name, c.bytes);
    before.emplace_back(d, snapshot(d));
    cases.push_back({c.name + " resume", cli("search --resume -q --out " + q(d)), kExitCheckpoint, c.hint, {}});
    // export reads the same file: the same refusal and no output file.
    if (c.name == "other-version" || c.name == "other-architecture" || c.name == "truncated") {
      const fs::path out = base() / (c.name + "-export.pt");
      cases.push_back({c.name + " export", cli("export -c " + q(d / "checkpoints" / name) + " -o " + q(out)),
                       kExitCheckpoint, name, out});
    }
  }
  for (const char* f : {"garbage.pt", "empty.pt", "missing.pt"})
    cases.push_back({f, cli("eval -c " + q(kCorpus / "checkpoint" / f)), kExitCheckpoint, f, {}});
  // A search checkpoint is not a training checkpoint.
  cases.push_back({"search as train", cli("eval -c " + q(checkpoint())), kExitCheckpoint, "'search'", {}});
  run_cases(cases);
  for (const auto& [d, snap] : before) EXPECT_TRUE(snapshot(d) == snap) << d << ": the run directory changed";
}

// ---- Outputs that cannot be written ----------------------------------------------------------

TEST_F(CorpusRun, UnwritableOutputsFailWithOneLineAndLeaveNothing) {
  // A regular file where a directory is needed (root ignores permissions, so this is the
  // reliable way to make a path unwritable).
  const fs::path file = base() / "a-file";
  spit(file, "not a directory\n");
  auto r = run_cli(kTinySearch + "--dataset synthetic --subset 64 --out " + q(file / "run"));
  expect_one_line_failure(r, kExitIo, (file / "run").string());
  r = run_cli("train -q --dataset synthetic --genotype DARTS_V2 --epochs 1 --max-steps 1 --channels 4 "
              "--layers 2 --threads 1 --subset 64 --out " + q(file / "run"));
  expect_one_line_failure(r, kExitIo, (file / "run").string());
  r = run_cli("export -c " + q(checkpoint()) + " -o " + q(file / "model.pt"));
  expect_one_line_failure(r, kExitIo, (file / "model.pt").string());
  EXPECT_EQ(slurp(file), "not a directory\n");

  // A device: the atomic rename would replace /dev/full with a regular file.
  r = run_cli("export -c " + q(checkpoint()) + " -o /dev/full");
  expect_one_line_failure(r, kExitIo, "/dev/full");
  struct stat st {};
  ASSERT_EQ(::stat("/dev/full", &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode)) << "/dev/full was replaced";

  // A full disk: a file-size limit with SIGXFSZ ignored makes write() fail with EFBIG, as
  // ENOSPC would. A pre-existing output stays byte-identical and no temporary file is left.
  const fs::path out = base() / "full" / "model.pt";
  fs::create_directories(out.parent_path());
  spit(out, "previous export\n");
  r = run_command("trap '' XFSZ; ulimit -f 2; exec " + noisydarts::test::cli_path() + " export -c " +
                  q(checkpoint()) + " -o " + q(out));
  expect_one_line_failure(r, kExitIo, out.string());
  EXPECT_EQ(slurp(out), "previous export\n");
  EXPECT_EQ(std::distance(fs::directory_iterator(out.parent_path()), fs::directory_iterator()), 1)
      << "a temporary file was left behind";

  // An existing run directory is not overwritten by a new search.
  const auto before = snapshot(run());
  r = run_cli(kTinySearch + "--dataset synthetic --subset 64 --out " + q(run()));
  expect_one_line_failure(r, kExitUsage, run().string());
  EXPECT_TRUE(snapshot(run()) == before);
}

}  // namespace
