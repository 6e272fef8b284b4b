#pragma once
// Typed command-line flags bound to configuration keys, shared by `search` and `train`.
//
// Each flag is a typed CLI11 option (integer, number, bool, choice, list, text) whose type comes
// from the key's value in the default configuration, shows that default in --help, and, when
// given, overrides exactly its key after the preset -> scale -> --config layering (merged one
// flag at a time, so a refused value names its flag).
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <deque>
#include <functional>
#include <string>
#include <vector>

namespace noisydarts::cli {

class ConfigFlags {
 public:
  /// `defaults`: the configuration the --help defaults are shown for (e.g. the default preset and
  /// scale), as its to_json().
  ConfigFlags(CLI::App* cmd, nlohmann::json defaults) : cmd_(cmd), defaults_(std::move(defaults)) {}

  /// Adds flag `names` for the (dotted) key `key`.
  CLI::Option* bind(const std::string& names, const std::string& key, const std::string& help);

  /// Merges every given flag into a configuration through `merge(override_json, flag_name)`
  /// (a ConfigError from it becomes a UsageError naming the flag).
  void apply(const std::function<void(const nlohmann::json&, const std::string&)>& merge) const;

  /// Whether the flag of `key` was given.
  bool given(const std::string& key) const;

  /// "--preset P / --scale S change these defaults: ..." lines for --help: the keys (as flags)
  /// whose value in `other` differs from the shown defaults.
  std::string differences(const std::string& title, const nlohmann::json& other) const;

 private:
  struct Binding {
    std::string key;
    nlohmann::json like;  // the default value: its JSON type is the flag's type
    int64_t i = 0;
    uint64_t u = 0;
    double d = 0;
    bool b = false;
    std::string s;
    std::vector<std::string> list;
    CLI::Option* opt = nullptr;
    nlohmann::json value() const;
  };
  CLI::App* cmd_;
  nlohmann::json defaults_;
  std::deque<Binding> bindings_;  // stable addresses: CLI11 writes into them
};

/// The options every run command (`search`, `train`) has besides its config flags: --config,
/// --resume [DIR], --print-config, -q.
struct RunOptions {
  std::string config_file, resume_dir;
  bool quiet = false, print_config = false;
  CLI::Option* resume = nullptr;
  /// Adds the options to `cmd` (`what`: "search" or "run", for the help texts).
  void add(CLI::App* cmd, const std::string& what);
  bool resuming() const { return resume && resume->count() > 0; }
  /// --config FILE as a JSON object without `preset`/`scale` (the flags' choice stays
  /// authoritative); empty object when not given. Throws ConfigError.
  nlohmann::json config_overrides() const;
  /// Applies --resume DIR to the configuration's `out` (refusing a different --out).
  void resolve_out(std::string& out) const;
  /// Prints `config` for --print-config (refused with --resume).
  void print(const nlohmann::json& config) const;
  /// The info callback of a run: lines on stderr unless -q.
  std::function<void(const std::string&)> info() const;
};

/// A lower bound for an integer flag, shown as "INT:at least N" in --help.
CLI::Validator at_least(int64_t n);

/// --precision fp32|bf16 of the evaluation commands (runtime.h Precision), into `precision`.
void add_precision_option(CLI::App* cmd, std::string& precision);

/// The value at a dotted key ("noise.lambda") of a JSON object, or nullptr.
const nlohmann::json* find_key(const nlohmann::json& root, const std::string& dotted);

}  // namespace noisydarts::cli
