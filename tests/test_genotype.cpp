// Tests of genotype derivation, JSON/text forms, built-ins, resolution and diagrams.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "noisydarts/error.h"
#include "noisydarts/genotype.h"
#include "noisydarts/ops.h"

using namespace noisydarts;
namespace fs = std::filesystem;

namespace {

// Weights [rows, ops] filled with `base`, with the given (row, op, value) overrides.
torch::Tensor make_weights(int64_t rows, const std::vector<std::string>& prims,
                           const std::vector<std::tuple<int, std::string, double>>& set,
                           double base = 0.01) {
  auto w = torch::full({rows, static_cast<int64_t>(prims.size())}, base, torch::kFloat);
  for (const auto& [r, op, v] : set) {
    const auto it = std::find(prims.begin(), prims.end(), op);
    EXPECT_TRUE(it != prims.end()) << op;
    w[r][it - prims.begin()] = v;
  }
  return w;
}

// Asserts that `f` throws exactly a ConfigError (any other exception or none is a failure).
template <typename F>
void expect_config_error(F&& f, const std::string& what, const std::string& msg_part = "") {
  try {
    f();
    ADD_FAILURE() << "no exception for: " << what;
  } catch (const ConfigError& e) {
    const std::string m = e.what();
    EXPECT_EQ(m.find('\n'), std::string::npos) << "multi-line message: " << m;
    if (!msg_part.empty()) {
      EXPECT_NE(m.find(msg_part), std::string::npos)
          << "message '" << m << "' lacks '" << msg_part << "' for: " << what;
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type for: " << what << ": " << e.what();
  } catch (...) {
    ADD_FAILURE() << "non-std exception for: " << what;
  }
}

// Parses, returning true on success, false on ConfigError; any other exception fails.
bool text_parses_or_config_error(const std::string& s) {
  try {
    genotype_from_text(s);
    return true;
  } catch (const ConfigError&) {
    return false;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  } catch (...) {
    ADD_FAILURE() << "non-std exception";
  }
  return false;
}

const char* kDartsV2Repr =
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
    "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])";

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "geno_test_XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    if (!p) throw std::runtime_error("mkdtemp failed");
    path = p;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name, const std::string& content) const {
    const auto p = (path / name).string();
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Derivation
// ---------------------------------------------------------------------------------------------

// steps = 2: node 0 has rows 0 (input 0), 1 (input 1); node 1 rows 2, 3, 4 (inputs 0, 1, 2);
// large `none` weights where they would change the derivation if they counted.
static torch::Tensor strong_none_weights() {
  return make_weights(5, darts_primitives(),
                      {{0, "none", 0.90}, {0, "sep_conv_3x3", 0.30},
                       {1, "none", 0.00}, {1, "max_pool_3x3", 0.50},
                       {2, "none", 0.95}, {2, "skip_connect", 0.10},
                       {3, "dil_conv_3x3", 0.40},
                       {4, "none", 0.99}, {4, "sep_conv_5x5", 0.60}});
}

TEST(Genotype, DeriveIgnoresNoneForEdgeRankingAndOpChoice) {
  const auto& P = darts_primitives();  // `none` first
  auto w = strong_none_weights();
  const auto cell = derive_cell(w, P, 2);
  const std::vector<GeneEdge> expected{
      {"max_pool_3x3", 1}, {"sep_conv_3x3", 0},  // strongest edge first
      {"sep_conv_5x5", 2}, {"dil_conv_3x3", 1}};  // input 0 dropped despite its big `none`
  EXPECT_EQ(cell, expected);
}

TEST(Genotype, MarginsFollowTheDerivationEdgeByEdge) {
  const auto& P = darts_primitives();
  auto w = strong_none_weights();
  const auto m = cell_margins(w, P, 2);
  ASSERT_EQ(m.size(), 4u);  // in derive_cell's order: max_pool<-1, sep3<-0, sep5<-2, dil3<-1
  // op margin: kept op - runner-up (`none` excluded, the others at 0.01); edge margin: kept
  // edge's strength - strongest dropped edge into the node (node 0 drops none: the strength).
  const double want[4][2] = {{0.49, 0.50}, {0.29, 0.30}, {0.59, 0.50}, {0.39, 0.30}};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_NEAR(m[i].op_margin, want[i][0], 1e-6) << i;
    EXPECT_NEAR(m[i].edge_margin, want[i][1], 1e-6) << i;
  }
  // Rows of a table (nb201 edges, mbv2 layers) keep their strongest entry; a tie is a zero margin.
  auto t = torch::tensor({0.2, 0.5, 0.3, 0.4, 0.4, 0.2, 0.0, 0.9, 0.1}, torch::kDouble).reshape({3, 3});
  const auto r = row_margins(t);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_NEAR(r[0], 0.2, 1e-12);
  EXPECT_EQ(r[1], 0.0);
  EXPECT_NEAR(r[2], 0.8, 1e-12);
  // genotype.json with margins still reads as the genotype.
  auto j = genotype_to_json(builtin_genotype("DARTS_V2"));
  j["margins"] = {{"threshold", 0.0125}, {"normal", nlohmann::json::array()}};
  EXPECT_EQ(genotype_from_json(j), builtin_genotype("DARTS_V2"));
  auto n = genotype_to_json(nb201_from_string("|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|"));
  n["margins"] = {{"threshold", 0.02}};
  EXPECT_EQ(genotype_from_json(n).space, "nb201");
}

TEST(Genotype, DeriveWithoutNoneCountsAllOps) {
  const auto& P = noisydarts_primitives();
  auto w = make_weights(5, P,
                        {{0, "skip_connect", 0.5}, {1, "sep_conv_3x3", 0.7},
                         {2, "max_pool_3x3", 0.2}, {3, "dil_conv_5x5", 0.3},
                         {4, "avg_pool_3x3", 0.9}});
  const std::vector<GeneEdge> expected{
      {"sep_conv_3x3", 1}, {"skip_connect", 0}, {"avg_pool_3x3", 2}, {"dil_conv_5x5", 1}};
  EXPECT_EQ(derive_cell(w, P, 2), expected);
  // A `none`-free primitive list where max_pool is largest: it is chosen (nothing is ignored).
  auto w2 = make_weights(2, P, {{0, "max_pool_3x3", 0.8}, {1, "dil_conv_5x5", 0.6}});
  EXPECT_EQ(derive_cell(w2, P, 1),
            (std::vector<GeneEdge>{{"max_pool_3x3", 0}, {"dil_conv_5x5", 1}}));
}

TEST(Genotype, DeriveTiesPreferLowerInputAndFirstPrimitive) {
  const auto& P = darts_primitives();
  // Uniform weights: every node keeps inputs 0 and 1 with the first non-`none` op.
  auto w = torch::full({14, 8}, 0.125);
  const auto cell = derive_cell(w, P, 4);
  ASSERT_EQ(cell.size(), 8u);
  for (size_t k = 0; k < cell.size(); ++k) {
    EXPECT_EQ(cell[k].first, "max_pool_3x3");
    EXPECT_EQ(cell[k].second, static_cast<int>(k % 2));
  }
  // Node 1 (rows 2..4): inputs 1 and 2 tie above input 0 -> (1, 2) in index order.
  auto w2 = make_weights(5, P, {{3, "sep_conv_3x3", 0.5}, {4, "sep_conv_3x3", 0.5},
                                {3, "dil_conv_5x5", 0.5}});
  const auto c2 = derive_cell(w2, P, 2);
  EXPECT_EQ(c2[2], (GeneEdge{"sep_conv_3x3", 1}));  // tie between ops -> first in primitives
  EXPECT_EQ(c2[3], (GeneEdge{"sep_conv_3x3", 2}));
}

TEST(Genotype, DeriveGenotypeConcatAndValidity) {
  const auto& P = darts_primitives();
  torch::manual_seed(0);
  auto an = torch::randn({14, 8}, torch::requires_grad());
  auto ar = torch::randn({14, 8}, torch::requires_grad());
  const auto g = derive_genotype(torch::softmax(an, -1), torch::softmax(ar, -1), P, 4, 4);
  EXPECT_EQ(g.normal_concat, (std::vector<int>{2, 3, 4, 5}));
  EXPECT_EQ(g.reduce_concat, (std::vector<int>{2, 3, 4, 5}));
  EXPECT_EQ(g.steps(), 4);
  EXPECT_NO_THROW(validate_genotype(g));
  EXPECT_EQ(count_op(g.normal, "none"), 0);
  EXPECT_EQ(count_op(g.reduce, "none"), 0);
  const auto g2 = derive_genotype(torch::softmax(an, -1), torch::softmax(ar, -1), P, 4, 2);
  EXPECT_EQ(g2.normal_concat, (std::vector<int>{4, 5}));
  EXPECT_EQ(g2.normal, g.normal);
  // Same result on double weights.
  EXPECT_EQ(derive_cell(torch::softmax(an, -1).to(torch::kDouble), P, 4), g.normal);
  EXPECT_THROW(derive_genotype(an, ar, P, 4, 0), c10::ValueError);
  EXPECT_THROW(derive_genotype(an, ar, P, 4, 5), c10::ValueError);
}

TEST(Genotype, DeriveNanNeverWins) {
  const auto& P = noisydarts_primitives();
  auto w = make_weights(2, P, {{0, "skip_connect", 0.5}, {1, "sep_conv_3x3", 0.7}});
  w[1][0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(derive_cell(w, P, 1),
            (std::vector<GeneEdge>{{"sep_conv_3x3", 1}, {"skip_connect", 0}}));
}

TEST(Genotype, DeriveRejectsBadShapes) {
  const auto& P = darts_primitives();
  EXPECT_THROW(derive_cell(torch::zeros({13, 8}), P, 4), c10::ValueError);
  EXPECT_THROW(derive_cell(torch::zeros({14, 7}), P, 4), c10::ValueError);
  EXPECT_THROW(derive_cell(torch::zeros({14 * 8}), P, 4), c10::ValueError);
  EXPECT_THROW(derive_cell(torch::zeros({14, 8, 1}), P, 4), c10::ValueError);
  EXPECT_THROW(derive_cell(torch::zeros({14, 8}), P, 0), c10::ValueError);
  EXPECT_THROW(derive_cell(torch::Tensor(), P, 4), c10::ValueError);
  EXPECT_THROW(derive_cell(torch::zeros({2, 1}), {"none"}, 1), c10::ValueError);
  try {
    derive_cell(torch::zeros({13, 8}), P, 4);
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("[14, 8]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(derive_genotype(torch::zeros({14, 8}), torch::zeros({14, 7}), P), c10::ValueError);
}

// ---------------------------------------------------------------------------------------------
// Built-ins, JSON and text forms
// ---------------------------------------------------------------------------------------------

TEST(Genotype, BuiltinsExistValidateAndAliasesWork) {
  const std::vector<std::string> names{"DARTS_V1",  "DARTS_V2",     "NASNet",
                                       "AmoebaNet", "NoisyDARTS_a", "NoisyDARTS_b", "NoisyDARTS_A"};
  EXPECT_EQ(builtin_genotype_names(), names);
  for (const auto& n : names) {
    const auto g = builtin_genotype(n);
    EXPECT_NO_THROW(validate_genotype(g)) << n;
  }
  EXPECT_EQ(builtin_genotype("noisy_darts_a"), builtin_genotype("NoisyDARTS_a"));
  EXPECT_EQ(builtin_genotype("noisy_darts_b"), builtin_genotype("NoisyDARTS_b"));
  EXPECT_EQ(builtin_genotype("NoisyDARTS_A").space, "mbv2");
  EXPECT_EQ(builtin_genotype("NASNet").steps(), 5);
  EXPECT_EQ(builtin_genotype("AmoebaNet").reduce_concat, (std::vector<int>{3, 4, 6}));
  EXPECT_EQ(builtin_genotype("AmoebaNet").reduce[9], (GeneEdge{"sep_conv_3x3", 5}));
  EXPECT_EQ(builtin_genotype("NoisyDARTS_b").normal_concat, (std::vector<int>{2, 3, 4, 5}));
  EXPECT_EQ(builtin_genotype("DARTS_V1").reduce[7], (GeneEdge{"avg_pool_3x3", 0}));
  expect_config_error([] { builtin_genotype("darts_v2"); }, "case", "DARTS_V2");
  expect_config_error([] { builtin_genotype("nope"); }, "unknown", "NoisyDARTS_b");
}

TEST(Genotype, CountOpOnNoisyDartsA) {
  const auto g = builtin_genotype("NoisyDARTS_a");
  EXPECT_EQ(count_op(g.normal, "skip_connect"), 1);
  EXPECT_EQ(count_op(g.reduce, "skip_connect"), 4);
  EXPECT_EQ(count_op(g.normal, "dil_conv_3x3"), 3);
  EXPECT_EQ(count_op(g.normal, "none"), 0);
  EXPECT_EQ(count_op({}, "skip_connect"), 0);
}

TEST(Genotype, JsonRoundTripForEveryBuiltin) {
  for (const auto& n : builtin_genotype_names()) {
    const auto g = builtin_genotype(n);
    const auto j = genotype_to_json(g);
    EXPECT_EQ(genotype_from_json(j), g) << n;
    EXPECT_EQ(genotype_from_json(nlohmann::json::parse(j.dump())), g) << n;
  }
  const auto j = genotype_to_json(builtin_genotype("DARTS_V2"));
  EXPECT_EQ(j.at("normal").at(7), nlohmann::json::parse(R"(["dil_conv_3x3", 2])"));
  EXPECT_EQ(j.at("normal_concat"), nlohmann::json::parse("[2,3,4,5]"));
  EXPECT_EQ(j.size(), 4u);
}

TEST(Genotype, TextRoundTripForEveryBuiltin) {
  for (const auto& n : builtin_genotype_names()) {
    const auto g = builtin_genotype(n);
    EXPECT_EQ(genotype_from_text(genotype_to_text(g)), g) << n;
  }
}

TEST(Genotype, TextOutputMatchesPythonRepr) {
  EXPECT_EQ(genotype_to_text(builtin_genotype("DARTS_V2")), kDartsV2Repr);
  const auto a = genotype_to_text(builtin_genotype("NoisyDARTS_a"));
  EXPECT_NE(a.find("normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "), std::string::npos)
      << a;
}

TEST(Genotype, TextParserAcceptsPythonVariants) {
  const auto v2 = builtin_genotype("DARTS_V2");
  // range(), double quotes, newlines, indentation, NAME = prefix, trailing commas, comment.
  const std::string multi = R"(DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ('sep_conv_3x3', 0),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("skip_connect", 0),
            ("skip_connect", 0), ("dil_conv_3x3", 2),],   # trailing comma
    normal_concat = range(2, 6),
    reduce=[ ( 'max_pool_3x3' , 0 ) , ('max_pool_3x3', 1), ('skip_connect', 2),
            ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2),
            ('skip_connect', 2), ('max_pool_3x3', 1)],
    reduce_concat=[2, 3, 4, 5],
)
)";
  EXPECT_EQ(genotype_from_text(multi), v2);
  // Keyword arguments in any order, without the Genotype prefix, qualified name.
  const std::string reordered =
      "(reduce_concat=range(2,6), reduce=" + genotype_to_json(v2)["reduce"].dump() +
      ", normal_concat=list(range(2, 6)), normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
      "('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), "
      "('skip_connect', 0), ('dil_conv_3x3', 2)])";
  EXPECT_EQ(genotype_from_text(reordered), v2);
  std::string qualified = std::string("  genotypes.") + kDartsV2Repr + "\n\n";
  EXPECT_EQ(genotype_from_text(qualified), v2);
  // Positional arguments (the namedtuple's field order).
  std::string positional = kDartsV2Repr;
  for (const char* k : {"normal=", "normal_concat=", "reduce=", "reduce_concat="}) {
    positional.erase(positional.find(k), std::string(k).size());
  }
  EXPECT_EQ(genotype_from_text(positional), v2);
  // range(b) form and tuples for concat.
  auto g = genotype_from_text(
      "Genotype(normal=[('skip_connect', 0), ('sep_conv_3x3', 1)], normal_concat=range(3), "
      "reduce=[('max_pool_3x3', 1), ('avg_pool_3x3', 0)], reduce_concat=(2,))");
  EXPECT_EQ(g.normal_concat, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(g.reduce_concat, (std::vector<int>{2}));
}

TEST(Genotype, MalformedTextThrowsConfigError) {
  const std::string v2 = kDartsV2Repr;
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = v2;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  expect_config_error([&] { genotype_from_text(replace("'dil_conv_3x3', 2", "'dil_conv_9x9', 2")); },
                      "unknown op", "dil_conv_9x9");
  expect_config_error([&] { genotype_from_text(replace("'dil_conv_3x3', 2", "'dil_conv_3x3', 5")); },
                      "input out of range", "normal edge 7");
  expect_config_error([&] { genotype_from_text(replace("('dil_conv_3x3', 2)", "('x', -1)")); },
                      "negative input");
  expect_config_error([&] { genotype_from_text(replace(", ('dil_conv_3x3', 2)]", "]")); },
                      "odd edge count", "7 edges");
  expect_config_error([&] { genotype_from_text(replace(", normal_concat=[2, 3, 4, 5]", "")); },
                      "missing argument", "normal_concat");
  expect_config_error([&] { genotype_from_text(replace("normal_concat=[2, 3, 4, 5]", "normal_concat=[2, 3, 4, 6]")); },
                      "concat out of range", "normal_concat");
  expect_config_error([&] { genotype_from_text(replace("normal_concat=[2, 3, 4, 5]", "normal_concat=[2, 2]")); },
                      "duplicate concat", "twice");
  expect_config_error([&] { genotype_from_text(replace("normal_concat=[2, 3, 4, 5]", "normal_concat=[]")); },
                      "empty concat", "empty");
  expect_config_error([&] { genotype_from_text(replace("normal_concat", "normal_concat=[2], foo")); },
                      "unknown keyword", "offset");
  expect_config_error([&] { genotype_from_text(replace("reduce_concat", "normal")); },
                      "duplicate keyword", "twice");
  expect_config_error([&] { genotype_from_text(v2 + " extra"); }, "trailing", "end of input");
  expect_config_error([&] { genotype_from_text(replace("Genotype", "Phenotype")); }, "callee",
                      "'Genotype'");
  expect_config_error([&] { genotype_from_text(replace("('sep_conv_3x3', 0)", "(sep_conv_3x3, 0)")); },
                      "unquoted op", "quoted op name");
  expect_config_error([&] { genotype_from_text(replace("('sep_conv_3x3', 0)", "('sep_conv_3x3', 0.5)")); },
                      "float input");
  expect_config_error([&] { genotype_from_text(replace("('sep_conv_3x3', 0)", "('sep_conv_3x3', 99999999999999999999)")); },
                      "huge int", "too large");
  expect_config_error([&] { genotype_from_text("Genotype(normal=[('sep_conv_3x3, 0)])"); },
                      "unterminated string", "unterminated");
  expect_config_error([&] { genotype_from_text(""); }, "empty", "offset 0");
  expect_config_error([&] { genotype_from_text("Genotype(normal=[\x01])"); }, "control byte",
                      "\\x01");
  expect_config_error([&] { genotype_from_text("Genotype(normal_concat=range(0, 1000000000))"); },
                      "long range", "too long");
  // Error positions: offset and line of the offending token.
  try {
    genotype_from_text("Genotype(\n  normal=[('a', 0)]\n  reduce=[])");
    ADD_FAILURE();
  } catch (const ConfigError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("offset 32 (line 3, column 3)"), std::string::npos) << m;
    EXPECT_NE(m.find("expected ',' or ')'"), std::string::npos) << m;
  }
}

TEST(Genotype, TextParserSurvivesTruncationAndGarbage) {
  const std::string v2 = kDartsV2Repr;
  for (size_t n = 0; n < v2.size(); ++n) {
    EXPECT_FALSE(text_parses_or_config_error(v2.substr(0, n))) << "prefix " << n;
  }
  std::mt19937 rng(1234);
  // Random byte strings, biased towards the grammar's own characters.
  const std::string alphabet = "()[],='\"_ragneGotypl0123456789 \n#-.\\x";
  for (int it = 0; it < 3000; ++it) {
    const size_t len = rng() % 64;
    std::string s;
    for (size_t i = 0; i < len; ++i) {
      s += (rng() % 2) ? static_cast<char>(rng() % 256) : alphabet[rng() % alphabet.size()];
    }
    text_parses_or_config_error(s);
  }
  // Single-byte mutations of a valid genotype.
  for (int it = 0; it < 3000; ++it) {
    std::string s = v2;
    const int edits = 1 + static_cast<int>(rng() % 3);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % s.size();
      switch (rng() % 3) {
        case 0: s[pos] = static_cast<char>(rng() % 256); break;
        case 1: s.erase(pos, 1); break;
        default: s.insert(pos, 1, alphabet[rng() % alphabet.size()]);
      }
    }
    text_parses_or_config_error(s);
  }
  static const char kNul[] = "Genotype(normal=[('a\0b', 0)])";
  // Pathological nesting does not recurse.
  EXPECT_FALSE(text_parses_or_config_error("Genotype(normal=" + std::string(200000, '[')));
  EXPECT_FALSE(text_parses_or_config_error(std::string(200000, '(')));
  EXPECT_FALSE(text_parses_or_config_error(std::string(kNul, sizeof(kNul) - 1)));
}

TEST(Genotype, MalformedJsonThrowsConfigError) {
  const auto good = genotype_to_json(builtin_genotype("DARTS_V2"));
  auto with = [&](const std::string& key, const nlohmann::json& v) {
    auto j = good;
    j[key] = v;
    return j;
  };
  auto without = [&](const std::string& key) {
    auto j = good;
    j.erase(key);
    return j;
  };
  struct Case {
    const char* what;
    nlohmann::json j;
    const char* msg;
  };
  auto normal = good["normal"];
  auto set_edge = [&](const nlohmann::json& e) {
    auto n = normal;
    n[7] = e;
    return with("normal", n);
  };
  const std::vector<Case> cases{
      {"not an object", nlohmann::json::array({1, 2}), "expected an object"},
      {"missing key", without("reduce_concat"), "reduce_concat"},
      {"extra key", with("normal_concats", nlohmann::json::array({2})), "normal_concats"},
      {"normal is a string", with("normal", "sep_conv_3x3"), "'normal'"},
      {"concat is an object", with("normal_concat", nlohmann::json::object()), "normal_concat"},
      {"concat has a string", with("normal_concat", nlohmann::json::parse(R"([2,"3"])")),
       "normal_concat"},
      {"edge not a pair", set_edge(nlohmann::json::parse(R"(["dil_conv_3x3"])")), "'normal'[7]"},
      {"edge as object", set_edge(nlohmann::json::parse(R"({"op": "dil_conv_3x3"})")), "'normal'[7]"},
      {"op not string", set_edge(nlohmann::json::parse(R"([3, 2])")), "'normal'[7]"},
      {"input float", set_edge(nlohmann::json::parse(R"(["dil_conv_3x3", 2.0])")), "integer"},
      {"input bool", set_edge(nlohmann::json::parse(R"(["dil_conv_3x3", true])")), "integer"},
      {"input huge", set_edge(nlohmann::json::parse(R"(["dil_conv_3x3", 18446744073709551615])")),
       "too large"},
      {"input negative", set_edge(nlohmann::json::parse(R"(["dil_conv_3x3", -1])")), "out of range"},
      {"input out of range", set_edge(nlohmann::json::parse(R"(["dil_conv_3x3", 5])")),
       "out of range"},
      {"unknown op", set_edge(nlohmann::json::parse(R"(["conv_9x9", 2])")), "conv_9x9"},
      {"odd edges", [&] { auto n = normal; n.erase(7); return with("normal", n); }(), "7 edges"},
      {"null", nlohmann::json(), "expected an object"},
  };
  for (const auto& c : cases) {
    expect_config_error([&] { genotype_from_json(c.j); }, c.what, c.msg);
  }
}

TEST(Genotype, ValidateRejectsBadCells) {
  auto g = builtin_genotype("DARTS_V1");
  EXPECT_NO_THROW(validate_genotype(g));
  auto bad = g;
  bad.reduce.clear();
  expect_config_error([&] { validate_genotype(bad); }, "empty reduce", "reduce has 0 edges");
  bad = g;
  bad.reduce[0].second = 2;  // node 0 only has inputs 0, 1
  expect_config_error([&] { validate_genotype(bad); }, "node 0 input 2", "reduce edge 0");
  bad = g;
  bad.reduce_concat = {1, 6};
  expect_config_error([&] { validate_genotype(bad); }, "concat 6", "reduce_concat[1] = 6");
  bad = g;
  bad.normal[3].first = "none";  // `none` is a known op
  EXPECT_NO_THROW(validate_genotype(bad));
  bad.normal[3].first = "Sep_conv_3x3";
  expect_config_error([&] { validate_genotype(bad); }, "op case", "Sep_conv_3x3");
}

// ---------------------------------------------------------------------------------------------
// Resolution
// ---------------------------------------------------------------------------------------------

TEST(Genotype, ResolveFromNameFileAndInline) {
  const auto v2 = builtin_genotype("DARTS_V2");
  const auto a = builtin_genotype("NoisyDARTS_a");
  EXPECT_EQ(resolve_genotype("DARTS_V2"), v2);
  EXPECT_EQ(resolve_genotype("noisy_darts_a"), a);

  TempDir dir;
  const std::string json_file = dir.file("g.json", genotype_to_json(a).dump(2));
  EXPECT_EQ(resolve_genotype(json_file), a);
  const std::string text_file = dir.file("g.txt", std::string("X = ") + kDartsV2Repr + "\n");
  EXPECT_EQ(resolve_genotype(text_file), v2);
  const std::string noext_json = dir.file("genotype", "\n  " + genotype_to_json(v2).dump());
  EXPECT_EQ(resolve_genotype(noext_json), v2);
  const std::string py_file = dir.file("geno.py", std::string(kDartsV2Repr));
  EXPECT_EQ(resolve_genotype(py_file), v2);

  EXPECT_EQ(resolve_genotype(genotype_to_json(a).dump()), a);
  EXPECT_EQ(resolve_genotype(std::string("  ") + kDartsV2Repr), v2);
  EXPECT_EQ(resolve_genotype(std::string("MINE = ") + kDartsV2Repr), v2);

  expect_config_error([] { resolve_genotype("DARTS_V3"); }, "unknown name", "not a built-in");
  expect_config_error([] { resolve_genotype("darts_v2"); }, "case hint", "did you mean 'DARTS_V2'");
  expect_config_error([] { resolve_genotype(""); }, "empty spec", "unknown genotype");
  expect_config_error([&] { resolve_genotype((dir.path / "missing.json").string()); },
                      "missing file", "missing.json");
  // A directory is a search's run directory: its genotype.json (issue 17).
  expect_config_error([&] { resolve_genotype(dir.path.string()); }, "directory without genotype.json",
                      "holds no genotype.json");
  std::filesystem::create_directories(dir.path / "run");
  { std::ofstream(dir.path / "run" / "genotype.json") << genotype_to_json(builtin_genotype("DARTS_V2")).dump(); }
  EXPECT_EQ(resolve_genotype((dir.path / "run").string()), builtin_genotype("DARTS_V2"));
  const std::string bad_json = dir.file("bad.json", "{\"normal\": [");
  expect_config_error([&] { resolve_genotype(bad_json); }, "bad json file", "bad.json");
  const std::string bad_text = dir.file("bad.txt", "Genotype(normal=[('sep_conv_3x3', 0)");
  expect_config_error([&] { resolve_genotype(bad_text); }, "bad text file", "bad.txt");
  expect_config_error([] { resolve_genotype("{\"normal\": 3"); }, "bad inline json",
                      "invalid JSON");
  expect_config_error([] { resolve_genotype("Genotype(normal=[])"); }, "bad inline text");
}

// ---------------------------------------------------------------------------------------------
// Graphviz
// ---------------------------------------------------------------------------------------------

TEST(Genotype, DotContainsEveryEdgeAndMarksSkips) {
  const auto g = builtin_genotype("DARTS_V2");
  const std::string dot = cell_to_dot(g.normal, g.normal_concat, "normal \"cell\" \\ epoch 5");
  EXPECT_EQ(dot.rfind("digraph", 0), 0u);
  EXPECT_NE(dot.find("rankdir=LR"), std::string::npos);
  EXPECT_NE(dot.find("label=\"normal \\\"cell\\\" \\\\ epoch 5\""), std::string::npos) << dot;
  auto name = [](int i) {
    return i == 0 ? std::string("c_{k-2}") : i == 1 ? std::string("c_{k-1}") : std::to_string(i - 2);
  };
  for (size_t k = 0; k < g.normal.size(); ++k) {
    const auto& [op, in] = g.normal[k];
    const std::string edge = "\"" + name(in) + "\" -> \"" + std::to_string(k / 2) +
                             "\" [label=\"" + op + "\"";
    const auto pos = dot.find(edge);
    ASSERT_NE(pos, std::string::npos) << edge << "\n" << dot;
    const std::string line = dot.substr(pos, dot.find('\n', pos) - pos);
    EXPECT_EQ(line.find("color=red") != std::string::npos, op == "skip_connect") << line;
  }
  for (int c : g.normal_concat) {
    EXPECT_NE(dot.find("\"" + std::to_string(c - 2) + "\" -> \"c_{k}\""), std::string::npos);
  }
  EXPECT_NE(dot.find("\"c_{k}\" [fillcolor=yellow]"), std::string::npos);
}

TEST(Genotype, WriteCellDiagramWritesFilesAtomically) {
  TempDir dir;
  const auto g = builtin_genotype("NoisyDARTS_a");
  const std::string stem = (dir.path / "normal").string();
  const auto files = write_cell_diagram(g.normal, g.normal_concat, "NoisyDARTS_a normal", stem);
  ASSERT_FALSE(files.empty());
  EXPECT_EQ(files[0], stem + ".dot");
  const bool have_dot = std::system("command -v dot >/dev/null 2>&1") == 0;
  if (have_dot) {
    EXPECT_EQ(files, (std::vector<std::string>{stem + ".dot", stem + ".svg", stem + ".png"}));
    std::ifstream svg(stem + ".svg");
    std::stringstream ss;
    ss << svg.rdbuf();
    EXPECT_NE(ss.str().find("<svg"), std::string::npos);
    EXPECT_NE(ss.str().find("dil_conv_5x5"), std::string::npos);
  }
  for (const auto& f : files) EXPECT_GT(fs::file_size(f), 0u) << f;
  size_t entries = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) {
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << e.path();
    ++entries;
  }
  EXPECT_EQ(entries, files.size());
  // Unwritable destination: IoError, nothing created.
  EXPECT_THROW(write_cell_diagram(g.normal, g.normal_concat, "t",
                                  (dir.path / "no_such_dir" / "x").string()),
               IoError);
}
