#include "config_flags.h"

#include <cstdio>

#include "noisydarts/config.h"
#include "noisydarts/error.h"

namespace noisydarts::cli {
using nlohmann::json;

const json* find_key(const json& root, const std::string& dotted) {
  const json* cur = &root;
  size_t start = 0;
  while (true) {
    const auto dot = dotted.find('.', start);
    const auto part = dotted.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!cur->is_object() || !cur->contains(part)) return nullptr;
    cur = &(*cur)[part];
    if (dot == std::string::npos) return cur;
    start = dot + 1;
  }
}

namespace {
// How a default value reads in --help.
std::string default_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_array()) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ",") + (x.is_string() ? x.get<std::string>() : x.dump());
    return s;
  }
  return v.dump();
}

// CLI11 2.1 alone wraps "-1" into an unsigned field and clamps 99999999999999999999 to 2^63-1:
// the text must be an integer the field's 64-bit type holds.
CLI::Validator integer_text(bool is_unsigned) {
  return CLI::Validator(
      [is_unsigned](std::string& v) -> std::string {
        try {
          size_t pos = 0;
          if (is_unsigned) {
            if (v.find('-') != std::string::npos) return "Value " + v + " must be a non-negative integer";
            (void)std::stoull(v, &pos);
          } else {
            (void)std::stoll(v, &pos);
          }
          if (pos == v.size()) return std::string();
        } catch (const std::out_of_range&) {
          return "Value " + v + " is out of the range of a 64-bit integer";
        } catch (const std::exception&) {
        }
        return "Value " + v + " is not an integer";
      },
      "");
}

// The nested object {"a": {"b": v}} for key "a.b".
json nested(const std::string& dotted, json v) {
  const auto dot = dotted.rfind('.');
  if (dot == std::string::npos) return json{{dotted, std::move(v)}};
  return nested(dotted.substr(0, dot), json{{dotted.substr(dot + 1), std::move(v)}});
}
}  // namespace

CLI::Option* ConfigFlags::bind(const std::string& names, const std::string& key, const std::string& help) {
  const json* like = find_key(defaults_, key);
  if (!like) throw Error("internal: flag " + names + " is bound to the unknown config key '" + key + "'");
  bindings_.push_back({});
  Binding& b = bindings_.back();
  b.key = key;
  b.like = *like;
  CLI::Option* o = nullptr;
  if (like->is_boolean()) o = cmd_->add_option(names, b.b, help);
  else if (like->is_number_unsigned()) o = cmd_->add_option(names, b.u, help)->check(integer_text(true));
  else if (like->is_number_integer()) o = cmd_->add_option(names, b.i, help)->check(integer_text(false));
  else if (like->is_number()) o = cmd_->add_option(names, b.d, help);
  else if (like->is_array()) o = cmd_->add_option(names, b.list, help)->delimiter(',')->type_name("LIST");
  else o = cmd_->add_option(names, b.s, help);
  const std::string shown = default_text(*like);
  if (!shown.empty()) o->default_str(shown);
  b.opt = o;
  return o;
}

json ConfigFlags::Binding::value() const {
  if (like.is_boolean()) return b;
  if (like.is_number_unsigned()) return u;
  if (like.is_number_integer()) return i;
  if (like.is_number()) return d;
  if (like.is_array()) {
    json a = json::array();
    for (const auto& x : list)
      if (!x.empty()) a.push_back(x);
    return a;
  }
  return s;
}

void ConfigFlags::apply(const std::function<void(const json&, const std::string&)>& merge) const {
  for (const auto& b : bindings_) {
    if (b.opt->count() == 0) continue;
    try {
      merge(nested(b.key, b.value()), b.opt->get_name());
    } catch (const ConfigError& e) {  // a bad command-line value is a usage error
      throw UsageError(e.what());
    }
  }
}

bool ConfigFlags::given(const std::string& key) const {
  for (const auto& b : bindings_)
    if (b.key == key) return b.opt->count() > 0;
  return false;
}

std::string ConfigFlags::differences(const std::string& title, const json& other) const {
  std::string s;
  for (const auto& b : bindings_) {
    const json* v = find_key(other, b.key);
    if (!v || *v == b.like) continue;
    s += (s.empty() ? "" : ", ") + b.opt->get_name() + " " + default_text(*v);
  }
  return s.empty() ? "" : "  " + title + ": " + s + "\n";
}

void add_precision_option(CLI::App* cmd, std::string& precision) {
  cmd->add_option("--precision", precision,
                  "fp32 (the own float kernels) or bf16 (bfloat16 through oneDNN, module by module, float "
                  "logits; CPU only; speed and accuracy in docs/bench.md)")
      ->check(CLI::IsMember({"fp32", "bf16"}))
      ->capture_default_str();
}

CLI::Validator at_least(int64_t n) {
  return CLI::Validator(
      [n](std::string& v) -> std::string {
        try {
          if (std::stoll(v) >= n) return std::string();
        } catch (const std::exception&) {
          return std::string();  // not an integer: the type check names it
        }
        return "Value " + v + " must be at least " + std::to_string(n);
      },
      "at least " + std::to_string(n));
}

void RunOptions::add(CLI::App* cmd, const std::string& what) {
  cmd->add_option("--config", config_file, "JSON config file (keys as in a run's config.json); flags override it");
  resume = cmd->add_option("--resume", resume_dir,
                           "Continue a " + what + " from its newest loadable checkpoint: --resume DIR, or --resume --out DIR")
               ->expected(0, 1)->type_name("[DIR]");
  cmd->add_flag("--print-config", print_config,
                "Print the fully resolved configuration (as config.json) and exit; reads no data, writes nothing");
  cmd->add_flag("-q,--quiet", quiet, "No progress or summary on stderr");
}

json RunOptions::config_overrides() const {
  if (config_file.empty()) return json::object();
  json j = read_json_file(config_file);
  if (!j.is_object()) throw ConfigError(config_file + ": expected a JSON object of configuration keys, got " + j.type_name());
  j.erase("preset");
  j.erase("scale");
  return j;
}

void RunOptions::resolve_out(std::string& out) const {
  if (resume_dir.empty()) return;
  if (!out.empty() && out != resume_dir)
    throw UsageError("--resume " + resume_dir + " and --out " + out + " name different run directories: give one");
  out = resume_dir;
}

void RunOptions::print(const json& config) const {
  if (resuming()) throw UsageError("--print-config shows a new run's configuration: not with --resume");
  std::printf("%s\n", config.dump(2).c_str());
}

std::function<void(const std::string&)> RunOptions::info() const {
  const bool q = quiet;
  return [q](const std::string& s) {
    if (!q) std::fprintf(stderr, "%s\n", s.c_str());
  };
}

}  // namespace noisydarts::cli
