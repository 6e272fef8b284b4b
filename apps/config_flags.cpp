#include "config_flags.h"

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
  else if (like->is_number_unsigned())  // CLI11 alone would wrap "-1" to 2^64-1
    o = cmd_->add_option(names, b.u, help)->check(CLI::Validator(
        [](std::string& v) {
          return v.find('-') == std::string::npos ? std::string() : "Value " + v + " must be a non-negative integer";
        },
        ""));
  else if (like->is_number_integer()) o = cmd_->add_option(names, b.i, help);
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

}  // namespace noisydarts::cli
