#include "noisydarts/genotype.h"

#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>

#include "noisydarts/error.h"
#include "noisydarts/ops.h"
#include "noisydarts/spaces.h"

extern char** environ;

namespace noisydarts {

namespace {

// ------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------

/// Printable, single-line rendering of arbitrary bytes (for error messages), truncated.
std::string printable(const std::string& s, size_t max_len = 40) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (out.size() >= max_len) {
      out += "...";
      break;
    }
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '\\') {
      out += "\\\\";
    } else if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

std::string squote(const std::string& s) { return "'" + printable(s) + "'"; }
std::string squote_path(const std::string& s) { return "'" + printable(s, 4096) + "'"; }

std::string join(const std::vector<std::string>& v, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += sep;
    out += v[i];
  }
  return out;
}

std::string trim(const std::string& s) {
  const char* ws = " \t\r\n\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  const size_t e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

void validate_cell(const std::vector<GeneEdge>& cell, const std::vector<int>& concat,
                   const char* cell_name) {
  const std::string name(cell_name);
  if (cell.size() < 2 || cell.size() % 2 != 0) {
    throw ConfigError("genotype: " + name + " has " + std::to_string(cell.size()) +
                      " edges; expected an even number >= 2 (2 per intermediate node)");
  }
  const int steps = static_cast<int>(cell.size() / 2);
  for (size_t k = 0; k < cell.size(); ++k) {
    const auto& [op, input] = cell[k];
    const int node = static_cast<int>(k / 2);
    const std::string where = "genotype: " + name + " edge " + std::to_string(k) + " (" +
                              squote(op) + ", " + std::to_string(input) + ")";
    if (!is_known_op(op)) {
      throw ConfigError(where + ": unknown op " + squote(op) + " (known: " +
                        join(all_op_names(), ", ") + ")");
    }
    if (input < 0 || input >= node + 2) {
      throw ConfigError(where + ": input " + std::to_string(input) + " out of range for node " +
                        std::to_string(node) + " (must be in [0, " + std::to_string(node + 2) +
                        "))");
    }
  }
  const std::string cname = name + "_concat";
  if (concat.empty()) throw ConfigError("genotype: " + cname + " is empty");
  std::vector<int> seen;
  for (size_t i = 0; i < concat.size(); ++i) {
    const int c = concat[i];
    if (c < 0 || c >= steps + 2) {
      throw ConfigError("genotype: " + cname + "[" + std::to_string(i) + "] = " +
                        std::to_string(c) + " out of range (must be in [0, " +
                        std::to_string(steps + 2) + ") for " + std::to_string(steps) +
                        " intermediate nodes)");
    }
    if (std::find(seen.begin(), seen.end(), c) != seen.end()) {
      throw ConfigError("genotype: " + cname + " lists node " + std::to_string(c) + " twice");
    }
    seen.push_back(c);
  }
}

// ------------------------------------------------------------------------------------------
// DARTS text form: tokenizer + recursive descent (fixed nesting depth, no recursion on input)
// ------------------------------------------------------------------------------------------

enum class Tok { Ident, Int, Str, LParen, RParen, LBrack, RBrack, Comma, Equal, Dot, End };

struct Token {
  Tok kind = Tok::End;
  size_t offset = 0;
  std::string text;  // identifier name, string contents, or raw text
  long long value = 0;  // for Int
};

constexpr long long kMaxInt = 1000000000LL;  // parsed integers are bounded well within int

class TextParser {
 public:
  explicit TextParser(const std::string& s) : s_(s) { advance(); }

  Genotype parse() {
    // Optional `NAME =` prefix.
    if (cur_.kind == Tok::Ident && peek_is_equal()) {
      advance();
      advance();
    }
    // Optional `Genotype` (possibly qualified, e.g. `genotypes.Genotype`).
    if (cur_.kind == Tok::Ident) {
      std::string last = cur_.text;
      size_t last_off = cur_.offset;
      advance();
      while (cur_.kind == Tok::Dot) {
        advance();
        if (cur_.kind != Tok::Ident) fail("an identifier after '.'");
        last = cur_.text;
        last_off = cur_.offset;
        advance();
      }
      if (last != "Genotype") fail_at(last_off, "'Genotype'", squote(last));
    }
    expect(Tok::LParen, "'(' starting the Genotype arguments");

    static const char* kKeys[4] = {"normal", "normal_concat", "reduce", "reduce_concat"};
    bool have[4] = {false, false, false, false};
    Genotype g;
    int positional = 0;
    bool keyword_seen = false;
    while (cur_.kind != Tok::RParen) {
      int which = -1;
      if (cur_.kind == Tok::Ident && peek_is_equal()) {
        const Token key = cur_;
        for (int k = 0; k < 4; ++k)
          if (key.text == kKeys[k]) which = k;
        if (which < 0) {
          fail_at(key.offset,
                  "one of normal, normal_concat, reduce, reduce_concat", squote(key.text));
        }
        if (have[which]) {
          throw ConfigError(where(key.offset) + ": argument '" + kKeys[which] +
                            "' given twice");
        }
        advance();  // key
        advance();  // '='
        keyword_seen = true;
      } else {
        if (keyword_seen) fail("a keyword argument (positional argument after keyword)");
        if (positional >= 4) fail("')' (Genotype takes 4 arguments)");
        which = positional++;
        if (have[which]) {
          throw ConfigError(where(cur_.offset) + ": argument '" + kKeys[which] +
                            "' given twice");
        }
      }
      have[which] = true;
      switch (which) {
        case 0: g.normal = parse_edges(); break;
        case 1: g.normal_concat = parse_concat(); break;
        case 2: g.reduce = parse_edges(); break;
        default: g.reduce_concat = parse_concat(); break;
      }
      if (cur_.kind == Tok::Comma) {
        advance();
      } else if (cur_.kind != Tok::RParen) {
        fail("',' or ')' after a Genotype argument");
      }
    }
    const size_t close_off = cur_.offset;
    advance();
    if (cur_.kind != Tok::End) fail("end of input after the closing ')'");
    for (int k = 0; k < 4; ++k) {
      if (!have[k]) {
        throw ConfigError(where(close_off) + ": missing argument '" + kKeys[k] + "'");
      }
    }
    return g;
  }

 private:
  std::string where(size_t off) const {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < off && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    return "genotype text: at offset " + std::to_string(off) + " (line " +
           std::to_string(line) + ", column " + std::to_string(col) + ")";
  }

  static std::string describe(const Token& t) {
    switch (t.kind) {
      case Tok::End: return "end of input";
      case Tok::Str: return "string " + squote(t.text);
      default: return squote(t.text);
    }
  }

  [[noreturn]] void fail_at(size_t off, const std::string& expected, const std::string& got) {
    throw ConfigError(where(off) + ": expected " + expected + ", got " + got);
  }
  [[noreturn]] void fail(const std::string& expected) {
    fail_at(cur_.offset, expected, describe(cur_));
  }

  void expect(Tok k, const char* what) {
    if (cur_.kind != k) fail(what);
    advance();
  }

  /// True when the token after the current one is '=' (without consuming anything).
  bool peek_is_equal() {
    const Token save = cur_;
    const size_t save_pos = pos_;
    advance();
    const bool eq = cur_.kind == Tok::Equal;
    cur_ = save;
    pos_ = save_pos;
    return eq;
  }

  static bool ident_start(unsigned char c) { return std::isalpha(c) || c == '_'; }
  static bool ident_char(unsigned char c) { return std::isalnum(c) || c == '_'; }

  void skip_space_and_comments() {
    while (pos_ < s_.size()) {
      const unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
        ++pos_;
      } else if (c == '\\' && pos_ + 1 < s_.size() && s_[pos_ + 1] == '\n') {
        pos_ += 2;  // Python line continuation
      } else if (c == '#') {
        while (pos_ < s_.size() && s_[pos_] != '\n') ++pos_;
      } else {
        break;
      }
    }
  }

  void advance() {
    skip_space_and_comments();
    Token t;
    t.offset = pos_;
    if (pos_ >= s_.size()) {
      t.kind = Tok::End;
      cur_ = t;
      return;
    }
    const unsigned char c = static_cast<unsigned char>(s_[pos_]);
    auto single = [&](Tok k) {
      t.kind = k;
      t.text = std::string(1, static_cast<char>(c));
      ++pos_;
    };
    switch (c) {
      case '(': single(Tok::LParen); break;
      case ')': single(Tok::RParen); break;
      case '[': single(Tok::LBrack); break;
      case ']': single(Tok::RBrack); break;
      case ',': single(Tok::Comma); break;
      case '=': single(Tok::Equal); break;
      case '.': single(Tok::Dot); break;
      case '\'':
      case '"': lex_string(t, static_cast<char>(c)); break;
      default:
        if (std::isdigit(c) ||
            (c == '-' && pos_ + 1 < s_.size() &&
             std::isdigit(static_cast<unsigned char>(s_[pos_ + 1])))) {
          lex_int(t);
        } else if (ident_start(c)) {
          const size_t b = pos_;
          while (pos_ < s_.size() && ident_char(static_cast<unsigned char>(s_[pos_]))) ++pos_;
          t.kind = Tok::Ident;
          t.text = s_.substr(b, pos_ - b);
        } else {
          throw ConfigError(where(pos_) + ": unexpected character " +
                            squote(std::string(1, static_cast<char>(c))));
        }
    }
    cur_ = t;
  }

  void lex_string(Token& t, char q) {
    const size_t start = pos_;
    ++pos_;
    std::string out;
    while (true) {
      if (pos_ >= s_.size() || s_[pos_] == '\n') {
        throw ConfigError(where(start) + ": unterminated string literal");
      }
      const char c = s_[pos_];
      if (c == q) {
        ++pos_;
        break;
      }
      if (c == '\\') {
        if (pos_ + 1 >= s_.size()) {
          throw ConfigError(where(start) + ": unterminated string literal");
        }
        out += s_[pos_ + 1];
        pos_ += 2;
        continue;
      }
      out += c;
      ++pos_;
    }
    t.kind = Tok::Str;
    t.text = out;
  }

  void lex_int(Token& t) {
    const size_t b = pos_;
    bool neg = false;
    if (s_[pos_] == '-') {
      neg = true;
      ++pos_;
    }
    long long v = 0;
    while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
      v = v * 10 + (s_[pos_] - '0');
      if (v > kMaxInt) throw ConfigError(where(b) + ": integer too large");
      ++pos_;
    }
    if (pos_ < s_.size() && ident_char(static_cast<unsigned char>(s_[pos_]))) {
      throw ConfigError(where(b) + ": malformed integer literal");
    }
    t.kind = Tok::Int;
    t.text = s_.substr(b, pos_ - b);
    t.value = neg ? -v : v;
  }

  int parse_int(const char* what) {
    if (cur_.kind != Tok::Int) fail(what);
    const int v = static_cast<int>(cur_.value);
    advance();
    return v;
  }

  // list := ('[' | '(') [item (',' item)* [',']] (']' | ')')
  template <typename F>
  void parse_list(const char* what, F&& item) {
    Tok close = Tok::RBrack;
    if (cur_.kind == Tok::LBrack) {
      close = Tok::RBrack;
    } else if (cur_.kind == Tok::LParen) {
      close = Tok::RParen;
    } else {
      fail(what);
    }
    advance();
    const char* close_s = close == Tok::RBrack ? "',' or ']'" : "',' or ')'";
    while (cur_.kind != close) {
      item();
      if (cur_.kind == Tok::Comma) {
        advance();
      } else if (cur_.kind != close) {
        fail(close_s);
      }
    }
    advance();
  }

  std::vector<GeneEdge> parse_edges() {
    std::vector<GeneEdge> edges;
    parse_list("'[' starting a list of (op, input) edges", [&] {
      Tok close = Tok::RParen;
      if (cur_.kind == Tok::LParen) {
        close = Tok::RParen;
      } else if (cur_.kind == Tok::LBrack) {
        close = Tok::RBrack;
      } else {
        fail("'(' starting an (op, input) edge");
      }
      advance();
      if (cur_.kind != Tok::Str) fail("a quoted op name");
      std::string op = cur_.text;
      advance();
      expect(Tok::Comma, "',' after the op name");
      const int input = parse_int("an integer input index");
      if (cur_.kind == Tok::Comma) advance();
      expect(close, close == Tok::RParen ? "')' closing the edge" : "']' closing the edge");
      edges.emplace_back(std::move(op), input);
    });
    return edges;
  }

  std::vector<int> parse_concat() {
    std::vector<int> out;
    if (cur_.kind == Tok::Ident) {
      bool wrapped = false;
      if (cur_.text == "list") {  // list(range(a, b))
        advance();
        expect(Tok::LParen, "'(' after 'list'");
        wrapped = true;
      }
      if (cur_.kind != Tok::Ident || cur_.text != "range") fail("a list of node indices or range(a, b)");
      advance();
      expect(Tok::LParen, "'(' after 'range'");
      long long a = 0;
      long long b = parse_int("an integer in range(...)");
      if (cur_.kind == Tok::Comma) {
        advance();
        if (cur_.kind != Tok::RParen) {
          a = b;
          b = parse_int("an integer in range(...)");
          if (cur_.kind == Tok::Comma) advance();
        }
      }
      expect(Tok::RParen, "')' closing range(...)");
      if (wrapped) expect(Tok::RParen, "')' closing list(...)");
      if (b - a > 4096) throw ConfigError(where(cur_.offset) + ": range(...) too long");
      for (long long v = a; v < b; ++v) out.push_back(static_cast<int>(v));
      return out;
    }
    parse_list("a list of node indices or range(a, b)",
               [&] { out.push_back(parse_int("an integer node index")); });
    return out;
  }

  const std::string& s_;
  size_t pos_ = 0;
  Token cur_;
};

std::string edges_to_text(const std::vector<GeneEdge>& cell) {
  std::string out = "[";
  for (size_t i = 0; i < cell.size(); ++i) {
    if (i) out += ", ";
    out += "('" + cell[i].first + "', " + std::to_string(cell[i].second) + ")";
  }
  return out + "]";
}

std::string ints_to_text(const std::vector<int>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(v[i]);
  }
  return out + "]";
}

// ------------------------------------------------------------------------------------------
// JSON form
// ------------------------------------------------------------------------------------------

int json_int(const nlohmann::json& v, const std::string& where) {
  if (!v.is_number_integer()) {
    throw ConfigError("genotype JSON: " + where + " must be an integer, got " +
                      printable(v.dump()));
  }
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(kMaxInt))
      throw ConfigError("genotype JSON: " + where + " is too large");
    return static_cast<int>(u);
  }
  const auto s = v.get<std::int64_t>();
  if (s > kMaxInt || s < -kMaxInt) throw ConfigError("genotype JSON: " + where + " is too large");
  return static_cast<int>(s);
}

std::vector<GeneEdge> json_edges(const nlohmann::json& v, const std::string& key) {
  if (!v.is_array()) {
    throw ConfigError("genotype JSON: '" + key + "' must be an array of [op, input] pairs");
  }
  std::vector<GeneEdge> out;
  for (size_t k = 0; k < v.size(); ++k) {
    const auto& e = v[k];
    const std::string w = "'" + key + "'[" + std::to_string(k) + "]";
    if (!e.is_array() || e.size() != 2 || !e[0].is_string()) {
      throw ConfigError("genotype JSON: " + w + " must be a [\"op\", input] pair, got " +
                        printable(e.dump()));
    }
    out.emplace_back(e[0].get<std::string>(), json_int(e[1], w + "[1]"));
  }
  return out;
}

std::vector<int> json_concat(const nlohmann::json& v, const std::string& key) {
  if (!v.is_array()) throw ConfigError("genotype JSON: '" + key + "' must be an array of integers");
  std::vector<int> out;
  for (size_t k = 0; k < v.size(); ++k) {
    out.push_back(json_int(v[k], "'" + key + "'[" + std::to_string(k) + "]"));
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// Built-ins
// ------------------------------------------------------------------------------------------

const std::vector<std::pair<std::string, const char*>>& builtin_texts() {
  static const std::vector<std::pair<std::string, const char*>> k{
      {"DARTS_V1",
       "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), "
       "('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
       "('skip_connect', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
       "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), "
       "('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], "
       "reduce_concat=[2, 3, 4, 5])"},
      {"DARTS_V2",
       "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
       "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
       "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
       "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
       "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], "
       "reduce_concat=[2, 3, 4, 5])"},
      {"NASNet",
       "Genotype(normal=[('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 0), "
       "('sep_conv_3x3', 0), ('avg_pool_3x3', 1), ('skip_connect', 0), ('avg_pool_3x3', 0), "
       "('avg_pool_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 1)], "
       "normal_concat=[2, 3, 4, 5, 6], reduce=[('sep_conv_5x5', 1), ('sep_conv_7x7', 0), "
       "('max_pool_3x3', 1), ('sep_conv_7x7', 0), ('avg_pool_3x3', 1), ('sep_conv_5x5', 0), "
       "('skip_connect', 3), ('avg_pool_3x3', 2), ('sep_conv_3x3', 2), ('max_pool_3x3', 1)], "
       "reduce_concat=[4, 5, 6])"},
      {"AmoebaNet",
       "Genotype(normal=[('avg_pool_3x3', 0), ('max_pool_3x3', 1), ('sep_conv_3x3', 0), "
       "('sep_conv_5x5', 2), ('sep_conv_3x3', 0), ('avg_pool_3x3', 3), ('sep_conv_3x3', 1), "
       "('skip_connect', 1), ('skip_connect', 0), ('avg_pool_3x3', 1)], "
       "normal_concat=[4, 5, 6], reduce=[('avg_pool_3x3', 0), ('sep_conv_3x3', 1), "
       "('max_pool_3x3', 0), ('sep_conv_7x7', 2), ('sep_conv_7x7', 0), ('avg_pool_3x3', 1), "
       "('max_pool_3x3', 0), ('max_pool_3x3', 1), ('conv_7x1_1x7', 0), ('sep_conv_3x3', 5)], "
       "reduce_concat=[3, 4, 6])"},
      {"NoisyDARTS_a",
       "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), "
       "('dil_conv_3x3', 2), ('dil_conv_3x3', 3), ('sep_conv_3x3', 1), ('dil_conv_5x5', 4), "
       "('dil_conv_3x3', 3)], normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), "
       "('dil_conv_5x5', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('skip_connect', 2), "
       "('skip_connect', 3), ('skip_connect', 2), ('dil_conv_5x5', 4)], "
       "reduce_concat=range(2, 6))"},
      {"NoisyDARTS_b",
       "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), "
       "('dil_conv_5x5', 2), ('skip_connect', 0), ('sep_conv_3x3', 1), ('dil_conv_3x3', 4), "
       "('dil_conv_5x5', 3)], normal_concat=range(2, 6), reduce=[('avg_pool_3x3', 0), "
       "('dil_conv_3x3', 1), ('skip_connect', 2), ('avg_pool_3x3', 0), ('avg_pool_3x3', 0), "
       "('skip_connect', 2), ('skip_connect', 2), ('dil_conv_5x5', 3)], "
       "reduce_concat=range(2, 6))"},
      // The paper's ImageNet model (public NoisyDARTS code, verify_se.py): 19 inverted-bottleneck
      // layers, squeeze-excite 0.25 and swish in every searched layer.
      {"NoisyDARTS_A",
       "mbv2:ir_k3_e6,ir_k3_e3,ir_k5_e6,ir_k3_e6,ir_k3_e6,ir_k3_e6,ir_k5_e6,ir_k7_e6,ir_k3_e6,"
       "ir_k3_e6,ir_k3_e6,ir_k3_e6,ir_k3_e6,ir_k3_e6,ir_k3_e6,ir_k7_e6,ir_k7_e6,ir_k7_e6,ir_k7_e6;"
       "se=0.25;swish"},
  };
  return k;
}

const std::map<std::string, Genotype>& builtin_map() {
  static const std::map<std::string, Genotype> m = [] {
    std::map<std::string, Genotype> r;
    for (const auto& [name, text] : builtin_texts()) r.emplace(name, genotype_from_text(text));
    return r;
  }();
  return m;
}

/// Canonical built-in name for `name` (accepting the reference's lowercase aliases), or "".
std::string canonical_builtin(const std::string& name) {
  if (name == "noisy_darts_a") return "NoisyDARTS_a";
  if (name == "noisy_darts_b") return "NoisyDARTS_b";
  if (name == "noisy_darts_A" || name == "noisydarts_a_se") return "NoisyDARTS_A";
  for (const auto& [n, t] : builtin_texts()) {
    (void)t;
    if (n == name) return n;
  }
  return "";
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string builtin_hint(const std::string& name) {
  for (const auto& n : builtin_genotype_names()) {
    if (lower(n) == lower(name)) return " (did you mean '" + n + "'? names are case-sensitive)";
  }
  return "";
}

// ------------------------------------------------------------------------------------------
// Graphviz
// ------------------------------------------------------------------------------------------

std::string dot_escape(const std::string& s) {
  std::string out;
  for (const char c : s) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '"': out += "\\\""; break;
      case '\n': out += "\\n"; break;
      case '\r': break;
      default: out += c;
    }
  }
  return out;
}

std::string node_name(int idx) {
  if (idx == 0) return "c_{k-2}";
  if (idx == 1) return "c_{k-1}";
  return std::to_string(idx - 2);
}

bool find_on_path(const std::string& prog) {
  const char* path = std::getenv("PATH");
  if (!path) return false;
  std::string p(path);
  size_t b = 0;
  while (b <= p.size()) {
    size_t e = p.find(':', b);
    if (e == std::string::npos) e = p.size();
    std::string dir = p.substr(b, e - b);
    if (dir.empty()) dir = ".";
    const std::string full = dir + "/" + prog;
    struct stat st {};
    if (::stat(full.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(full.c_str(), X_OK) == 0)
      return true;
    b = e + 1;
  }
  return false;
}

/// Runs `dot -T<fmt> in -o tmp`, then renames tmp to out. Returns false (leaving nothing
/// behind) when dot fails.
bool render_dot(const std::string& in, const std::string& fmt, const std::string& out) {
  const std::string tmp = out + ".tmp." + std::to_string(::getpid());
  std::string a0 = "dot", a1 = "-T" + fmt, a2 = in, a3 = "-o", a4 = tmp;
  char* argv[] = {a0.data(), a1.data(), a2.data(), a3.data(), a4.data(), nullptr};
  pid_t pid = 0;
  if (::posix_spawnp(&pid, "dot", nullptr, nullptr, argv, environ) != 0) return false;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      std::remove(tmp.c_str());
      return false;
    }
  }
  struct stat st {};
  const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0 &&
                  ::stat(tmp.c_str(), &st) == 0 && st.st_size > 0;
  if (!ok || std::rename(tmp.c_str(), out.c_str()) != 0) {
    std::remove(tmp.c_str());
    return false;
  }
  return true;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Derivation
// ------------------------------------------------------------------------------------------

namespace {
// One kept edge of a derived cell: its row in the weight table, its op, and its margins.
struct CellPick {
  int input = 0;
  int op = -1;
  EdgeMargin margin;
};

// The derivation rule of derive_cell, with the margins it decided by.
std::vector<CellPick> pick_cell(const torch::Tensor& weights, const std::vector<std::string>& primitives, int steps) {
  TORCH_CHECK_VALUE(steps >= 1, "derive_cell: steps must be >= 1, got ", steps);
  TORCH_CHECK_VALUE(!primitives.empty(), "derive_cell: empty primitives list");
  TORCH_CHECK_VALUE(weights.defined(), "derive_cell: undefined weights tensor");
  int64_t num_edges = 0;
  for (int i = 0; i < steps; ++i) num_edges += i + 2;
  const auto num_ops = static_cast<int64_t>(primitives.size());
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == num_edges &&
                        weights.size(1) == num_ops,
                    "derive_cell: weights must have shape [", num_edges, ", ", num_ops,
                    "] for steps=", steps, " and ", num_ops, " primitives, got ",
                    weights.sizes());
  std::vector<bool> counts(primitives.size());
  bool any = false;
  for (size_t k = 0; k < primitives.size(); ++k) {
    counts[k] = primitives[k] != "none";
    any = any || counts[k];
  }
  TORCH_CHECK_VALUE(any, "derive_cell: primitives contain no op other than 'none'");

  const torch::Tensor w = weights.detach().to(torch::kCPU, torch::kDouble).contiguous();
  const double* data = w.data_ptr<double>();
  const double neg_inf = -std::numeric_limits<double>::infinity();
  auto at = [&](int64_t e, int64_t k) {
    const double v = data[e * num_ops + k];
    return std::isnan(v) ? neg_inf : v;  // NaN never wins (and keeps the ordering strict)
  };

  std::vector<CellPick> picks;
  int64_t start = 0;
  for (int i = 0; i < steps; ++i) {
    const int n = i + 2;
    std::vector<int> best_op(n, -1);
    std::vector<double> score(n, neg_inf), second(n, neg_inf);
    for (int j = 0; j < n; ++j) {
      for (int64_t k = 0; k < num_ops; ++k) {
        if (!counts[k]) continue;
        const double v = at(start + j, k);
        if (best_op[j] < 0 || v > score[j]) {
          if (best_op[j] >= 0) second[j] = score[j];
          best_op[j] = static_cast<int>(k);
          score[j] = v;
        } else if (v > second[j]) {
          second[j] = v;
        }
      }
    }
    std::vector<int> order(n);
    for (int j = 0; j < n; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return score[a] > score[b]; });
    const double dropped = n > 2 ? score[order[2]] : neg_inf;
    for (int r = 0; r < 2; ++r) {
      const int j = order[r];
      CellPick p;
      p.input = j;
      p.op = best_op[j];
      // One candidate op (or one dropped edge) leaves nothing to beat: the margin is the weight itself.
      p.margin.op_margin = score[j] - (std::isinf(second[j]) ? 0.0 : second[j]);
      p.margin.edge_margin = score[j] - (std::isinf(dropped) ? 0.0 : dropped);
      picks.push_back(p);
    }
    start += n;
  }
  return picks;
}
}  // namespace

std::vector<GeneEdge> derive_cell(const torch::Tensor& weights,
                                  const std::vector<std::string>& primitives, int steps) {
  std::vector<GeneEdge> gene;
  for (const auto& p : pick_cell(weights, primitives, steps)) gene.emplace_back(primitives[p.op], p.input);
  return gene;
}

std::vector<EdgeMargin> cell_margins(const torch::Tensor& weights, const std::vector<std::string>& primitives, int steps) {
  std::vector<EdgeMargin> m;
  for (const auto& p : pick_cell(weights, primitives, steps)) m.push_back(p.margin);
  return m;
}

std::vector<double> row_margins(const torch::Tensor& weights) {
  TORCH_CHECK_VALUE(weights.defined() && weights.dim() == 2 && weights.size(1) >= 1, "row_margins: expected a 2-D table");
  const torch::Tensor w = weights.detach().to(torch::kCPU, torch::kDouble).contiguous();
  std::vector<double> out;
  for (int64_t r = 0; r < w.size(0); ++r) {
    double best = -std::numeric_limits<double>::infinity(), second = best;
    for (int64_t k = 0; k < w.size(1); ++k) {
      const double v = w[r][k].item<double>();
      if (std::isnan(v)) continue;
      if (v > best) {
        second = best;
        best = v;
      } else if (v > second) {
        second = v;
      }
    }
    out.push_back(std::isinf(best) ? 0.0 : best - (std::isinf(second) ? 0.0 : second));
  }
  return out;
}

Genotype derive_genotype(const torch::Tensor& weights_normal, const torch::Tensor& weights_reduce,
                         const std::vector<std::string>& primitives, int steps,
                         int multiplier) {
  TORCH_CHECK_VALUE(multiplier >= 1 && multiplier <= steps,
                    "derive_genotype: multiplier must be in [1, steps=", steps, "], got ",
                    multiplier);
  Genotype g;
  g.normal = derive_cell(weights_normal, primitives, steps);
  g.reduce = derive_cell(weights_reduce, primitives, steps);
  for (int c = 2 + steps - multiplier; c < steps + 2; ++c) {
    g.normal_concat.push_back(c);
    g.reduce_concat.push_back(c);
  }
  return g;
}

void validate_genotype(const Genotype& g) {
  if (g.space == "darts") {
    validate_cell(g.normal, g.normal_concat, "normal");
    validate_cell(g.reduce, g.reduce_concat, "reduce");
  } else if (g.space == "nb201") {
    const auto& edges = nb201_edges();
    if (g.normal.size() != edges.size())
      throw ConfigError("genotype: a NAS-Bench-201 cell has 6 edges, got " + std::to_string(g.normal.size()));
    for (size_t k = 0; k < edges.size(); ++k) {
      const auto& [op, input] = g.normal[k];
      const std::string where = "genotype: NAS-Bench-201 edge " + std::to_string(edges[k].first) + "<-" +
                                std::to_string(edges[k].second) + " (" + squote(op) + "~" + std::to_string(input) + ")";
      if (std::find(nb201_primitives().begin(), nb201_primitives().end(), op) == nb201_primitives().end())
        throw ConfigError(where + ": unknown op " + squote(op) + " (known: " + join(nb201_primitives(), ", ") + ")");
      if (input != edges[k].second)
        throw ConfigError(where + ": expected source node " + std::to_string(edges[k].second) +
                          " (node j lists its inputs 0..j-1 in order)");
    }
    if (!g.reduce.empty() || !g.normal_concat.empty() || !g.reduce_concat.empty() || !g.layers.empty())
      throw ConfigError("genotype: a NAS-Bench-201 genotype has only its cell");
  } else if (g.space == "mbv2") {
    const auto& layout = mbv2_layout();
    if (g.layers.size() != layout.size())
      throw ConfigError("genotype: the mbv2 chain has " + std::to_string(layout.size()) + " layers, got " +
                        std::to_string(g.layers.size()));
    for (size_t i = 0; i < layout.size(); ++i) {
      int64_t k = 0, e = 0;
      const std::string& c = g.layers[i];
      if (c == "skip_connect") {
        if (!layout[i].skip_allowed)
          throw ConfigError("genotype: mbv2 layer " + std::to_string(i) + " cannot be skip_connect (its stride or width changes)");
      } else if (!parse_mbv2_choice(c, k, e)) {
        throw ConfigError("genotype: mbv2 layer " + std::to_string(i) + ": unknown choice " + squote(c) + " (known: " +
                          join(mbv2_choices(), ", ") + ")");
      }
    }
    if (!(g.se_ratio >= 0 && g.se_ratio < 1))
      throw ConfigError("genotype: mbv2 se_ratio must be in [0, 1), got " + std::to_string(g.se_ratio));
    if (!g.normal.empty() || !g.reduce.empty() || !g.normal_concat.empty() || !g.reduce_concat.empty())
      throw ConfigError("genotype: a mbv2 genotype has only its layers");
  } else {
    throw ConfigError("genotype: unknown space " + squote(g.space) + " (known: darts, nb201, mbv2)");
  }
}

Genotype derive_nb201(const torch::Tensor& weights, const std::vector<std::string>& primitives) {
  const auto& edges = nb201_edges();
  const auto n_ops = static_cast<int64_t>(primitives.size());
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == static_cast<int64_t>(edges.size()) &&
                        weights.size(1) == n_ops && n_ops > 0,
                    "derive_nb201: weights must have shape [6, ", n_ops, "], got ", weights.sizes());
  const torch::Tensor w = weights.detach().to(torch::kCPU, torch::kDouble).contiguous();
  Genotype g;
  g.space = "nb201";
  for (size_t e = 0; e < edges.size(); ++e) {
    int64_t best = 0;
    for (int64_t k = 1; k < n_ops; ++k)
      if (w[e][k].item<double>() > w[e][best].item<double>()) best = k;  // NaN never wins
    g.normal.emplace_back(primitives[best], edges[e].second);
  }
  return g;
}

Genotype derive_mbv2(const torch::Tensor& weights, double se_ratio, bool swish) {
  const auto& layout = mbv2_layout();
  const auto& choices = mbv2_choices();
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == static_cast<int64_t>(layout.size()) &&
                        weights.size(1) == static_cast<int64_t>(choices.size()),
                    "derive_mbv2: weights must have shape [", layout.size(), ", ", choices.size(), "], got ",
                    weights.sizes());
  const torch::Tensor w = weights.detach().to(torch::kCPU, torch::kDouble).contiguous();
  Genotype g;
  g.space = "mbv2";
  g.se_ratio = se_ratio;
  g.swish = swish;
  for (size_t i = 0; i < layout.size(); ++i) {
    int64_t best = -1;
    for (int64_t k = 0; k < static_cast<int64_t>(choices.size()); ++k) {
      if (choices[k] == "skip_connect" && !layout[i].skip_allowed) continue;
      const double v = w[i][k].item<double>();
      if (std::isnan(v)) continue;
      if (best < 0 || v > w[i][best].item<double>()) best = k;
    }
    g.layers.push_back(choices[best < 0 ? 0 : best]);
  }
  return g;
}

std::string nb201_arch_string(const Genotype& g) {
  std::string out;
  int node = 0;
  for (size_t k = 0; k < g.normal.size(); ++k) {
    const int target = nb201_edges().at(k).first;
    if (target != node) {
      out += node == 0 ? "|" : "+|";
      node = target;
    }
    out += g.normal[k].first + "~" + std::to_string(g.normal[k].second) + "|";
  }
  return out;
}

Genotype nb201_from_string(const std::string& text) {
  const std::string t = trim(text);
  const std::string where = "NAS-Bench-201 string " + squote(t);
  Genotype g;
  g.space = "nb201";
  size_t pos = 0;
  int nodes = 0;
  while (pos <= t.size()) {
    const size_t plus = t.find('+', pos);
    const std::string part = t.substr(pos, plus == std::string::npos ? std::string::npos : plus - pos);
    ++nodes;
    if (part.size() < 2 || part.front() != '|' || part.back() != '|')
      throw ConfigError(where + ": node " + std::to_string(nodes) + " must look like |op~i|op~j|");
    size_t p = 1;
    while (p < part.size()) {
      const size_t bar = part.find('|', p);
      const std::string item = part.substr(p, bar - p);
      const size_t tilde = item.find('~');
      if (tilde == std::string::npos || tilde == 0 || tilde + 1 >= item.size())
        throw ConfigError(where + ": expected op~input, got " + squote(item));
      const std::string num = item.substr(tilde + 1);
      if (num.size() > 3 || num.find_first_not_of("0123456789") != std::string::npos)
        throw ConfigError(where + ": input of " + squote(item) + " is not a node index");
      g.normal.emplace_back(item.substr(0, tilde), std::stoi(num));
      p = bar + 1;
      if (g.normal.size() > nb201_edges().size()) break;
    }
    if (plus == std::string::npos || g.normal.size() > nb201_edges().size()) break;
    pos = plus + 1;
  }
  try {
    validate_genotype(g);
  } catch (const ConfigError& e) {
    throw ConfigError(where + ": " + std::string(e.what()).substr(std::string("genotype: ").size()));
  }
  return g;
}

std::string mbv2_text(const Genotype& g) {
  std::string out = "mbv2:" + join(g.layers, ",");
  if (g.se_ratio > 0) {
    char b[32];
    std::snprintf(b, sizeof b, "%.17g", g.se_ratio);
    out += std::string(";se=") + b;
  }
  if (g.swish) out += ";swish";
  return out;
}

Genotype mbv2_from_text(const std::string& text) {
  const std::string t = trim(text);
  const std::string where = "mbv2 genotype " + squote(t);
  if (t.rfind("mbv2:", 0) != 0) throw ConfigError(where + ": must start with 'mbv2:'");
  Genotype g;
  g.space = "mbv2";
  std::vector<std::string> parts;
  for (size_t p = 5;;) {
    const size_t semi = t.find(';', p);
    parts.push_back(trim(t.substr(p, semi == std::string::npos ? std::string::npos : semi - p)));
    if (semi == std::string::npos) break;
    p = semi + 1;
  }
  for (size_t p = 0;;) {
    const size_t comma = parts[0].find(',', p);
    g.layers.push_back(trim(parts[0].substr(p, comma == std::string::npos ? std::string::npos : comma - p)));
    if (comma == std::string::npos || g.layers.size() > mbv2_layout().size()) break;
    p = comma + 1;
  }
  for (size_t i = 1; i < parts.size(); ++i) {
    if (parts[i] == "swish") {
      g.swish = true;
    } else if (parts[i].rfind("se=", 0) == 0) {
      const std::string v = parts[i].substr(3);
      char* end = nullptr;
      g.se_ratio = std::strtod(v.c_str(), &end);
      if (v.empty() || end != v.c_str() + v.size() || !std::isfinite(g.se_ratio))
        throw ConfigError(where + ": se=" + printable(v) + " is not a number");
    } else {
      throw ConfigError(where + ": unknown option " + squote(parts[i]) + " (se=R, swish)");
    }
  }
  try {
    validate_genotype(g);
  } catch (const ConfigError& e) {
    throw ConfigError(where + ": " + std::string(e.what()).substr(std::string("genotype: ").size()));
  }
  return g;
}

// ------------------------------------------------------------------------------------------
// JSON / text
// ------------------------------------------------------------------------------------------

nlohmann::json genotype_to_json(const Genotype& g) {
  if (g.space == "nb201") return {{"space", "nb201"}, {"arch", nb201_arch_string(g)}};
  if (g.space == "mbv2") return {{"space", "mbv2"}, {"layers", g.layers}, {"se_ratio", g.se_ratio}, {"swish", g.swish}};
  auto edges = [](const std::vector<GeneEdge>& cell) {
    nlohmann::json a = nlohmann::json::array();
    for (const auto& [op, in] : cell) a.push_back(nlohmann::json::array({op, in}));
    return a;
  };
  nlohmann::json j = nlohmann::json::object();
  j["normal"] = edges(g.normal);
  j["normal_concat"] = g.normal_concat;
  j["reduce"] = edges(g.reduce);
  j["reduce_concat"] = g.reduce_concat;
  return j;
}

Genotype genotype_from_json(const nlohmann::json& j) {
  try {
    if (j.is_object() && j.contains("space") && j["space"] != "darts") {
      const auto space = j.at("space").get<std::string>();
      const std::vector<std::string> keys = space == "nb201" ? std::vector<std::string>{"space", "arch"}
                                          : space == "mbv2" ? std::vector<std::string>{"space", "layers", "se_ratio", "swish"}
                                                            : std::vector<std::string>{};
      if (keys.empty()) throw ConfigError("genotype JSON: unknown space " + squote(space) + " (known: darts, nb201, mbv2)");
      for (auto it = j.begin(); it != j.end(); ++it)
        if (it.key() != "margins" && std::find(keys.begin(), keys.end(), it.key()) == keys.end())
          throw ConfigError("genotype JSON: unknown key " + squote(it.key()) + " for space " + space + " (expected " + join(keys, ", ") + ")");
      if (space == "nb201") return nb201_from_string(j.at("arch").get<std::string>());
      Genotype g;
      g.space = "mbv2";
      g.layers = j.at("layers").get<std::vector<std::string>>();
      g.se_ratio = j.value("se_ratio", 0.0);
      g.swish = j.value("swish", false);
      validate_genotype(g);
      return g;
    }
    if (!j.is_object()) {
      throw ConfigError(std::string("genotype JSON: expected an object with keys normal, "
                                    "normal_concat, reduce, reduce_concat; got ") +
                        j.type_name());
    }
    static const char* kKeys[4] = {"normal", "normal_concat", "reduce", "reduce_concat"};
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() == "space" || it.key() == "margins") continue;  // "darts"; a search's decisiveness (ignored)
      if (std::find_if(std::begin(kKeys), std::end(kKeys),
                       [&](const char* k) { return it.key() == k; }) == std::end(kKeys)) {
        throw ConfigError("genotype JSON: unknown key " + squote(it.key()) +
                          " (expected normal, normal_concat, reduce, reduce_concat)");
      }
    }
    for (const char* k : kKeys) {
      if (!j.contains(k)) throw ConfigError(std::string("genotype JSON: missing key '") + k + "'");
    }
    Genotype g;
    g.normal = json_edges(j.at("normal"), "normal");
    g.normal_concat = json_concat(j.at("normal_concat"), "normal_concat");
    g.reduce = json_edges(j.at("reduce"), "reduce");
    g.reduce_concat = json_concat(j.at("reduce_concat"), "reduce_concat");
    validate_genotype(g);
    return g;
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError(std::string("genotype JSON: ") + e.what());
  }
}

std::string genotype_to_text(const Genotype& g) {
  if (g.space == "nb201") return nb201_arch_string(g);
  if (g.space == "mbv2") return mbv2_text(g);
  return "Genotype(normal=" + edges_to_text(g.normal) +
         ", normal_concat=" + ints_to_text(g.normal_concat) +
         ", reduce=" + edges_to_text(g.reduce) +
         ", reduce_concat=" + ints_to_text(g.reduce_concat) + ")";
}

Genotype genotype_from_text(const std::string& text) {
  const std::string t = trim(text);
  if (!t.empty() && t[0] == '|') return nb201_from_string(t);
  if (t.rfind("mbv2:", 0) == 0) return mbv2_from_text(t);
  Genotype g = TextParser(text).parse();
  validate_genotype(g);
  return g;
}

// ------------------------------------------------------------------------------------------
// Built-ins / resolution
// ------------------------------------------------------------------------------------------

std::vector<std::string> builtin_genotype_names() {
  std::vector<std::string> out;
  for (const auto& [n, t] : builtin_texts()) {
    (void)t;
    out.push_back(n);
  }
  return out;
}

Genotype builtin_genotype(const std::string& name) {
  const std::string c = canonical_builtin(name);
  if (c.empty()) {
    throw ConfigError("unknown built-in genotype " + squote(name) + builtin_hint(name) +
                      " (known: " + join(builtin_genotype_names(), ", ") + ")");
  }
  return builtin_map().at(c);
}

Genotype resolve_genotype(const std::string& spec) {
  if (!canonical_builtin(spec).empty()) return builtin_genotype(spec);

  struct stat st {};
  if (!spec.empty() && spec.find('\0') == std::string::npos && ::stat(spec.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) {
      // A search's run directory: its genotype.json.
      const std::string file = spec + (spec.back() == '/' ? "" : "/") + "genotype.json";
      struct stat fst {};
      if (::stat(file.c_str(), &fst) != 0)
        throw ConfigError("genotype directory " + squote_path(spec) +
                          " holds no genotype.json (pass a finished search's run directory or a genotype file)");
      return resolve_genotype(file);
    }
    if (!S_ISREG(st.st_mode)) {
      throw ConfigError("genotype file " + squote_path(spec) + " is not a regular file");
    }
    std::ifstream in(spec, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    if (!in.good() && !in.eof()) throw ConfigError("cannot read genotype file " + squote_path(spec));
    const std::string content = ss.str();
    const std::string t = trim(content);
    const bool is_json_ext = spec.size() >= 5 && lower(spec.substr(spec.size() - 5)) == ".json";
    try {
      if (is_json_ext || (!t.empty() && t[0] == '{')) {
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(content);
        } catch (const nlohmann::json::exception& e) {
          throw ConfigError(std::string("invalid JSON: ") + e.what());
        }
        return genotype_from_json(j);
      }
      return genotype_from_text(content);
    } catch (const ConfigError& e) {
      throw ConfigError("genotype file " + squote_path(spec) + ": " + e.what());
    }
  }

  const std::string t = trim(spec);
  if (!t.empty() && t[0] == '{') {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(t);
    } catch (const nlohmann::json::exception& e) {
      throw ConfigError(std::string("inline genotype: invalid JSON: ") + e.what());
    }
    return genotype_from_json(j);
  }
  if (!t.empty() && (t[0] == '|' || t.rfind("mbv2:", 0) == 0)) return genotype_from_text(t);
  // DARTS text: `Genotype(...)`, `genotypes.Genotype(...)` or `NAME = ...`.
  {
    size_t i = 0;
    while (i < t.size() && (std::isalnum(static_cast<unsigned char>(t[i])) || t[i] == '_' ||
                            t[i] == '.'))
      ++i;
    size_t j = i;
    while (j < t.size() && std::isspace(static_cast<unsigned char>(t[j]))) ++j;
    if (i > 0 && j < t.size() && (t[j] == '=' || t[j] == '(')) return genotype_from_text(t);
  }
  const bool looks_like_path = spec.find('/') != std::string::npos ||
                               (spec.size() >= 5 && lower(spec.substr(spec.size() - 5)) == ".json") ||
                               (spec.size() >= 4 && lower(spec.substr(spec.size() - 4)) == ".txt");
  if (looks_like_path) throw ConfigError("genotype file " + squote_path(spec) + " does not exist");
  throw ConfigError("unknown genotype " + squote_path(spec) + builtin_hint(spec) + ": not a built-in (" +
                    join(builtin_genotype_names(), ", ") +
                    "), not a file, not JSON/DARTS text");
}

int count_skips(const Genotype& g) {
  if (g.space == "mbv2") return static_cast<int>(std::count(g.layers.begin(), g.layers.end(), "skip_connect"));
  return count_op(g.normal, "skip_connect") + count_op(g.reduce, "skip_connect");
}

int count_op(const std::vector<GeneEdge>& cell, const std::string& op) {
  return static_cast<int>(std::count_if(cell.begin(), cell.end(),
                                        [&](const GeneEdge& e) { return e.first == op; }));
}

// ------------------------------------------------------------------------------------------
// Graphviz
// ------------------------------------------------------------------------------------------

std::string cell_to_dot(const std::vector<GeneEdge>& cell, const std::vector<int>& concat,
                        const std::string& title) {
  const int steps = static_cast<int>(cell.size() / 2);
  std::ostringstream o;
  o << "digraph cell {\n"
    << "  rankdir=LR;\n"
    << "  label=\"" << dot_escape(title) << "\";\n"
    << "  labelloc=t;\n"
    << "  fontname=\"times\";\n"
    << "  fontsize=24;\n"
    << "  node [style=filled, shape=rect, align=center, fontsize=20, height=0.5, width=0.5, "
       "penwidth=2, fontname=\"times\"];\n"
    << "  edge [fontsize=20, fontname=\"times\"];\n"
    << "  \"c_{k-2}\" [fillcolor=lightblue];\n"
    << "  \"c_{k-1}\" [fillcolor=lightblue];\n";
  for (int i = 0; i < steps; ++i) o << "  \"" << i << "\" [fillcolor=lightcyan];\n";
  o << "  \"c_{k}\" [fillcolor=yellow];\n";
  for (size_t k = 0; k < cell.size(); ++k) {
    const auto& [op, in] = cell[k];
    const bool skip = op == "skip_connect";
    o << "  \"" << dot_escape(node_name(in)) << "\" -> \"" << (k / 2) << "\" [label=\""
      << dot_escape(op) << "\"";
    if (skip) {
      o << ", color=red, fontcolor=red, penwidth=2";
    } else {
      o << ", color=gray30";
    }
    o << "];\n";
  }
  for (const int c : concat) {
    o << "  \"" << dot_escape(node_name(c)) << "\" -> \"c_{k}\" [color=gray];\n";
  }
  o << "}\n";
  return o.str();
}

std::string nb201_to_dot(const Genotype& g, const std::string& title) {
  std::ostringstream o;
  o << "digraph cell {\n  rankdir=LR;\n  label=\"" << dot_escape(title) << "\";\n  labelloc=t;\n"
    << "  fontname=\"times\";\n  fontsize=24;\n"
    << "  node [style=filled, shape=rect, align=center, fontsize=20, height=0.5, width=0.5, penwidth=2, fontname=\"times\"];\n"
    << "  edge [fontsize=20, fontname=\"times\"];\n"
    << "  \"0\" [fillcolor=lightblue];\n  \"1\" [fillcolor=lightcyan];\n  \"2\" [fillcolor=lightcyan];\n"
    << "  \"3\" [fillcolor=yellow];\n";
  for (size_t k = 0; k < g.normal.size(); ++k) {
    const auto& [op, in] = g.normal[k];
    if (op == "none") continue;  // a `none` edge contributes nothing
    o << "  \"" << in << "\" -> \"" << nb201_edges().at(k).first << "\" [label=\"" << dot_escape(op) << "\""
      << (op == "skip_connect" ? ", color=red, fontcolor=red, penwidth=2" : ", color=gray30") << "];\n";
  }
  o << "}\n";
  return o.str();
}

std::string mbv2_to_dot(const Genotype& g, const std::string& title) {
  std::ostringstream o;
  o << "digraph chain {\n  rankdir=TB;\n  label=\"" << dot_escape(title) << "\";\n  labelloc=t;\n"
    << "  fontname=\"times\";\n  fontsize=20;\n"
    << "  node [style=filled, shape=rect, fontsize=14, height=0.3, penwidth=1, fontname=\"times\"];\n"
    << "  \"stem\" [label=\"stem conv 3x3 s2, 32\", fillcolor=lightblue];\n"
    << "  \"ds\" [label=\"dw-sep 3x3, 16\", fillcolor=lightblue];\n  \"stem\" -> \"ds\";\n";
  std::string prev = "ds";
  const auto& layout = mbv2_layout();
  for (size_t i = 0; i < g.layers.size() && i < layout.size(); ++i) {
    const std::string id = "l" + std::to_string(i);
    const bool skip = g.layers[i] == "skip_connect";
    o << "  \"" << id << "\" [label=\"" << i << ": " << dot_escape(g.layers[i]) << ", " << layout[i].out_channels
      << (layout[i].stride == 2 ? ", s2" : "") << "\", fillcolor=" << (skip ? "mistyrose, color=red" : "lightcyan") << "];\n"
      << "  \"" << prev << "\" -> \"" << id << "\";\n";
    prev = id;
  }
  o << "  \"head\" [label=\"conv 1x1 1280, pool, linear\", fillcolor=yellow];\n  \"" << prev << "\" -> \"head\";\n}\n";
  return o.str();
}

std::vector<std::string> write_genotype_diagrams(const Genotype& g, const std::string& dir) {
  namespace fs = std::filesystem;
  if (g.space == "nb201") return write_dot_files(nb201_to_dot(g, "NAS-Bench-201 cell"), (fs::path(dir) / "cell").string());
  if (g.space == "mbv2") return write_dot_files(mbv2_to_dot(g, "mbv2 chain"), (fs::path(dir) / "chain").string());
  auto out = write_cell_diagram(g.normal, g.normal_concat, "normal cell", (fs::path(dir) / "normal").string());
  for (auto& f : write_cell_diagram(g.reduce, g.reduce_concat, "reduction cell", (fs::path(dir) / "reduce").string()))
    out.push_back(f);
  return out;
}

std::vector<std::string> write_cell_diagram(const std::vector<GeneEdge>& cell,
                                            const std::vector<int>& concat,
                                            const std::string& title, const std::string& stem) {
  return write_dot_files(cell_to_dot(cell, concat, title), stem);
}

std::vector<std::string> write_dot_files(const std::string& dot, const std::string& stem) {
  std::vector<std::string> written;
  const std::string dot_path = stem + ".dot";
  write_file_atomic(dot_path, dot);
  written.push_back(dot_path);
  if (find_on_path("dot")) {
    for (const char* fmt : {"svg", "png"}) {
      const std::string out = stem + "." + fmt;
      if (render_dot(dot_path, fmt, out)) {
        written.push_back(out);
      } else {
        std::cerr << "warning: graphviz 'dot' failed to render " << out << "\n";
      }
    }
  }
  return written;
}

}  // namespace noisydarts
