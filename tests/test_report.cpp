// report.html and `noisydarts compare`: the page is well-formed XHTML (checked by a small XML
// parser below, independent of the one the library uses for Graphviz files), and the numbers
// drawn are the numbers in metrics.jsonl.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli_helpers.h"
#include <sys/wait.h>
#include <unistd.h>

#include "noisydarts/error.h"
#include "noisydarts/report.h"

using namespace noisydarts;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// ------------------------------------------------------------------------------------------
// A minimal validating-for-well-formedness XML parser (XML 1.0 section 2 subset): prolog,
// DOCTYPE without internal subset, comments, PIs, CDATA, elements, attributes (quoted, unique,
// no '<'), predefined and numeric character references, one root element, proper nesting.
// Throws std::runtime_error with the byte offset on the first violation.
// ------------------------------------------------------------------------------------------

struct Element {
  std::string name;
  std::map<std::string, std::string> attrs;
  std::vector<std::unique_ptr<Element>> children;
  std::string text;  // all character data directly inside, references resolved

  std::string attr(const std::string& k) const {
    auto it = attrs.find(k);
    return it == attrs.end() ? "" : it->second;
  }
  void walk(const std::function<void(const Element&)>& f) const {
    f(*this);
    for (const auto& c : children) c->walk(f);
  }
};

class XmlParser {
 public:
  explicit XmlParser(const std::string& s) : s_(s) {}

  std::unique_ptr<Element> parse() {
    if (s_.compare(0, 5, "<?xml") == 0) skip_pi();
    misc();
    if (s_.compare(i_, 9, "<!DOCTYPE") == 0) {
      const size_t e = s_.find('>', i_);
      if (e == std::string::npos || s_.substr(i_, e - i_).find('[') != std::string::npos) fail("bad DOCTYPE");
      i_ = e + 1;
      misc();
    }
    if (i_ >= s_.size() || s_[i_] != '<') fail("no root element");
    auto root = element();
    misc();
    if (i_ != s_.size()) fail("content after the root element");
    return root;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error(what + " at byte " + std::to_string(i_) + ": '" + s_.substr(i_, 40) + "'");
  }
  static bool name_start(char c) {
    return std::isalpha(static_cast<unsigned char>(c)) || c == '_' || c == ':' || (c & 0x80);
  }
  static bool name_char(char c) {
    return name_start(c) || std::isdigit(static_cast<unsigned char>(c)) || c == '-' || c == '.';
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  std::string name() {
    if (i_ >= s_.size() || !name_start(s_[i_])) fail("expected a name");
    const size_t b = i_;
    while (i_ < s_.size() && name_char(s_[i_])) ++i_;
    return s_.substr(b, i_ - b);
  }
  void skip_pi() {
    const size_t e = s_.find("?>", i_);
    if (e == std::string::npos) fail("unterminated processing instruction");
    i_ = e + 2;
  }
  void comment() {
    const size_t e = s_.find("--", i_ + 4);
    if (e == std::string::npos || s_.compare(e, 3, "-->") != 0) fail("bad comment ('--' inside)");
    i_ = e + 3;
  }
  void misc() {
    while (true) {
      ws();
      if (s_.compare(i_, 4, "<!--") == 0) comment();
      else if (s_.compare(i_, 2, "<?") == 0) skip_pi();
      else return;
    }
  }
  // A reference after '&': appends its character(s) as UTF-8.
  void reference(std::string& out) {
    const size_t semi = s_.find(';', i_);
    if (semi == std::string::npos || semi - i_ > 12) fail("unterminated reference");
    const std::string r = s_.substr(i_ + 1, semi - i_ - 1);
    static const std::map<std::string, std::string> kPre = {
        {"amp", "&"}, {"lt", "<"}, {"gt", ">"}, {"quot", "\""}, {"apos", "'"}};
    if (kPre.count(r)) {
      out += kPre.at(r);
    } else if (r.size() > 1 && r[0] == '#') {
      unsigned long cp = 0;
      try {
        cp = r[1] == 'x' ? std::stoul(r.substr(2), nullptr, 16) : std::stoul(r.substr(1), nullptr, 10);
      } catch (...) {
        fail("bad character reference");
      }
      if (cp == 0 || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) fail("invalid character reference");
      if (cp < 0x80) out += static_cast<char>(cp);
      else out += "?";  // content of non-ASCII references is not inspected by the tests
    } else {
      fail("undeclared entity &" + r + ";");
    }
    i_ = semi + 1;
  }
  std::unique_ptr<Element> element() {
    ++i_;  // '<'
    auto el = std::make_unique<Element>();
    el->name = name();
    while (true) {
      const size_t before = i_;
      ws();
      if (i_ >= s_.size()) fail("unterminated start tag");
      if (s_.compare(i_, 2, "/>") == 0) {
        i_ += 2;
        return el;
      }
      if (s_[i_] == '>') {
        ++i_;
        break;
      }
      if (i_ == before) fail("attributes must be separated by whitespace");
      const std::string an = name();
      ws();
      if (i_ >= s_.size() || s_[i_] != '=') fail("expected '=' after attribute " + an);
      ++i_;
      ws();
      const char q = i_ < s_.size() ? s_[i_] : 0;
      if (q != '"' && q != '\'') fail("unquoted attribute value");
      ++i_;
      std::string v;
      while (i_ < s_.size() && s_[i_] != q) {
        if (s_[i_] == '<') fail("'<' in attribute value");
        if (s_[i_] == '&') reference(v);
        else v += s_[i_++];
      }
      if (i_ >= s_.size()) fail("unterminated attribute value");
      ++i_;
      if (!el->attrs.emplace(an, v).second) fail("duplicate attribute " + an);
    }
    // Content.
    while (true) {
      if (i_ >= s_.size()) fail("unclosed element <" + el->name + ">");
      const char c = s_[i_];
      if (c == '<') {
        if (s_.compare(i_, 2, "</") == 0) {
          i_ += 2;
          const std::string n = name();
          if (n != el->name) fail("</" + n + "> closes <" + el->name + ">");
          ws();
          if (i_ >= s_.size() || s_[i_] != '>') fail("bad end tag");
          ++i_;
          return el;
        }
        if (s_.compare(i_, 4, "<!--") == 0) {
          comment();
        } else if (s_.compare(i_, 9, "<![CDATA[") == 0) {
          const size_t e = s_.find("]]>", i_);
          if (e == std::string::npos) fail("unterminated CDATA");
          el->text += s_.substr(i_ + 9, e - i_ - 9);
          i_ = e + 3;
        } else if (s_.compare(i_, 2, "<?") == 0) {
          if (s_.compare(i_, 6, "<?xml ") == 0) fail("XML declaration inside the document");
          skip_pi();
        } else {
          el->children.push_back(element());
        }
      } else if (c == '&') {
        reference(el->text);
      } else {
        if (s_.compare(i_, 3, "]]>") == 0) fail("']]>' in text");
        const unsigned char u = static_cast<unsigned char>(c);
        if (u < 0x20 && c != '\t' && c != '\n' && c != '\r') fail("control character in text");
        el->text += c;
        ++i_;
      }
    }
  }

  const std::string& s_;
  size_t i_ = 0;
};

std::unique_ptr<Element> parse_xml(const std::string& s) { return XmlParser(s).parse(); }

// ------------------------------------------------------------------------------------------
// A hand-made run directory: 3 epochs, 4 ops, 14 edges, awkward doubles.
// ------------------------------------------------------------------------------------------

const std::vector<std::string> kOps = {"none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"};

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary);
  f << s;
}

fs::path fresh_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("noisydarts_test_report_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// Softmax rows whose values need all 17 digits.
json alpha_table(int epoch, int cell) {
  json t = json::array();
  for (int e = 0; e < 14; ++e) {
    std::vector<double> z(kOps.size());
    double sum = 0;
    for (size_t k = 0; k < kOps.size(); ++k) {
      z[k] = std::exp(0.1 * std::sin(1.0 + e * 0.7 + k * 1.3 + cell) + (kOps[k] == "skip_connect" ? 0.3 * epoch : 0) +
                      0.05 * epoch * std::cos(e + k));
      sum += z[k];
    }
    json row = json::array();
    for (double v : z) row.push_back(v / sum);
    t.push_back(row);
  }
  return t;
}

const char* kGenotype =
    R"({"normal": [["sep_conv_3x3", 0], ["skip_connect", 1], ["sep_conv_3x3", 0], ["max_pool_3x3", 2],)"
    R"( ["skip_connect", 1], ["sep_conv_3x3", 3], ["sep_conv_3x3", 0], ["skip_connect", 4]], "normal_concat": [2, 3, 4, 5],)"
    R"( "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1], ["skip_connect", 2], ["max_pool_3x3", 1],)"
    R"( ["max_pool_3x3", 0], ["skip_connect", 2], ["skip_connect", 2], ["max_pool_3x3", 1]], "reduce_concat": [2, 3, 4, 5]})";

/// Writes config.json, metrics.jsonl and genotype.json; returns the metrics lines.
std::vector<json> make_run(const fs::path& dir, const std::string& preset, bool noise, bool hessian) {
  json cfg = {{"preset", preset},
              {"scale", "small"},
              {"dataset", "synthetic <&> \"quoted\" 'x'"},
              {"epochs", 3},
              {"channels", 4},
              {"layers", 3},
              {"steps", 4},
              {"seed", 0},
              {"lr", 0.025},
              {"arch_lr", 0.0003},
              {"primitives", kOps},
              {"noise", {{"type", noise ? "gaussian" : "none"}, {"lambda", 0.2}, {"mean", 0.0},
                         {"mixture", "additive"}, {"scale", "relative"}, {"decay", "none"}, {"ops", {"skip_connect"}}}}};
  write(dir / "config.json", cfg.dump(2));
  std::vector<json> lines;
  std::string text;
  for (int e = 1; e <= 3; ++e) {
    json m = {{"epoch", e},
              {"lr", 0.025 * std::cos(e / 3.0)},
              {"noise_scale", noise ? 0.2 : 0.0},
              {"noise_decay", 1.0},
              {"train_loss", 2.3 / e + 1.0 / 3},
              {"train_acc", 10.0 * e + 1.0 / 7},
              {"arch_loss", 2.2 / e},
              {"arch_acc", 9.5 * e},
              {"valid_loss", 2.25 / e},
              {"valid_acc", 11.0 * e + 2.0 / 3},
              {"seconds", 1.5 + e / 9.0},
              {"images_per_sec", 100.0 + e},
              {"skip_normal", e},
              {"skip_reduce", 3 - e},
              {"genotype", "not-a-genotype"},
              {"primitives", kOps},
              {"alphas_normal", alpha_table(e, 0)},
              {"alphas_reduce", alpha_table(e, 1)}};
    if (hessian && e != 2) m["hessian_eigenvalue"] = 0.1 * e + 1.0 / 11;
    lines.push_back(m);
    text += m.dump() + "\n";
  }
  write(dir / "metrics.jsonl", text);
  write(dir / "genotype.json", kGenotype);
  return lines;
}

std::vector<double> numbers(const std::string& s) {
  std::vector<double> v;
  std::istringstream in(s);
  std::string tok;
  while (in >> tok) v.push_back(std::stod(tok));
  return v;
}

/// Polylines of the page with their enclosing plot <svg>.
struct Line {
  const Element* polyline;
  const Element* svg;
};

std::vector<Line> polylines(const Element& root) {
  std::vector<Line> out;
  std::function<void(const Element&, const Element*)> rec = [&](const Element& e, const Element* svg) {
    if (e.name == "svg") svg = &e;
    if (e.name == "polyline") out.push_back({&e, svg});
    for (const auto& c : e.children) rec(*c, svg);
  };
  rec(root, nullptr);
  return out;
}

/// Checks that every point of the polyline is its value placed by the plot's declared axes.
void expect_points_match(const Line& l) {
  ASSERT_NE(l.svg, nullptr);
  const auto area = numbers(l.svg->attr("data-area"));
  const auto xr = numbers(l.svg->attr("data-x-range"));
  const auto yr = numbers(l.svg->attr("data-y-range"));
  ASSERT_EQ(area.size(), 4u);
  ASSERT_EQ(xr.size(), 2u);
  ASSERT_EQ(yr.size(), 2u);
  const auto xs = numbers(l.polyline->attr("data-x"));
  const auto ys = numbers(l.polyline->attr("data-values"));
  std::string pts = l.polyline->attr("points");
  for (auto& c : pts)
    if (c == ',') c = ' ';
  const auto p = numbers(pts);
  ASSERT_EQ(p.size(), 2 * xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    EXPECT_NEAR(p[2 * i], area[0] + (xs[i] - xr[0]) / (xr[1] - xr[0]) * area[2], 0.0051);
    EXPECT_NEAR(p[2 * i + 1], area[1] + (yr[1] - ys[i]) / (yr[1] - yr[0]) * area[3], 0.0051);
  }
}

std::string run_cli(const std::string& args, int* code) {
  const auto r = noisydarts::test::run_cli(args);
  *code = r.code;
  return r.out;
}

}  // namespace

TEST(Report, XmlCheckerRejectsMalformedPages) {
  // The checker itself must catch what would break the page.
  EXPECT_NO_THROW(parse_xml("<?xml version=\"1.0\"?>\n<!DOCTYPE html>\n<a x=\"1\"><b/>t &amp; &#39;</a>\n"));
  EXPECT_THROW(parse_xml("<a><b></a></b>"), std::runtime_error);
  EXPECT_THROW(parse_xml("<a x=\"1\" x=\"2\"/>"), std::runtime_error);
  EXPECT_THROW(parse_xml("<a>&nbsp;</a>"), std::runtime_error);
  EXPECT_THROW(parse_xml("<a>x < y</a>"), std::runtime_error);
  EXPECT_THROW(parse_xml("<a x=1/>"), std::runtime_error);
  EXPECT_THROW(parse_xml("<a/><b/>"), std::runtime_error);
  EXPECT_THROW(parse_xml("<?xml version=\"1.0\"?><!DOCTYPE svg><svg><?xml version=\"1.0\"?></svg>"),
               std::runtime_error);
}

TEST(Report, PageIsWellFormedXhtmlWithEscapedText) {
  const auto dir = fresh_dir("wellformed");
  make_run(dir, "noisydarts", true, true);
  const std::string path = write_report(dir.string());
  EXPECT_EQ(fs::path(path), dir / "report.html");
  const std::string page = read_file(path);
  std::unique_ptr<Element> root;
  ASSERT_NO_THROW(root = parse_xml(page));
  EXPECT_EQ(root->name, "html");
  EXPECT_EQ(root->attr("xmlns"), "http://www.w3.org/1999/xhtml");
  // The dataset name with markup characters comes back intact as text.
  bool found = false;
  size_t svgs = 0;
  root->walk([&](const Element& e) {
    found = found || e.text.find("synthetic <&> \"quoted\" 'x'") != std::string::npos;
    if (e.name == "svg") {
      ++svgs;
      EXPECT_EQ(e.attr("xmlns"), "http://www.w3.org/2000/svg");
    }
  });
  EXPECT_TRUE(found);
  EXPECT_GE(svgs, 28u + 2u);  // 2 x 14 edge panels + 2 cells
  // Self-contained: no external resources, links only to anchors of the page.
  root->walk([&](const Element& e) {
    EXPECT_EQ(e.attr("src"), "") << e.name;
    for (const char* a : {"href", "xlink:href"})
      if (!e.attr(a).empty()) EXPECT_EQ(e.attr(a)[0], '#') << e.name << " " << e.attr(a);
  });
  if (::access("/usr/bin/xmllint", X_OK) == 0) {
    EXPECT_EQ(std::system(("/usr/bin/xmllint --noout --nonet '" + path + "'").c_str()), 0);
  }
  fs::remove_all(dir);
}

TEST(Report, EveryEdgePanelPlotsTheAlphasOfMetricsJsonl) {
  const auto dir = fresh_dir("alphas");
  const auto lines = make_run(dir, "noisydarts", true, false);
  const auto root = parse_xml(read_file(write_report(dir.string())));
  std::map<std::string, int> seen;
  for (const auto& l : polylines(*root)) {
    const std::string key = l.polyline->attr("data-key");
    if (key != "alphas_normal" && key != "alphas_reduce") continue;
    const int edge = std::stoi(l.polyline->attr("data-edge"));
    const std::string op = l.polyline->attr("data-op");
    const auto col = std::find(kOps.begin(), kOps.end(), op) - kOps.begin();
    ASSERT_LT(col, static_cast<long>(kOps.size())) << op;
    ASSERT_EQ(l.svg->attr("data-cell") + std::to_string(edge), (key == "alphas_normal" ? "normal" : "reduce") + std::to_string(edge));
    const auto xs = numbers(l.polyline->attr("data-x"));
    const auto ys = numbers(l.polyline->attr("data-values"));
    ASSERT_EQ(ys.size(), lines.size());
    for (size_t i = 0; i < lines.size(); ++i) {
      EXPECT_EQ(xs[i], lines[i]["epoch"].get<double>());
      EXPECT_EQ(ys[i], lines[i][key][edge][col].get<double>()) << key << " edge " << edge << " " << op;  // exact
    }
    expect_points_match(l);
    ++seen[key + "/" + std::to_string(edge) + "/" + op];
  }
  EXPECT_EQ(seen.size(), 2u * 14u * kOps.size());
  for (const auto& [k, n] : seen) EXPECT_EQ(n, 1) << k;
  fs::remove_all(dir);
}

TEST(Report, ScalarCurvesEqualMetricsAndLeaveOutMissingEpochs) {
  const auto dir = fresh_dir("scalars");
  const auto lines = make_run(dir, "noisydarts", true, true);
  const auto root = parse_xml(read_file(write_report(dir.string())));
  std::map<std::string, const Line*> by_key;
  const auto all = polylines(*root);
  for (const auto& l : all)
    if (!l.polyline->attr("data-key").empty()) by_key[l.polyline->attr("data-key")] = &l;
  for (const char* key : {"skip_normal", "skip_reduce", "train_loss", "valid_acc", "noise_scale", "seconds", "lr"}) {
    ASSERT_TRUE(by_key.count(key)) << key;
    const auto ys = numbers(by_key[key]->polyline->attr("data-values"));
    ASSERT_EQ(ys.size(), lines.size()) << key;
    for (size_t i = 0; i < lines.size(); ++i) EXPECT_EQ(ys[i], lines[i][key].get<double>()) << key;
    expect_points_match(*by_key[key]);
  }
  // hessian_eigenvalue was recorded in epochs 1 and 3 only.
  ASSERT_TRUE(by_key.count("hessian_eigenvalue"));
  EXPECT_EQ(numbers(by_key["hessian_eigenvalue"]->polyline->attr("data-x")), (std::vector<double>{1, 3}));
  EXPECT_EQ(numbers(by_key["hessian_eigenvalue"]->polyline->attr("data-values")),
            (std::vector<double>{lines[0]["hessian_eigenvalue"].get<double>(), lines[2]["hessian_eigenvalue"].get<double>()}));
  // The JSON data block holds the same series.
  const Element* script = nullptr;
  root->walk([&](const Element& e) {
    if (e.name == "script" && e.attr("id") == "report-data") script = &e;
  });
  ASSERT_NE(script, nullptr);
  const json data = json::parse(script->text);
  for (size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(data["series"]["skip_normal"]["y"][i].get<double>(), lines[i]["skip_normal"].get<double>());
    EXPECT_EQ(data["alphas_reduce"][5]["skip_connect"][i].get<double>(), lines[i]["alphas_reduce"][5][2].get<double>());
  }
  fs::remove_all(dir);
}

TEST(Report, CellsAreDrawnWithoutGraphviz) {
  const auto dir = fresh_dir("drawn");
  make_run(dir, "darts", false, false);
  RunData run = load_run(dir.string());
  run.normal_svg.clear();
  run.reduce_svg.clear();
  const auto root = parse_xml(render_report(run));
  int drawn = 0;
  root->walk([&](const Element& e) {
    if (e.name == "svg" && e.attr("class") == "cell drawn") ++drawn;
  });
  EXPECT_EQ(drawn, 2);
  fs::remove_all(dir);
}

TEST(Report, BadRunDirectoriesNameTheFile) {
  const auto dir = fresh_dir("bad");
  EXPECT_THROW(load_run((dir / "missing").string()), ConfigError);
  EXPECT_THROW(load_run(dir.string()), ConfigError);  // empty: not a run directory
  make_run(dir, "noisydarts", true, false);
  write(dir / "metrics.jsonl", read_file(dir / "metrics.jsonl") + "{\"epoch\": 4, \"train_loss\": \n");
  try {
    load_run(dir.string());
    FAIL() << "malformed metrics accepted";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("metrics.jsonl line 4"), std::string::npos) << e.what();
  }
  write(dir / "metrics.jsonl", "{\"epoch\": 1, \"primitives\": [\"a\"], \"alphas_normal\": [[1.0], [1.0], [1.0]]}\n");
  EXPECT_THROW(load_run(dir.string()), DataError);  // 3 rows is not a cell
  write(dir / "metrics.jsonl", "{\"epoch\": 1, \"skip_normal\": \"two\"}\n");
  EXPECT_THROW(load_run(dir.string()), DataError);
  write(dir / "metrics.jsonl", "");
  write(dir / "config.json", "{\"preset\": ");
  try {
    load_run(dir.string());
    FAIL() << "malformed config accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

TEST(Report, CompareCommandPrintsTableAndWritesPage) {
  const auto base = fresh_dir("compare");
  const auto a = base / "noisy", b = base / "darts";
  fs::create_directories(a);
  fs::create_directories(b);
  make_run(a, "noisydarts", true, true);
  make_run(b, "darts", false, false);
  int code = -1;
  const std::string out =
      run_cli("compare '" + a.string() + "' '" + b.string() + "' --out '" + (base / "cmp.html").string() + "'", &code);
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("run"), std::string::npos);
  EXPECT_NE(out.find("hessian eig"), std::string::npos) << out;
  EXPECT_NE(out.find("noisy "), std::string::npos) << out;
  EXPECT_NE(out.find("gaussian 0.2"), std::string::npos) << out;
  EXPECT_NE(out.find("3/0"), std::string::npos) << out;  // final skip counts normal/reduce
  EXPECT_NE(out.find("33.67%"), std::string::npos) << out;  // final valid_acc 11 * 3 + 2 / 3
  const auto root = parse_xml(read_file(base / "cmp.html"));
  int runs = 0;
  for (const auto& l : polylines(*root))
    if (l.svg && l.polyline->attr("data-key") == "skip_normal") {
      ++runs;
      EXPECT_EQ(numbers(l.polyline->attr("data-values")), (std::vector<double>{1, 2, 3}));
    }
  EXPECT_EQ(runs, 2);
  // report on a missing directory: one line, config exit code.
  const std::string err = run_cli("report '" + (base / "nope").string() + "'", &code);
  EXPECT_EQ(code, kExitConfig) << err;
  EXPECT_NE(err.find("nope"), std::string::npos);
  fs::remove_all(base);
}
