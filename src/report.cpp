// HTML reports of run directories: one self-contained XHTML page per run, and a comparison page.
//
// Layout of this file, top to bottom: text helpers (escaping, number formats), a small SVG plot
// helper (axes, ticks, polylines, legend), the cell diagrams (Graphviz SVG embedded, or drawn
// here), reading a run directory, the report page, the comparison page and table. The plot
// helper lives here rather than in its own translation unit because every TU costs ~30 s of
// LibTorch precompiled-header compile time and nothing else needs it.
#include "noisydarts/report.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "noisydarts/error.h"
#include "noisydarts/genotype.h"
#include "noisydarts/spaces.h"

namespace noisydarts {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// ------------------------------------------------------------------------------------------
// Text helpers
// ------------------------------------------------------------------------------------------

std::string strf(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string strf(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  const int n = std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  if (n < 0) return "";
  if (static_cast<size_t>(n) < sizeof buf) return std::string(buf, n);
  std::string s(n + 1, '\0');
  va_start(ap, f);
  std::vsnprintf(s.data(), s.size(), f, ap);
  va_end(ap);
  s.resize(n);
  return s;
}

// Valid UTF-8 of XML characters only: invalid byte sequences and control characters XML forbids
// become U+FFFD, so any path or op name can go into the page without breaking it.
std::string xml_clean(const std::string& s) {
  static const std::string kReplacement = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      if (c >= 0x20 || c == '\t' || c == '\n' || c == '\r') out += static_cast<char>(c);
      else out += kReplacement;
      ++i;
      continue;
    }
    int len = 0;
    uint32_t cp = 0;
    if ((c & 0xE0) == 0xC0) len = 2, cp = c & 0x1F;
    else if ((c & 0xF0) == 0xE0) len = 3, cp = c & 0x0F;
    else if ((c & 0xF8) == 0xF0) len = 4, cp = c & 0x07;
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      ok = (cc & 0xC0) == 0x80;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static const uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    ok = ok && cp >= kMin[len] && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF) && cp != 0xFFFE &&
         cp != 0xFFFF;
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += kReplacement;
      ++i;
    }
  }
  return out;
}

/// Escapes text for XML character data and attribute values (both quote styles).
std::string esc(const std::string& raw) {
  const std::string s = xml_clean(raw);
  std::string out;
  out.reserve(s.size() + 16);
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

/// JSON text safe inside an XHTML <script> element under both XML and HTML parsing: `<`, `>`
/// and `&` only occur inside JSON strings, where their \u escapes mean the same characters.
std::string script_json(const json& j) {
  const std::string d = j.dump(-1, ' ', false, json::error_handler_t::replace);
  std::string out;
  out.reserve(d.size());
  for (char c : d) {
    if (c == '<') out += "\\u003c";
    else if (c == '>') out += "\\u003e";
    else if (c == '&') out += "\\u0026";
    else out += c;
  }
  return out;
}

/// Exactly the text metrics.jsonl holds for `v` (shortest round-trip form), so a reader that
/// parses it gets the identical double.
std::string exact(double v) { return json(v).dump(); }

std::string join_exact(const std::vector<double>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ' ';
    s += exact(v[i]);
  }
  return s;
}

/// Pixel coordinate, two decimals (what the polylines use; the tests allow 0.005 px).
std::string px(double v) { return strf("%.2f", v); }

std::string short_num(double v) {
  if (!std::isfinite(v)) return "n/a";
  return strf("%.4g", v);
}

std::string format_seconds(double s) {
  if (!(s >= 0)) return "n/a";
  if (s < 60) return strf("%.1fs", s);
  const long t = std::lround(s);
  if (t < 3600) return strf("%ldm%02lds", t / 60, t % 60);
  return strf("%ldh%02ldm", t / 3600, (t % 3600) / 60);
}

std::string first_line(const std::string& s) {
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

/// nlohmann's message without its "[json.exception.parse_error.101] " prefix.
std::string json_message(const std::exception& e) {
  const std::string m = first_line(e.what());
  const auto p = m.find("] ");
  return m.rfind("[json.exception", 0) == 0 && p != std::string::npos ? m.substr(p + 2) : m;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// ------------------------------------------------------------------------------------------
// Colours
// ------------------------------------------------------------------------------------------

const char* kSkipColor = "#d62728";

/// Fixed colour per candidate op, so every panel and every report uses the same key;
/// skip_connect is red and drawn thick (the op whose weight NoisyDARTS keeps down).
std::string op_color(const std::string& op, size_t index) {
  static const std::map<std::string, std::string> kFixed = {
      {"none", "#9e9e9e"},         {"max_pool_3x3", "#1f77b4"}, {"avg_pool_3x3", "#17becf"},
      {"skip_connect", kSkipColor}, {"sep_conv_3x3", "#2ca02c"}, {"sep_conv_5x5", "#8c564b"},
      {"sep_conv_7x7", "#bcbd22"}, {"dil_conv_3x3", "#ff7f0e"}, {"dil_conv_5x5", "#9467bd"},
      {"conv_7x1_1x7", "#e377c2"}};
  static const char* kOther[] = {"#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"};
  const auto it = kFixed.find(op);
  return it != kFixed.end() ? it->second : kOther[index % 6];
}

/// Colours of runs (compare page) and of several series in one plot.
std::string series_color(size_t i) {
  static const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                   "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};
  return kPalette[i % 10];
}

// ------------------------------------------------------------------------------------------
// SVG plot helper
// ------------------------------------------------------------------------------------------

/// One line of a plot. `x`/`y` are the values as recorded; they are printed exactly into
/// data-x/data-values next to the pixel points.
struct Series {
  std::string label;
  std::string color = "#1f77b4";
  std::vector<double> x, y;
  double width = 1.6;
  bool emphasis = false;  ///< drawn last, thicker, bold in the legend
  std::string dash;       ///< stroke-dasharray, empty = solid
  std::vector<std::pair<std::string, std::string>> attrs;  ///< extra data-* attributes
};

struct Plot {
  std::string title;
  std::string xlabel = "epoch";
  std::string ylabel;
  double width = 430, height = 250;
  bool legend = true;
  bool integer_y = false;
  bool y_from_zero = false;
  std::optional<std::pair<double, double>> y_range;  ///< fixed axis range (shared panels)
  std::vector<double> hlines;                        ///< dashed reference lines
  std::string css_class = "plot";
  std::vector<std::pair<std::string, std::string>> attrs;  ///< extra attributes on <svg>
  std::string frame_color;                                 ///< highlighted frame, empty = none
  double margin_left = 56;                                 ///< room for the y tick labels
};

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `target` intervals.
double nice_step(double span, int target) {
  if (!(span > 0) || !std::isfinite(span)) return 1;
  const double raw = span / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double r = raw / mag;
  return (r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10) * mag;
}

int decimals_for(double step) {
  if (step >= 1) return 0;
  return std::min(12, static_cast<int>(std::ceil(-std::log10(step) - 1e-9)));
}

struct Axis {
  double lo, hi, step;
};

Axis make_axis(double lo, double hi, bool integer, int target) {
  if (!std::isfinite(lo) || !std::isfinite(hi)) lo = 0, hi = 1;
  if (hi < lo) std::swap(lo, hi);
  if (hi - lo < 1e-12 * std::max(1.0, std::fabs(hi))) {
    const double pad = integer ? 1 : std::max(std::fabs(hi) * 0.05, 1e-6);
    lo -= pad;
    hi += pad;
  }
  double step = nice_step(hi - lo, target);
  if (integer) step = std::max(1.0, std::round(step));
  return {std::floor(lo / step + 1e-9) * step, std::ceil(hi / step - 1e-9) * step, step};
}

std::string attr_list(const std::vector<std::pair<std::string, std::string>>& attrs) {
  std::string s;
  for (const auto& [k, v] : attrs) s += " " + k + "=\"" + esc(v) + "\"";
  return s;
}

/// Renders a line plot as an inline <svg>. The plotting area and the axis ranges are recorded on
/// the <svg> (data-area="left top width height", data-x-range, data-y-range) so a reader can map
/// every polyline point back to its value.
std::string render_plot(const Plot& p, const std::vector<Series>& series_in) {
  std::vector<const Series*> series;
  for (const auto& s : series_in)
    if (!s.x.empty()) series.push_back(&s);
  std::stable_sort(series.begin(), series.end(),
                   [](const Series* a, const Series* b) { return !a->emphasis && b->emphasis; });

  const double ml = p.margin_left, mr = 12, mt = p.title.empty() ? 10 : 24, mb = p.xlabel.empty() ? 24 : 38;
  // Legend below the plot, wrapped into rows (≈6.2 px per character at 11 px).
  std::vector<std::vector<std::pair<const Series*, double>>> rows;
  if (p.legend && !series.empty()) {
    rows.emplace_back();
    double x = ml;
    for (const auto& s : series_in) {
      if (s.x.empty()) continue;
      const double w = 26 + 6.2 * s.label.size() + 12;
      if (x + w > p.width - mr && !rows.back().empty()) {
        rows.emplace_back();
        x = ml;
      }
      rows.back().push_back({&s, x});
      x += w;
    }
  }
  const double legend_h = rows.size() * 15.0 + (rows.empty() ? 0 : 4);
  const double total_h = p.height + legend_h;
  const double pw = p.width - ml - mr, ph = p.height - mt - mb;

  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const auto* s : series) {
    for (double v : s->x) x0 = std::min(x0, v), x1 = std::max(x1, v);
    for (double v : s->y) y0 = std::min(y0, v), y1 = std::max(y1, v);
  }
  for (double h : p.hlines) y0 = std::min(y0, h), y1 = std::max(y1, h);
  if (p.y_from_zero) y0 = std::min(y0, 0.0);
  if (p.integer_y && !series.empty()) y1 += 1;  // headroom: counts at their maximum stay off the frame
  if (series.empty()) x0 = 1, x1 = 2, y0 = 0, y1 = 1;
  if (x1 - x0 < 1) x0 -= 0.5, x1 += 0.5;  // one epoch: centre it
  // Epoch axes are tight (no rounding out to the next tick); value axes round out.
  const double xl = x0, xh = x1;
  Axis ya = p.y_range ? make_axis(p.y_range->first, p.y_range->second, p.integer_y, 4)
                      : make_axis(y0, y1, p.integer_y, 5);
  if (p.y_range) ya.lo = p.y_range->first, ya.hi = p.y_range->second;
  const auto X = [&](double v) { return ml + (v - xl) / (xh - xl) * pw; };
  const auto Y = [&](double v) { return mt + (ya.hi - v) / (ya.hi - ya.lo) * ph; };

  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"" << esc(p.css_class) << "\" width=\""
    << px(p.width) << "\" height=\"" << px(total_h) << "\" viewBox=\"0 0 " << px(p.width) << " "
    << px(total_h) << "\" data-area=\"" << px(ml) << " " << px(mt) << " " << px(pw) << " " << px(ph)
    << "\" data-x-range=\"" << exact(xl) << " " << exact(xh) << "\" data-y-range=\"" << exact(ya.lo)
    << " " << exact(ya.hi) << "\"" << attr_list(p.attrs) << ">\n";
  if (!p.title.empty()) o << "<title>" << esc(p.title) << "</title>\n";
  o << "<rect x=\"" << px(ml) << "\" y=\"" << px(mt) << "\" width=\"" << px(pw) << "\" height=\"" << px(ph)
    << "\" fill=\"#ffffff\" stroke=\"" << (p.frame_color.empty() ? "#b0b0b0" : p.frame_color)
    << "\" stroke-width=\"" << (p.frame_color.empty() ? "1" : "2.5") << "\"/>\n";
  // Grid and tick labels.
  const int ydec = decimals_for(ya.step);
  // Ticks at multiples of the step (a fixed, shared range need not start on one).
  const double first_tick = std::ceil(ya.lo / ya.step - 1e-6) * ya.step;
  for (int k = 0; k < 50; ++k) {
    const double t = first_tick + k * ya.step;
    if (t > ya.hi + ya.step * 1e-6) break;
    const double y = Y(t);
    o << "<line x1=\"" << px(ml) << "\" y1=\"" << px(y) << "\" x2=\"" << px(ml + pw) << "\" y2=\"" << px(y)
      << "\" stroke=\"#e6e6e6\"/>"
      << "<text x=\"" << px(ml - 4) << "\" y=\"" << px(y + 3.5) << "\" class=\"tick\" text-anchor=\"end\">"
      << esc(strf("%.*f", ydec, std::fabs(t) < ya.step * 1e-6 ? 0.0 : t)) << "</text>\n";
  }
  const double xstep = std::max(1.0, make_axis(xl, xh, true, 6).step);
  for (double t = std::ceil(xl / xstep - 1e-9) * xstep; t <= xh + 1e-9; t += xstep) {
    const double x = X(t);
    o << "<line x1=\"" << px(x) << "\" y1=\"" << px(mt + ph) << "\" x2=\"" << px(x) << "\" y2=\"" << px(mt + ph + 4)
      << "\" stroke=\"#808080\"/>"
      << "<text x=\"" << px(x) << "\" y=\"" << px(mt + ph + 15) << "\" class=\"tick\" text-anchor=\"middle\">"
      << esc(strf("%g", t)) << "</text>\n";
  }
  if (!p.title.empty())
    o << "<text x=\"" << px(ml) << "\" y=\"" << px(mt - 8) << "\" class=\"ptitle\">" << esc(p.title) << "</text>\n";
  if (!p.xlabel.empty())
    o << "<text x=\"" << px(ml + pw / 2) << "\" y=\"" << px(mt + ph + 30) << "\" class=\"alabel\" text-anchor=\"middle\">"
      << esc(p.xlabel) << "</text>\n";
  if (!p.ylabel.empty())
    o << "<text transform=\"translate(12 " << px(mt + ph / 2) << ") rotate(-90)\" class=\"alabel\" text-anchor=\"middle\">"
      << esc(p.ylabel) << "</text>\n";
  for (double h : p.hlines)
    o << "<line class=\"ref\" x1=\"" << px(ml) << "\" y1=\"" << px(Y(h)) << "\" x2=\"" << px(ml + pw) << "\" y2=\""
      << px(Y(h)) << "\" stroke=\"#808080\" stroke-dasharray=\"3 3\"/>\n";
  if (series.empty())
    o << "<text x=\"" << px(ml + pw / 2) << "\" y=\"" << px(mt + ph / 2) << "\" class=\"tick\" text-anchor=\"middle\">"
      << "no data</text>\n";
  // The lines: one polyline per series with its exact data; markers when there are few points.
  for (const auto* s : series) {
    const double w = s->emphasis ? std::max(s->width, 2.8) : s->width;
    o << "<polyline class=\"series" << (s->emphasis ? " emphasis" : "") << "\" data-label=\"" << esc(s->label)
      << "\"" << attr_list(s->attrs) << " data-x=\"" << join_exact(s->x) << "\" data-values=\"" << join_exact(s->y)
      << "\" fill=\"none\" stroke=\"" << s->color << "\" stroke-width=\"" << w << "\" stroke-linejoin=\"round\"";
    if (!s->dash.empty()) o << " stroke-dasharray=\"" << s->dash << "\"";
    o << " points=\"";
    for (size_t i = 0; i < s->x.size(); ++i) o << (i ? " " : "") << px(X(s->x[i])) << "," << px(Y(s->y[i]));
    o << "\"><title>" << esc(s->label) << "</title></polyline>\n";
    if (s->x.size() <= 12)
      for (size_t i = 0; i < s->x.size(); ++i)
        o << "<circle cx=\"" << px(X(s->x[i])) << "\" cy=\"" << px(Y(s->y[i])) << "\" r=\"" << (s->emphasis ? 3 : 2.2)
          << "\" fill=\"" << s->color << "\"><title>" << esc(s->label + ", epoch " + strf("%g", s->x[i]) + ": " + short_num(s->y[i]))
          << "</title></circle>\n";
  }
  // Legend.
  for (size_t r = 0; r < rows.size(); ++r) {
    const double y = p.height + 4 + r * 15;
    for (const auto& [s, x] : rows[r]) {
      o << "<line x1=\"" << px(x) << "\" y1=\"" << px(y + 4) << "\" x2=\"" << px(x + 20) << "\" y2=\"" << px(y + 4)
        << "\" stroke=\"" << s->color << "\" stroke-width=\"" << (s->emphasis ? 3 : 2) << "\"";
      if (!s->dash.empty()) o << " stroke-dasharray=\"" << s->dash << "\"";
      o << "/><text x=\"" << px(x + 24) << "\" y=\"" << px(y + 8) << "\" class=\"legend" << (s->emphasis ? " emphasis" : "")
        << "\">" << esc(s->label) << "</text>\n";
    }
  }
  o << "</svg>\n";
  return o.str();
}

// ------------------------------------------------------------------------------------------
// Cell diagrams
// ------------------------------------------------------------------------------------------

/// Cheap structural check of an SVG we did not write (Graphviz's): balanced tags, quoted
/// attributes, only XML's predefined or numeric entities. A file failing it is not embedded.
bool looks_well_formed(const std::string& s) {
  std::vector<std::string> stack;
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] == '&') {
      const size_t semi = s.find(';', i);
      if (semi == std::string::npos || semi - i > 10) return false;
      const std::string name = s.substr(i + 1, semi - i - 1);
      if (name.empty() || (name[0] != '#' && name != "amp" && name != "lt" && name != "gt" && name != "quot" &&
                           name != "apos"))
        return false;
      i = semi + 1;
      continue;
    }
    if (s[i] != '<') {
      ++i;
      continue;
    }
    if (s.compare(i, 4, "<!--") == 0) {
      const size_t e = s.find("-->", i + 4);
      if (e == std::string::npos) return false;
      i = e + 3;
      continue;
    }
    if (s.compare(i, 9, "<![CDATA[") == 0) {
      const size_t e = s.find("]]>", i);
      if (e == std::string::npos) return false;
      i = e + 3;
      continue;
    }
    if (i + 1 < s.size() && (s[i + 1] == '?' || s[i + 1] == '!')) return false;  // no prolog/DTD here
    const bool closing = i + 1 < s.size() && s[i + 1] == '/';
    size_t j = i + (closing ? 2 : 1);
    const size_t name_start = j;
    while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == ':' || s[j] == '-' ||
                            s[j] == '_' || s[j] == '.'))
      ++j;
    const std::string name = s.substr(name_start, j - name_start);
    if (name.empty()) return false;
    char quote = 0;
    while (j < s.size() && (quote || s[j] != '>')) {
      if (quote && s[j] == quote) quote = 0;
      else if (!quote && (s[j] == '"' || s[j] == '\'')) quote = s[j];
      else if (s[j] == '<') return false;
      ++j;
    }
    if (j >= s.size()) return false;
    const bool self_closing = s[j - 1] == '/';
    if (closing) {
      if (stack.empty() || stack.back() != name) return false;
      stack.pop_back();
    } else if (!self_closing) {
      stack.push_back(name);
    }
    i = j + 1;
  }
  return stack.empty();
}

/// Graphviz's SVG made embeddable: prolog, DOCTYPE and comments removed, ids prefixed (two
/// diagrams on one page must not share ids), fixed pt size replaced by the page width.
/// Returns "" when the file does not look like a well-formed SVG.
std::string embed_graphviz_svg(const std::string& svg, const std::string& id_prefix) {
  const size_t b = svg.find("<svg");
  const size_t e = svg.rfind("</svg>");
  if (b == std::string::npos || e == std::string::npos || e < b) return "";
  std::string body = xml_clean(svg.substr(b, e + 6 - b));
  std::string out;
  for (size_t i = 0; i < body.size();) {
    if (body.compare(i, 4, "<!--") == 0) {
      const size_t end = body.find("-->", i + 4);
      if (end == std::string::npos) return "";
      i = end + 3;
    } else if (body.compare(i, 5, " id=\"") == 0) {
      out += " id=\"" + id_prefix + "-";
      i += 5;
    } else {
      out += body[i++];
    }
  }
  // Opening tag: drop width/height (pt), let CSS size it; the viewBox keeps the aspect.
  const size_t tag_end = out.find('>');
  std::string tag = out.substr(0, tag_end);
  for (const char* a : {" width=\"", " height=\""}) {
    const size_t p = tag.find(a);
    if (p == std::string::npos) continue;
    const size_t q = tag.find('"', p + std::strlen(a));
    if (q == std::string::npos) return "";
    tag.erase(p, q + 1 - p);
  }
  if (tag.find("xmlns=\"http://www.w3.org/2000/svg\"") == std::string::npos)
    tag += " xmlns=\"http://www.w3.org/2000/svg\"";
  out = tag + " class=\"cell graphviz\"" + out.substr(tag_end);
  return looks_well_formed(out) ? out : "";
}

std::string node_name(int index) {
  if (index == 0) return "c_{k-2}";
  if (index == 1) return "c_{k-1}";
  return std::to_string(index - 2);
}

/// A cell drawn without Graphviz: inputs left, intermediate nodes left to right, output right;
/// each edge a curve labelled with its op, skip connections red.
std::string draw_cell_svg(const std::vector<GeneEdge>& cell, const std::vector<int>& concat,
                          const std::string& title) {
  const int steps = static_cast<int>(cell.size() / 2);
  const double col = 170, w = 120 + (steps + 1) * col + 60, h = 340;
  std::vector<std::pair<double, double>> pos(steps + 3);
  pos[0] = {60, 70};
  pos[1] = {60, 270};
  for (int i = 0; i < steps; ++i) pos[i + 2] = {60 + (i + 1) * col, i % 2 ? 220 : 120};
  pos[steps + 2] = {60 + (steps + 1) * col, 170};
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"cell drawn\" viewBox=\"0 0 " << px(w) << " " << px(h)
    << "\" width=\"" << px(w) << "\" height=\"" << px(h) << "\"><title>" << esc(title) << "</title>\n"
    << "<text x=\"" << px(w / 2) << "\" y=\"18\" text-anchor=\"middle\" class=\"ptitle\">" << esc(title) << "</text>\n";
  std::ostringstream labels;
  const auto curve = [&](int from, int to, const std::string& color, double width, const std::string& label, int k) {
    const auto [xa, ya] = pos[from];
    const auto [xb, yb] = pos[to];
    const double bend = (k % 2 ? 1 : -1) * (18 + 10 * (to - from));
    const double cx = (xa + xb) / 2, cy = (ya + yb) / 2 + bend;
    o << "<path d=\"M" << px(xa) << "," << px(ya) << " Q" << px(cx) << "," << px(cy) << " " << px(xb) << "," << px(yb)
      << "\" fill=\"none\" stroke=\"" << color << "\" stroke-width=\"" << width << "\"/>\n";
    if (!label.empty()) {
      // A point at t = 0.6 of the curve: labels of edges sharing a source or a target part.
      const double t = 0.6, a = (1 - t) * (1 - t), b = 2 * t * (1 - t), c = t * t;
      const double lx = a * xa + b * cx + c * xb, ly = a * ya + b * cy + c * yb;
      const double tw = 6.2 * label.size() + 6;
      labels << "<rect x=\"" << px(lx - tw / 2) << "\" y=\"" << px(ly - 8) << "\" width=\"" << px(tw)
             << "\" height=\"14\" rx=\"3\" fill=\"#ffffff\" fill-opacity=\"0.85\"/>"
             << "<text x=\"" << px(lx) << "\" y=\"" << px(ly + 3) << "\" text-anchor=\"middle\" class=\"elabel\" fill=\""
             << color << "\">" << esc(label) << "</text>\n";
    }
  };
  for (size_t k = 0; k < cell.size(); ++k) {
    const int to = static_cast<int>(k / 2) + 2;
    const int from = std::clamp(cell[k].second, 0, to - 1);
    const bool skip = cell[k].first == "skip_connect";
    curve(from, to, skip ? kSkipColor : "#4d4d4d", skip ? 2.5 : 1.3, cell[k].first, static_cast<int>(k));
  }
  for (int c : concat)
    if (c >= 0 && c < steps + 2) curve(c, steps + 2, "#b0b0b0", 1, "", c);
  o << labels.str();
  for (int n = 0; n < steps + 3; ++n) {
    const auto [x, y] = pos[n];
    const std::string name = n == steps + 2 ? "c_{k}" : node_name(n);
    const double bw = n < 2 || n == steps + 2 ? 70 : 34;
    const char* fill = n < 2 ? "#add8e6" : n == steps + 2 ? "#ffffe0" : "#e0ffff";
    o << "<rect x=\"" << px(x - bw / 2) << "\" y=\"" << px(y - 15) << "\" width=\"" << px(bw)
      << "\" height=\"30\" fill=\"" << fill << "\" stroke=\"#000000\" stroke-width=\"1.5\"/>"
      << "<text x=\"" << px(x) << "\" y=\"" << px(y + 5) << "\" text-anchor=\"middle\" class=\"nlabel\">" << esc(name)
      << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

// ------------------------------------------------------------------------------------------
// Reading a run directory
// ------------------------------------------------------------------------------------------

std::optional<std::string> slurp(const fs::path& p) {
  std::error_code ec;
  if (!fs::is_regular_file(p, ec)) return std::nullopt;
  std::ifstream f(p, std::ios::binary);
  if (!f) return std::nullopt;
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

/// Intermediate node count of an alpha table with `rows` edges (node i has i + 2 inputs), or -1.
int steps_for_rows(size_t rows) {
  size_t total = 0;
  for (int s = 1; s <= 64; ++s) {
    total += s + 1;
    if (total == rows) return s;
    if (total > rows) break;
  }
  return -1;
}

/// (node, input) of every edge of a cell with `steps` intermediate nodes, in table order.
std::vector<std::pair<int, int>> edge_list(int steps) {
  std::vector<std::pair<int, int>> e;
  for (int n = 0; n < steps; ++n)
    for (int j = 0; j < n + 2; ++j) e.push_back({n, j});
  return e;
}

/// DARTS: the two cells' tables; nb201 / mbv2: the one table of the cell / chain.
const char* kAlphaKeys[] = {"alphas_normal", "alphas_reduce", "alphas"};

/// Checks one metrics line: known numeric keys are numbers (or null), alpha tables are
/// rectangular [edges][ops] with a triangular edge count and one column per primitive.
void check_metrics_line(const json& m, const std::string& where) {
  if (!m.is_object()) throw DataError(where + ": not a JSON object");
  if (m.contains("epoch") && !m["epoch"].is_number())
    throw DataError(where + ": 'epoch' is not a number");
  // The documented numeric keys (docs/run-directory.md); other keys are plotted when numeric.
  static const std::set<std::string> kNumeric = {
      "lr",        "noise_decay", "noise_scale",    "train_loss",  "train_acc",   "arch_loss",
      "arch_acc",  "valid_loss",  "valid_acc",      "seconds",     "images_per_sec", "skip_normal",
      "skip_reduce", "hessian_eigenvalue"};
  for (const auto& k : kNumeric)
    if (m.contains(k) && !m[k].is_number() && !m[k].is_null()) throw DataError(where + ": '" + k + "' is not a number");
  size_t width = 0;
  if (m.contains("primitives")) {
    const auto& p = m["primitives"];
    if (!p.is_array() || p.empty() || !std::all_of(p.begin(), p.end(), [](const json& x) { return x.is_string(); }))
      throw DataError(where + ": 'primitives' is not a list of op names");
    width = p.size();
  }
  for (const char* key : kAlphaKeys) {
    if (!m.contains(key)) continue;
    const auto& t = m[key];
    if (!t.is_array() || (std::string(key) != "alphas" && steps_for_rows(t.size()) < 0))
      throw DataError(where + ": '" + key + "' is not a table of 2, 5, 9, 14, ... edges");
    if (width == 0) throw DataError(where + ": '" + key + "' without 'primitives'");
    for (size_t r = 0; r < t.size(); ++r) {
      if (!t[r].is_array() || t[r].size() != width)
        throw DataError(where + ": '" + key + "' row " + std::to_string(r) + " has not " + std::to_string(width) +
                        " values (one per primitive)");
      for (const auto& v : t[r])
        if (!v.is_number()) throw DataError(where + ": '" + key + "' row " + std::to_string(r) + " holds a non-number");
    }
  }
}

std::string dir_label(const std::string& dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const std::string name = fs::path(d).filename().string();
  return name.empty() ? d : name;
}

// ------------------------------------------------------------------------------------------
// Per-epoch series
// ------------------------------------------------------------------------------------------

double epoch_x(const RunData& run, size_t i) {
  const auto& m = run.epochs[i];
  return m.contains("epoch") && m["epoch"].is_number() ? m["epoch"].get<double>() : static_cast<double>(i + 1);
}

/// Accuracies and losses use -1 for "not measured" (valid_* with --eval-valid false).
bool negative_means_missing(const std::string& key) {
  return ends_with(key, "_loss") || ends_with(key, "_acc") || key == "loss" || key == "acc";
}

/// The recorded values of a numeric key: epochs where it is absent, null or a sentinel are left out.
Series scalar_series(const RunData& run, const std::string& key) {
  Series s;
  s.label = key;
  s.attrs = {{"data-key", key}};
  for (size_t i = 0; i < run.epochs.size(); ++i) {
    const auto& m = run.epochs[i];
    if (!m.contains(key) || !m[key].is_number()) continue;
    const double v = m[key].get<double>();
    if (!std::isfinite(v) || (v < 0 && negative_means_missing(key))) continue;
    s.x.push_back(epoch_x(run, i));
    s.y.push_back(v);
  }
  return s;
}

/// Numeric per-epoch keys of a run, in first-seen order.
std::vector<std::string> numeric_keys(const RunData& run) {
  std::vector<std::string> keys;
  std::set<std::string> seen;
  for (const auto& m : run.epochs)
    for (const auto& [k, v] : m.items())
      if (v.is_number() && k != "epoch" && seen.insert(k).second) keys.push_back(k);
  return keys;
}

std::vector<std::string> primitives_of(const RunData& run) {
  for (auto it = run.epochs.rbegin(); it != run.epochs.rend(); ++it)
    if (it->contains("primitives")) return (*it)["primitives"].get<std::vector<std::string>>();
  if (run.config.contains("primitives") && run.config["primitives"].is_array()) {
    std::vector<std::string> p;
    for (const auto& x : run.config["primitives"])
      if (x.is_string()) p.push_back(x.get<std::string>());
    return p;
  }
  return {};
}

/// Mean (or max) over the edges of one op's softmax weight, per epoch.
Series op_weight_series(const RunData& run, const char* table_key, const std::string& op, bool max) {
  Series s;
  for (size_t i = 0; i < run.epochs.size(); ++i) {
    const auto& m = run.epochs[i];
    if (!m.contains(table_key) || !m.contains("primitives")) continue;
    const auto& prims = m["primitives"];
    const auto it = std::find(prims.begin(), prims.end(), op);
    if (it == prims.end()) continue;
    const size_t col = static_cast<size_t>(it - prims.begin());
    const auto& t = m[table_key];
    double acc = max ? -INFINITY : 0;
    for (const auto& row : t) acc = max ? std::max(acc, row[col].get<double>()) : acc + row[col].get<double>();
    s.x.push_back(epoch_x(run, i));
    s.y.push_back(max ? acc : acc / t.size());
  }
  return s;
}

// ------------------------------------------------------------------------------------------
// Pages
// ------------------------------------------------------------------------------------------

const char* kCss = R"(body{font-family:'DejaVu Sans',Arial,sans-serif;margin:24px;color:#202020;max-width:1500px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d0d0;padding-bottom:3px}
h3{font-size:15px;margin:16px 0 6px}p.note{color:#606060;font-size:13px;margin:4px 0}
table.summary{border-collapse:collapse;font-size:13px}table.summary td,table.summary th{border:1px solid #d0d0d0;padding:3px 8px;text-align:left;vertical-align:top}
table.summary th{background:#f2f2f2}code,pre{font-family:'DejaVu Sans Mono',monospace;font-size:12px}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;white-space:pre-wrap;overflow-wrap:anywhere}
.cells{display:flex;flex-wrap:wrap;gap:16px}.cellbox{flex:1 1 600px;min-width:400px;border:1px solid #e0e0e0;padding:6px}
svg.cell{width:100%;height:auto;max-height:340px}
.plots{display:flex;flex-wrap:wrap;gap:10px}.noderow{display:flex;gap:6px;margin-bottom:4px}
.tick{font-size:10px;fill:#505050}.ptitle{font-size:12px;font-weight:bold;fill:#202020}.alabel{font-size:11px;fill:#404040}
.legend{font-size:11px;fill:#202020}.legend.emphasis{font-weight:bold;fill:#d62728}
.elabel{font-size:11px}.nlabel{font-size:13px}
.key{display:inline-block;margin-right:14px;font-size:13px;white-space:nowrap}.key.skip{font-weight:bold;color:#d62728}
.kept{font-weight:bold;color:#2c6e2c}
)";

std::string page_head(const std::string& title) {
  return "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE html>\n"
         "<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>" +
         esc(title) + "</title>\n<style>\n" + kCss + "</style>\n</head>\n<body>\n";
}

std::optional<Genotype> final_genotype(const RunData& run, std::string* source) {
  if (!run.genotype.is_null()) {
    if (source) *source = "genotype.json";
    return genotype_from_json(run.genotype);  // validated by load_run
  }
  for (auto it = run.epochs.rbegin(); it != run.epochs.rend(); ++it) {
    if (!it->contains("genotype") || !(*it)["genotype"].is_string()) continue;
    try {
      Genotype g = genotype_from_text((*it)["genotype"].get<std::string>());
      if (source) *source = "metrics.jsonl (epoch " + strf("%g", epoch_x(run, it.base() - run.epochs.begin() - 1)) + ")";
      return g;
    } catch (const Error&) {
      return std::nullopt;
    }
  }
  return std::nullopt;
}

std::string cell_diagram(const RunData& run, const std::optional<Genotype>& g, bool reduce, const std::string& id_prefix) {
  if (g && g->space != "darts") {
    // nb201 cell / mbv2 chain: Graphviz's drawing (cell.svg / chain.svg, held in normal_svg), or
    // the genotype text above only.
    if (reduce) return "";
    const std::string embedded = run.genotype.is_null() ? "" : embed_graphviz_svg(run.normal_svg, id_prefix);
    return embedded.empty() ? "<p class=\"note\">No diagram (Graphviz `dot` was not installed).</p>\n" : embedded;
  }
  const std::string& svg = reduce ? run.reduce_svg : run.normal_svg;
  // Graphviz's drawing is only right when it shows the final genotype (genotype.json).
  if (!svg.empty() && !run.genotype.is_null()) {
    const std::string embedded = embed_graphviz_svg(svg, id_prefix);
    if (!embedded.empty()) return embedded;
  }
  if (!g) return "<p class=\"note\">No genotype recorded yet.</p>\n";
  return draw_cell_svg(reduce ? g->reduce : g->normal, reduce ? g->reduce_concat : g->normal_concat,
                       reduce ? "reduction cell" : "normal cell");
}

std::string noise_text(const json& c) {
  if (!c.contains("noise") || !c["noise"].is_object()) return "n/a";
  const auto& n = c["noise"];
  const std::string type = n.value("type", std::string("?"));
  if (type == "none") return "none";
  std::string s = type + " " + n.value("mixture", std::string("")) + ", lambda " +
                  short_num(n.value("lambda", NAN)) + " (" + n.value("scale", std::string("")) + "), mean " +
                  short_num(n.value("mean", NAN)) + ", decay " + n.value("decay", std::string(""));
  if (n.contains("ops") && n["ops"].is_array()) {
    std::string ops;
    for (const auto& o : n["ops"]) ops += (ops.empty() ? "" : ",") + (o.is_string() ? o.get<std::string>() : o.dump());
    s += ", on " + ops;
  }
  return s;
}

/// Short noise description for tables: "none" or "gaussian 0.2".
std::string noise_short(const json& c) {
  if (!c.contains("noise") || !c["noise"].is_object()) return "n/a";
  const auto& n = c["noise"];
  const std::string type = n.value("type", std::string("?"));
  if (type == "none") return "none";
  std::string s = type + " " + short_num(n.value("lambda", NAN));
  if (n.value("decay", std::string("none")) != "none") s += " " + n.value("decay", std::string(""));
  return s;
}

std::string config_value(const json& c, const char* key) {
  if (!c.contains(key)) return "";
  const auto& v = c[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_float()) return short_num(v.get<double>());
  if (v.is_array()) {
    std::string s;
    for (const auto& x : v) s += (s.empty() ? "" : ", ") + (x.is_string() ? x.get<std::string>() : x.dump());
    return s;
  }
  return v.dump();
}

/// Final value of a numeric key (last epoch that has it, sentinels skipped), NaN when absent.
double last_value(const RunData& run, const std::string& key) {
  const Series s = scalar_series(run, key);
  return s.y.empty() ? NAN : s.y.back();
}

double total_seconds(const RunData& run) {
  const Series s = scalar_series(run, "seconds");
  double t = 0;
  for (double v : s.y) t += v;
  return s.y.empty() ? NAN : t;
}

std::string pct(double v) { return std::isfinite(v) ? strf("%.2f%%", v) : "n/a"; }

std::string skips_text(const RunData& run) {
  const double n = last_value(run, "skip_normal"), r = last_value(run, "skip_reduce");
  if (!std::isfinite(n) && !std::isfinite(r)) return "n/a";
  return (std::isfinite(n) ? strf("%g", n) : "?") + "/" + (std::isfinite(r) ? strf("%g", r) : "?");
}

std::string genotype_profile(const std::vector<GeneEdge>& cell) {
  std::map<std::string, int> count;
  for (const auto& e : cell) ++count[e.first];
  std::vector<std::pair<std::string, int>> v(count.begin(), count.end());
  std::stable_sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  std::string s;
  for (const auto& [op, n] : v) s += (s.empty() ? "" : ", ") + std::to_string(n) + "x " + op;
  return s;
}

struct Group {
  std::string title, ylabel;
  std::vector<std::string> keys;
  bool integer = false, from_zero = false;
};

/// Sorts the numeric per-epoch keys into plots. Known keys get their plot; any other numeric key
/// (train runs, future additions) gets a plot of its own, so nothing recorded is left out.
std::vector<Group> group_keys(const std::vector<std::string>& keys) {
  std::vector<Group> g = {{"Loss", "cross-entropy", {}},
                          {"Accuracy", "%", {}},
                          {"Skip connections in the derived cells", "count", {}, true, true},
                          {"Noise", "scale", {}, false, true},
                          {"Hessian dominant eigenvalue", "eigenvalue", {}},
                          {"Learning rate", "lr", {}, false, true},
                          {"Seconds per epoch", "s", {}, false, true},
                          {"Throughput", "images/s", {}, false, true}};
  std::vector<Group> other;
  for (const auto& k : keys) {
    int i = -1;
    if (ends_with(k, "_loss") || k == "loss") i = 0;
    else if (ends_with(k, "_acc") || k == "acc" || k.find("top1") != std::string::npos || k.find("top5") != std::string::npos) i = 1;
    else if (k == "skip_normal" || k == "skip_reduce") i = 2;
    else if (k.rfind("noise_", 0) == 0) i = 3;
    else if (k.find("hessian") != std::string::npos || k.find("eigen") != std::string::npos) i = 4;
    else if (k == "lr" || ends_with(k, "_lr")) i = 5;
    else if (k == "seconds" || ends_with(k, "_seconds")) i = 6;
    else if (k == "images_per_sec" || ends_with(k, "_per_sec")) i = 7;
    if (i >= 0) g[i].keys.push_back(k);
    else other.push_back({k, "", {k}});
  }
  g.insert(g.end(), other.begin(), other.end());
  return g;
}

std::string render_alpha_section(const RunData& run, const std::optional<Genotype>& g, json& data) {
  const std::vector<std::string> prims = primitives_of(run);
  std::ostringstream o;
  o << "<h2 id=\"alphas\">Architecture weights: softmax(alpha) per edge over the epochs</h2>\n";
  bool any = false;
  for (const char* key : kAlphaKeys)
    for (const auto& m : run.epochs) any = any || m.contains(key);
  if (!any || prims.empty()) {
    o << "<p class=\"note\">This run recorded no architecture weights.</p>\n";
    return o.str();
  }
  o << "<p class=\"note\">One panel per edge or layer (rows of the alpha table, node by node). The dashed line is the "
       "uniform weight 1/"
    << prims.size() << ". The y axis is shared by all panels of a cell. Panels framed in green are the edges kept "
    << "in the final genotype, with the op kept.</p>\n<p class=\"legendbar\">";
  for (size_t k = 0; k < prims.size(); ++k) {
    const bool skip = prims[k] == "skip_connect";
    o << "<span class=\"key" << (skip ? " skip" : "") << "\"><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"26\" "
      << "height=\"10\"><line x1=\"1\" y1=\"5\" x2=\"25\" y2=\"5\" stroke=\"" << op_color(prims[k], k)
      << "\" stroke-width=\"" << (skip ? 3.5 : 2) << "\"/></svg> " << esc(prims[k]) << "</span>";
  }
  o << "</p>\n";
  for (int c = 0; c < 3; ++c) {
    const char* key = kAlphaKeys[c];
    size_t rows = 0;
    double lo = INFINITY, hi = -INFINITY;
    for (const auto& m : run.epochs) {
      if (!m.contains(key)) continue;
      rows = m[key].size();
      for (const auto& r : m[key])
        for (const auto& v : r) lo = std::min(lo, v.get<double>()), hi = std::max(hi, v.get<double>());
    }
    if (rows == 0) continue;
    lo = std::min(lo, 1.0 / prims.size());
    hi = std::max(hi, 1.0 / prims.size());
    const Axis shared = make_axis(lo, hi, false, 4);
    // Per row of the table: the panel row it goes in, its title and the op the genotype kept.
    struct RowInfo {
      int group;
      std::string title, kept;
    };
    std::vector<RowInfo> info;
    std::string heading;
    if (c < 2) {  // a DARTS cell: one panel row per intermediate node, 2 of its edges kept
      heading = c == 0 ? "Normal cell" : "Reduction cell";
      const int steps = steps_for_rows(rows);
      const std::vector<GeneEdge>* kept = g && g->space == "darts" ? (c == 0 ? &g->normal : &g->reduce) : nullptr;
      for (const auto& [node, input] : edge_list(steps)) {
        std::string k;
        if (kept && kept->size() == static_cast<size_t>(2 * steps))
          for (int j = 0; j < 2; ++j)
            if ((*kept)[2 * node + j].second == input) k = (*kept)[2 * node + j].first;
        info.push_back({node, "node " + std::to_string(node) + " \u2190 " + node_name(input), k});
      }
    } else if (rows == nb201_edges().size()) {  // the NAS-Bench-201 cell: every edge kept
      heading = "NAS-Bench-201 cell (node j \u2190 node i)";
      for (size_t e = 0; e < rows; ++e) {
        const auto [j, i] = nb201_edges()[e];
        const bool known = g && g->space == "nb201";
        info.push_back({j, "node " + std::to_string(j) + " \u2190 " + std::to_string(i), known ? g->normal[e].first : ""});
      }
    } else {  // the mbv2 chain: one panel row per stage width
      heading = "mbv2 chain (one panel per layer)";
      const auto& layout = mbv2_layout();
      for (size_t e = 0; e < rows; ++e) {
        const int64_t width = e < layout.size() ? layout[e].out_channels : 0;
        const bool known = g && g->space == "mbv2" && e < g->layers.size();
        info.push_back({static_cast<int>(width), "layer " + std::to_string(e) + " (" + std::to_string(width) + " ch)",
                        known ? g->layers[e] : ""});
      }
    }
    o << "<h3>" << esc(heading) << "</h3>\n<div class=\"panels\">\n";
    int row_group = -1;
    json jcell = json::array();
    for (size_t e = 0; e < rows && e < info.size(); ++e) {
      if (info[e].group != row_group) {
        o << (row_group >= 0 ? "</div>\n" : "") << "<div class=\"noderow\">";
        row_group = info[e].group;
      }
      const std::string& kept_op = info[e].kept;
      std::vector<Series> series;
      json jedge = json::object();
      for (size_t k = 0; k < prims.size(); ++k) {
        Series s;
        s.label = prims[k];
        s.color = op_color(prims[k], k);
        s.emphasis = prims[k] == "skip_connect";
        s.width = 1.3;
        s.attrs = {{"data-key", key}, {"data-edge", std::to_string(e)}, {"data-op", prims[k]}};
        for (size_t i = 0; i < run.epochs.size(); ++i) {
          const auto& m = run.epochs[i];
          if (!m.contains(key) || m[key].size() != rows) continue;
          s.x.push_back(epoch_x(run, i));
          s.y.push_back(m[key][e][k].get<double>());
        }
        jedge[prims[k]] = s.y;
        series.push_back(std::move(s));
      }
      jcell.push_back(jedge);
      Plot p;
      p.title = info[e].title + (kept_op.empty() ? "" : "  \u2713");
      p.xlabel = "";
      p.width = 250;
      p.height = 160;
      p.margin_left = 46;
      p.legend = false;
      p.y_range = std::make_pair(shared.lo, shared.hi);
      p.hlines = {1.0 / prims.size()};
      p.css_class = "plot edge-panel";
      p.frame_color = kept_op.empty() ? "" : "#2c8c2c";
      p.attrs = {{"data-cell", c == 0 ? "normal" : c == 1 ? "reduce" : "cell"}, {"data-edge", std::to_string(e)}};
      if (!kept_op.empty()) p.attrs.push_back({"data-kept", kept_op});
      o << "<div>" << render_plot(p, series);
      if (!kept_op.empty()) o << "<div class=\"kept\" style=\"font-size:11px\">kept: " << esc(kept_op) << "</div>";
      o << "</div>\n";
    }
    o << "</div>\n</div>\n";
    data[key] = jcell;
  }
  return o.str();
}

std::string render_curves(const RunData& run, json& data) {
  std::ostringstream o;
  o << "<h2 id=\"curves\">Training curves</h2>\n";
  if (run.epochs.empty()) {
    o << "<p class=\"note\">No epoch finished yet (metrics.jsonl is empty or absent).</p>\n";
    return o.str();
  }
  o << "<div class=\"plots\">\n";
  bool hessian = false;
  json jseries = json::object();
  for (const auto& grp : group_keys(numeric_keys(run))) {
    if (grp.keys.empty()) continue;
    hessian = hessian || grp.title.rfind("Hessian", 0) == 0;
    std::vector<Series> series;
    for (size_t i = 0; i < grp.keys.size(); ++i) {
      Series s = scalar_series(run, grp.keys[i]);
      s.color = series_color(i);
      jseries[grp.keys[i]] = {{"x", s.x}, {"y", s.y}};
      series.push_back(std::move(s));
    }
    Plot p;
    p.title = grp.title;
    p.ylabel = grp.ylabel;
    p.integer_y = grp.integer;
    p.y_from_zero = grp.from_zero;
    o << render_plot(p, series);
    if (grp.keys[0] == "skip_normal" || grp.keys[0] == "skip_reduce") {
      // Where the skip counts come from: the skip_connect weight itself.
      std::vector<Series> w;
      const char* names[] = {"normal", "reduce"};
      for (int c = 0; c < 2; ++c)
        for (int mx = 0; mx < 2; ++mx) {
          Series s = op_weight_series(run, kAlphaKeys[c], "skip_connect", mx == 1);
          s.label = std::string(names[c]) + (mx ? " max" : " mean") + " over edges";
          s.color = series_color(c);
          s.dash = mx ? "5 3" : "";
          s.attrs = {{"data-key", std::string("skip_connect_") + (mx ? "max_" : "mean_") + names[c]}};
          if (!s.x.empty()) w.push_back(std::move(s));
        }
      if (!w.empty()) {
        Plot q;
        q.title = "skip_connect weight softmax(alpha)";
        q.ylabel = "weight";
        q.y_from_zero = true;
        o << render_plot(q, w);
      }
    }
  }
  o << "</div>\n";
  if (!hessian)
    o << "<p class=\"note\">No Hessian eigenvalue recorded in this run (key hessian_eigenvalue absent).</p>\n";
  data["series"] = jseries;
  return o.str();
}

// How decisive the genotype is (genotype.json's `margins`): the smallest op and edge margins and
// how many kept ops are below 0.1/K. Empty without margins.
std::string margins_text(const json& g) {
  if (!g.is_object() || !g.contains("margins") || !g["margins"].is_object()) return "";
  const json& m = g["margins"];
  const double threshold = m.value("threshold", 0.0);
  double op = std::numeric_limits<double>::infinity(), edge = op;
  int below = 0, kept = 0;
  for (const char* part : {"normal", "reduce", "layers"}) {
    if (!m.contains(part) || !m[part].is_array()) continue;
    for (const auto& e : m[part]) {
      if (!e.is_object() || !e.contains("op_margin") || !e["op_margin"].is_number()) continue;
      ++kept;
      op = std::min(op, e["op_margin"].get<double>());
      below += e["op_margin"].get<double>() < threshold;
      if (e.contains("edge_margin") && e["edge_margin"].is_number()) edge = std::min(edge, e["edge_margin"].get<double>());
    }
  }
  if (kept == 0) return "";
  std::string s = "smallest op margin " + short_num(op);
  if (std::isfinite(edge)) s += ", smallest edge margin " + short_num(edge);
  s += "; " + std::to_string(below) + " of " + std::to_string(kept) + " kept ops below 0.1/K = " + short_num(threshold);
  if (below > 0) s += " (undecided: another seed would likely change the cell)";
  return s;
}

std::string summary_rows(const RunData& run) {
  const json& c = run.config;
  std::ostringstream o;
  const auto row = [&](const std::string& k, const std::string& v) {
    if (!v.empty()) o << "<tr><th>" << esc(k) << "</th><td>" << esc(v) << "</td></tr>\n";
  };
  row("run directory", run.dir);
  row("preset", config_value(c, "preset") + (c.contains("scale") ? " (scale " + config_value(c, "scale") + ")" : ""));
  if (c.contains("noise")) row("noise", noise_text(c));
  row("dataset", config_value(c, "dataset"));
  std::string net;
  if (c.contains("channels")) net = "C=" + config_value(c, "channels") + ", layers " + config_value(c, "layers") +
                                    ", " + config_value(c, "steps") + " nodes";
  row("network", net);
  row("batch size", config_value(c, "batch_size"));
  row("epochs", std::to_string(run.epochs.size()) + (c.contains("epochs") ? " of " + config_value(c, "epochs") : "") +
                    " finished");
  row("lr / arch lr", c.contains("lr") ? config_value(c, "lr") + " / " + config_value(c, "arch_lr") : "");
  row("order", config_value(c, "order"));
  row("seed", config_value(c, "seed"));
  row("primitives", config_value(c, "primitives"));
  if (!run.epochs.empty()) {
    row("final skip connections (normal/reduce)", skips_text(run));
    std::string acc;
    for (const auto& k : numeric_keys(run))
      if (ends_with(k, "_acc")) acc += (acc.empty() ? "" : ", ") + k + " " + pct(last_value(run, k));
    row("final accuracies", acc);
    const double hess = last_value(run, "hessian_eigenvalue");
    if (std::isfinite(hess)) row("final Hessian eigenvalue", short_num(hess));
    row("compute time", format_seconds(total_seconds(run)));
  }
  row("genotype margins", margins_text(run.genotype));
  return o.str();
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Public API
// ------------------------------------------------------------------------------------------

/// Reads the Graphviz drawings of the run's genotype: normal.svg and reduce.svg (DARTS cells),
/// else cell.svg (nb201) or chain.svg (mbv2) into normal_svg. Missing files leave them empty.
void load_diagrams(RunData& run, const fs::path& dir) {
  const std::string space = run.genotype.is_object() ? run.genotype.value("space", std::string("darts")) : "darts";
  run.normal_svg = slurp(dir / (space == "nb201" ? "cell.svg" : space == "mbv2" ? "chain.svg" : "normal.svg")).value_or("");
  run.reduce_svg = space == "darts" ? slurp(dir / "reduce.svg").value_or("") : "";
}

RunData load_run(const std::string& run_dir) {
  std::error_code ec;
  if (!fs::exists(run_dir, ec)) throw ConfigError("run directory " + run_dir + " does not exist");
  if (!fs::is_directory(run_dir, ec)) throw ConfigError(run_dir + " is not a run directory (not a directory)");
  const fs::path dir(run_dir);
  RunData run;
  run.dir = run_dir;
  run.label = dir_label(run_dir);
  run.config = json::object();
  const auto config_text = slurp(dir / "config.json");
  const auto metrics_text = slurp(dir / "metrics.jsonl");
  if (!config_text && !metrics_text)
    throw ConfigError(run_dir + " is not a run directory (no config.json or metrics.jsonl)");
  if (config_text) {
    const std::string path = (dir / "config.json").string();
    try {
      run.config = json::parse(*config_text);
    } catch (const json::exception& e) {
      throw ConfigError(path + ": malformed JSON: " + json_message(e));
    }
    if (!run.config.is_object()) throw ConfigError(path + ": not a JSON object");
  }
  if (metrics_text) {
    const std::string path = (dir / "metrics.jsonl").string();
    std::istringstream in(*metrics_text);
    std::string line;
    size_t lineno = 0;
    size_t rows[2] = {0, 0};
    while (std::getline(in, line)) {
      ++lineno;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = path + " line " + std::to_string(lineno);
      json m;
      try {
        m = json::parse(line);
      } catch (const json::exception& e) {
        throw DataError(where + ": malformed JSON: " + json_message(e));
      }
      check_metrics_line(m, where);
      for (int c = 0; c < 2; ++c) {
        if (!m.contains(kAlphaKeys[c])) continue;
        if (rows[c] && rows[c] != m[kAlphaKeys[c]].size())
          throw DataError(where + ": '" + kAlphaKeys[c] + "' has " + std::to_string(m[kAlphaKeys[c]].size()) +
                          " edges, earlier lines " + std::to_string(rows[c]));
        rows[c] = m[kAlphaKeys[c]].size();
      }
      run.epochs.push_back(std::move(m));
    }
  }
  if (const auto g = slurp(dir / "genotype.json")) {
    const std::string path = (dir / "genotype.json").string();
    try {
      run.genotype = json::parse(*g);
      genotype_from_json(run.genotype);  // validates
    } catch (const json::exception& e) {
      throw ConfigError(path + ": malformed JSON: " + json_message(e));
    } catch (const ConfigError& e) {
      throw ConfigError(path + ": " + first_line(e.what()));
    }
  }
  load_diagrams(run, dir);
  run.landscape_svg = slurp(dir / "landscape" / "landscape.svg").value_or("");
  return run;
}

std::string render_report(const RunData& run) {
  std::string g_source;
  const std::optional<Genotype> g = final_genotype(run, &g_source);
  json data = {{"run", xml_clean(run.dir)}, {"label", xml_clean(run.label)}};
  std::ostringstream o;
  const std::string kind = run.config.contains("preset") ? config_value(run.config, "preset") + " " : "";
  o << page_head("NoisyDARTS report: " + run.label);
  o << "<h1>NoisyDARTS report: " << esc(run.label) << "</h1>\n<p class=\"note\">" << esc(kind)
    << "run, written by noisydarts report. Sections: <a href=\"#cells\">cells</a>, <a href=\"#alphas\">"
    << "architecture weights</a>, <a href=\"#curves\">training curves</a>, <a href=\"#config\">config</a>.</p>\n";
  o << "<h2>Summary</h2>\n<table class=\"summary\">\n" << summary_rows(run) << "</table>\n";

  o << "<h2 id=\"cells\">Derived cells</h2>\n";
  if (g) {
    o << "<p class=\"note\">From " << esc(g_source) << ". Skip connections in red. Genotype:</p>\n<pre>"
      << esc(genotype_to_text(*g)) << "</pre>\n";
    data["genotype"] = genotype_to_json(*g);
  }
  o << "<div class=\"cells\">\n";
  for (int c = 0; c < 2; ++c)
    o << "<div class=\"cellbox\">" << cell_diagram(run, g, c == 1, c == 0 ? "normal" : "reduce") << "</div>\n";
  o << "</div>\n";

  o << render_alpha_section(run, g, data);
  o << render_curves(run, data);
  if (!run.landscape_svg.empty() && looks_well_formed(run.landscape_svg)) {
    // `noisydarts landscape` wrote DIR/landscape/ (our own SVG, embedded as it is).
    o << "<h2 id=\"landscape\">Loss landscape</h2>\n<p class=\"note\">landscape/landscape.svg: validation loss over "
         "alpha + a d1 + b d2 (cross: the run's alphas; circle: the minimum). landscape/landscape.json has the values.</p>\n";
    const size_t b = run.landscape_svg.find("<svg");
    o << "<div>" << run.landscape_svg.substr(b) << "</div>\n";
    data["landscape"] = true;
  }

  o << "<h2 id=\"config\">Configuration</h2>\n<details><summary>config.json</summary>\n<pre>"
    << esc(run.config.dump(2, ' ', false, json::error_handler_t::replace)) << "</pre>\n</details>\n";
  o << "<script type=\"application/json\" id=\"report-data\">" << script_json(data) << "</script>\n";
  o << "</body>\n</html>\n";
  return o.str();
}

std::string write_report(const std::string& run_dir) {
  RunData run = load_run(run_dir);
  if (!run.genotype.is_null()) {
    // Graphviz may have been installed after the search: render the diagrams now if it is.
    try {
      const Genotype g = genotype_from_json(run.genotype);
      if (run.normal_svg.empty() || (g.space == "darts" && run.reduce_svg.empty())) {
        write_genotype_diagrams(g, run_dir);
        load_diagrams(run, run_dir);
      }
    } catch (const Error&) {
      // Diagrams are drawn by the report itself then.
    }
  }
  const std::string path = (fs::path(run_dir) / "report.html").string();
  write_file_atomic(path, render_report(run));
  return path;
}

std::string compare_table(const std::vector<RunData>& runs) {
  bool hessian = false;
  for (const auto& r : runs) hessian = hessian || std::isfinite(last_value(r, "hessian_eigenvalue"));
  std::vector<std::string> head = {"run", "preset", "noise", "epochs", "skips N/R", "train acc", "valid acc"};
  if (hessian) head.push_back("hessian eig");
  head.push_back("time");
  std::vector<std::vector<std::string>> rows;
  for (const auto& r : runs) {
    std::vector<std::string> row = {r.label, config_value(r.config, "preset"), noise_short(r.config),
                                    std::to_string(r.epochs.size()), skips_text(r),
                                    pct(last_value(r, "train_acc")), pct(last_value(r, "valid_acc"))};
    if (hessian) row.push_back(short_num(last_value(r, "hessian_eigenvalue")));
    row.push_back(format_seconds(total_seconds(r)));
    for (auto& v : row)
      if (v.empty()) v = "n/a";
    rows.push_back(row);
  }
  std::vector<size_t> w(head.size());
  for (size_t i = 0; i < head.size(); ++i) {
    w[i] = head[i].size();
    for (const auto& r : rows) w[i] = std::max(w[i], r[i].size());
  }
  std::ostringstream o;
  const auto line = [&](const std::vector<std::string>& cells) {
    std::string s;
    for (size_t i = 0; i < cells.size(); ++i) {
      s += cells[i];
      if (i + 1 < cells.size()) s += std::string(w[i] - cells[i].size() + 2, ' ');
    }
    o << s << "\n";
  };
  line(head);
  std::vector<std::string> rule;
  for (size_t x : w) rule.push_back(std::string(x, '-'));
  line(rule);
  for (const auto& r : rows) line(r);
  o << "\n";
  for (const auto& r : runs) {
    const auto g = final_genotype(r, nullptr);
    if (!g) {
      o << r.label << ": no genotype\n";
      continue;
    }
    o << r.label << ": normal " << genotype_profile(g->normal) << "; reduce " << genotype_profile(g->reduce) << "\n  "
      << genotype_to_text(*g) << "\n";
  }
  return o.str();
}

std::string render_compare(const std::vector<RunData>& runs) {
  std::ostringstream o;
  o << page_head("NoisyDARTS comparison of " + std::to_string(runs.size()) + " runs");
  o << "<h1>NoisyDARTS comparison of " << runs.size() << " runs</h1>\n";
  o << "<h2>Runs</h2>\n<table class=\"summary\">\n<tr><th>run</th><th>directory</th><th>preset</th><th>noise</th>"
       "<th>epochs</th><th>skips normal/reduce</th><th>train acc</th><th>valid acc</th><th>Hessian eig.</th>"
       "<th>time</th></tr>\n";
  json data = {{"runs", json::array()}};
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    o << "<tr><td style=\"color:" << series_color(i) << ";font-weight:bold\">" << esc(r.label) << "</td><td>"
      << esc(r.dir) << "</td><td>" << esc(config_value(r.config, "preset")) << "</td><td>" << esc(noise_text(r.config))
      << "</td><td>" << r.epochs.size() << "</td><td>" << esc(skips_text(r)) << "</td><td>"
      << esc(pct(last_value(r, "train_acc"))) << "</td><td>" << esc(pct(last_value(r, "valid_acc"))) << "</td><td>"
      << esc(short_num(last_value(r, "hessian_eigenvalue"))) << "</td><td>" << esc(format_seconds(total_seconds(r)))
      << "</td></tr>\n";
  }
  o << "</table>\n<h2>Curves</h2>\n<div class=\"plots\">\n";
  // One plot per key that any run recorded, one line per run.
  std::vector<std::string> keys;
  std::set<std::string> seen;
  for (const auto& r : runs)
    for (const auto& k : numeric_keys(r))
      if (seen.insert(k).second) keys.push_back(k);
  std::vector<std::string> order = {"skip_normal", "skip_reduce", "valid_acc", "train_acc", "valid_loss",
                                    "train_loss", "hessian_eigenvalue", "noise_scale", "seconds"};
  json jplots = json::object();
  const auto plot_key = [&](const std::string& key, const std::string& title, bool integer) {
    std::vector<Series> series;
    for (size_t i = 0; i < runs.size(); ++i) {
      Series s = scalar_series(runs[i], key);
      s.label = runs[i].label;
      s.color = series_color(i);
      s.attrs.push_back({"data-run", std::to_string(i)});
      jplots[key].push_back({{"x", s.x}, {"y", s.y}});
      series.push_back(std::move(s));
    }
    Plot p;
    p.title = title;
    p.integer_y = integer;
    p.y_from_zero = integer;
    o << render_plot(p, series);
  };
  for (const auto& k : order)
    if (seen.count(k)) plot_key(k, k, k.rfind("skip_", 0) == 0);
  for (int c = 0; c < 2; ++c) {
    std::vector<Series> series;
    for (size_t i = 0; i < runs.size(); ++i) {
      Series s = op_weight_series(runs[i], kAlphaKeys[c], "skip_connect", false);
      s.label = runs[i].label;
      s.color = series_color(i);
      s.attrs = {{"data-key", std::string("skip_connect_mean_") + (c ? "reduce" : "normal")},
                 {"data-run", std::to_string(i)}};
      if (!s.x.empty()) series.push_back(std::move(s));
    }
    if (series.empty()) continue;
    Plot p;
    p.title = std::string("skip_connect weight, mean over edges (") + (c ? "reduce" : "normal") + ")";
    p.y_from_zero = true;
    o << render_plot(p, series);
  }
  o << "</div>\n<h2>Cells</h2>\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto g = final_genotype(runs[i], nullptr);
    o << "<h3 style=\"color:" << series_color(i) << "\">" << esc(runs[i].label) << "</h3>\n";
    if (g)
      o << "<p class=\"note\">normal: " << esc(genotype_profile(g->normal)) << "; reduce: "
        << esc(genotype_profile(g->reduce)) << "</p>\n";
    o << "<div class=\"cells\">\n";
    for (int c = 0; c < 2; ++c)
      o << "<div class=\"cellbox\">"
        << cell_diagram(runs[i], g, c == 1, "run" + std::to_string(i) + (c ? "-reduce" : "-normal")) << "</div>\n";
    o << "</div>\n";
    data["runs"].push_back({{"run", xml_clean(runs[i].dir)}, {"label", xml_clean(runs[i].label)}});
  }
  data["plots"] = jplots;
  o << "<h2>Text table</h2>\n<pre>" << esc(compare_table(runs)) << "</pre>\n";
  o << "<script type=\"application/json\" id=\"report-data\">" << script_json(data) << "</script>\n";
  o << "</body>\n</html>\n";
  return o.str();
}


namespace {

/// Per epoch over the runs of one setting: the mean and the sample standard deviation of a
/// per-epoch series (epochs that only some runs reached use those runs).
struct Band {
  std::vector<double> x, mean, lo, hi;
};

Band band_of(const std::vector<Series>& per_run) {
  std::map<double, std::vector<double>> at;
  for (const auto& s : per_run)
    for (size_t i = 0; i < s.x.size(); ++i) at[s.x[i]].push_back(s.y[i]);
  Band b;
  for (const auto& [x, v] : at) {
    const MeanSd ms = mean_and_sd(v);
    b.x.push_back(x);
    b.mean.push_back(ms.mean);
    b.lo.push_back(ms.mean - ms.sd);
    b.hi.push_back(ms.mean + ms.sd);
  }
  return b;
}

std::string stat_text(const json& agg, const char* key, bool percent) {
  if (!agg.contains(key) || agg[key].is_null()) return "n/a";
  const auto& a = agg[key];
  const double m = a["mean"].get<double>(), sd = a["std"].get<double>();
  return percent ? strf("%.2f%% &#177; %.2f", m, sd) : strf("%.4g &#177; %.2g", m, sd);
}

}  // namespace

MeanSd mean_and_sd(const std::vector<double>& v) {
  MeanSd r;
  for (double x : v) r.mean += x;
  r.mean /= static_cast<double>(v.size());
  double ss = 0;
  for (double x : v) ss += (x - r.mean) * (x - r.mean);
  r.sd = v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : 0.0;
  return r;
}

std::string render_study(const json& study, const std::vector<std::pair<std::string, std::vector<RunData>>>& settings) {
  std::ostringstream o;
  const size_t n_rows = study.contains("rows") ? study["rows"].size() : 0;
  o << page_head("noisydarts study: " + std::to_string(settings.size()) + " settings, " + std::to_string(n_rows) + " runs");
  o << "<h1>Study: " << settings.size() << " settings x " << study["spec"]["seeds"].size() << " seeds</h1>\n";
  o << "<p class=\"note\">search flags: <code>" << esc([&] {
    std::string a;
    for (const auto& x : study["spec"]["search_args"]) a += (a.empty() ? "" : " ") + x.get<std::string>();
    return a.empty() ? std::string("(defaults)") : a;
  }()) << "</code>; each line is the mean over the seeds of a setting, the dashed lines mean &#177; one standard deviation.</p>\n";
  o << "<h2>Settings</h2>\n<table class=\"summary\">\n<tr><th>setting</th><th>runs</th><th>skips normal</th>"
       "<th>skips reduce</th><th>skip weight (normal)</th><th>supernet valid acc</th><th>Hessian eig.</th>"
       "<th>retrain test acc</th><th>search time</th></tr>\n";
  for (size_t i = 0; i < study["settings"].size(); ++i) {
    const auto& a = study["settings"][i];
    o << "<tr><td style=\"color:" << series_color(i) << ";font-weight:bold\">" << esc(a["setting"].get<std::string>())
      << "</td><td>" << a["runs"] << "</td><td>" << stat_text(a, "skip_normal", false) << "</td><td>"
      << stat_text(a, "skip_reduce", false) << "</td><td>" << stat_text(a, "skip_weight_normal", false) << "</td><td>"
      << stat_text(a, "valid_acc", true) << "</td><td>" << stat_text(a, "hessian_eigenvalue", false) << "</td><td>"
      << stat_text(a, "retrain_test_top1", true) << "</td><td>"
      << (a["search_seconds"].is_null() ? std::string("n/a") : esc(format_seconds(a["search_seconds"]["mean"].get<double>())))
      << "</td></tr>\n";
  }
  o << "</table>\n<h2>Per epoch, mean over seeds</h2>\n<div class=\"plots\">\n";
  json plots = json::object();
  const auto plot = [&](const std::string& key, const std::string& title, bool integer,
                        const std::function<Series(const RunData&)>& series_of) {
    std::vector<Series> lines;
    for (size_t i = 0; i < settings.size(); ++i) {
      std::vector<Series> per_run;
      for (const auto& r : settings[i].second) per_run.push_back(series_of(r));
      const Band b = band_of(per_run);
      if (b.x.empty()) continue;
      Series m;
      m.label = settings[i].first;
      m.color = series_color(i);
      m.x = b.x;
      m.y = b.mean;
      m.width = 2.2;
      m.attrs = {{"data-setting", settings[i].first}, {"data-stat", "mean"}};
      for (int side = 0; side < 2; ++side) {
        Series e = m;
        e.label = settings[i].first + (side ? " +sd" : " -sd");
        e.y = side ? b.hi : b.lo;
        e.width = 1;
        e.dash = "4 3";
        e.attrs = {{"data-setting", settings[i].first}, {"data-stat", side ? "mean+sd" : "mean-sd"}};
        lines.push_back(std::move(e));
      }
      plots[key].push_back({{"setting", settings[i].first}, {"x", b.x}, {"mean", b.mean}, {"lo", b.lo}, {"hi", b.hi}});
      lines.push_back(std::move(m));
    }
    if (lines.empty()) return;
    Plot p;
    p.title = title;
    p.integer_y = integer;
    p.y_from_zero = integer;
    p.legend = false;
    o << render_plot(p, lines);
  };
  const auto scalar = [](const std::string& key) { return [key](const RunData& r) { return scalar_series(r, key); }; };
  plot("skip_normal", "skip connections, normal cell", true, [](const RunData& r) {
    Series s = scalar_series(r, "skip_normal");
    return s.x.empty() ? scalar_series(r, "skips") : s;
  });
  plot("skip_reduce", "skip connections, reduction cell", true, scalar("skip_reduce"));
  plot("skip_weight_normal", "softmax(alpha) of skip_connect, mean over edges (normal)", false,
       [](const RunData& r) {
         Series s = op_weight_series(r, "alphas_normal", "skip_connect", false);
         return s.x.empty() ? op_weight_series(r, "alphas", "skip_connect", false) : s;
       });
  plot("skip_weight_reduce", "softmax(alpha) of skip_connect, mean over edges (reduce)", false,
       [](const RunData& r) { return op_weight_series(r, "alphas_reduce", "skip_connect", false); });
  plot("valid_acc", "supernet valid acc (%)", false, scalar("valid_acc"));
  plot("hessian_eigenvalue", "dominant Hessian eigenvalue", false, scalar("hessian_eigenvalue"));
  o << "</div>\n<p class=\"note\">legend: ";
  for (size_t i = 0; i < settings.size(); ++i)
    o << "<span class=\"key\" style=\"color:" << series_color(i) << ";font-weight:bold\">" << esc(settings[i].first) << "</span>";
  o << "</p>\n<h2>Runs</h2>\n<table class=\"summary\">\n<tr><th>setting</th><th>seed</th><th>status</th><th>skips n/r</th>"
       "<th>valid acc</th><th>Hessian eig.</th><th>retrain test acc</th><th>search time</th><th>genotype</th></tr>\n";
  auto num_or = [](const json& v, const char* fmt) { return v.is_number() ? strf(fmt, v.get<double>()) : std::string("n/a"); };
  for (const auto& r : study["rows"]) {
    const std::string run_name = r["run"].get<std::string>();
    o << "<tr><td>" << esc(r["setting"].get<std::string>()) << "</td><td>" << r["seed"] << "</td><td>";
    if (r["status"] != "not started")
      o << "<a href=\"runs/" << esc(run_name) << "/report.html\">" << esc(r["status"].get<std::string>()) << "</a>";
    else
      o << esc(r["status"].get<std::string>());
    o << "</td><td>" << num_or(r["skip_normal"], "%.0f") << "/"
      << num_or(r["skip_reduce"], "%.0f") << "</td><td>" << num_or(r["valid_acc"], "%.2f%%") << "</td><td>"
      << num_or(r["hessian_eigenvalue"], "%.4g") << "</td><td>" << num_or(r["retrain_test_top1"], "%.2f%%") << "</td><td>"
      << (r["search_seconds"].is_number() ? esc(format_seconds(r["search_seconds"].get<double>())) : std::string("n/a"))
      << "</td><td><code>" << esc(r["genotype"].is_string() ? r["genotype"].get<std::string>() : std::string("")) << "</code></td></tr>\n";
  }
  o << "</table>\n";
  o << "<script type=\"application/json\" id=\"report-data\">" << script_json({{"plots", plots}, {"rows", study["rows"]}}) << "</script>\n";
  o << "</body>\n</html>\n";
  return o.str();
}

}  // namespace noisydarts
