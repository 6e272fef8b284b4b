#pragma once
/// Genotypes: the discrete cells derived from the alphas (SPEC 1.1), their JSON and DARTS text
/// forms, built-in published genotypes (SPEC 6), and Graphviz diagrams.
#include <torch/torch.h>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace noisydarts {

/// One edge of a derived cell: (op name, input node index). Node 0/1 are the cell inputs,
/// intermediate node i (0-based) is index i + 2.
using GeneEdge = std::pair<std::string, int>;

struct Genotype {
  std::vector<GeneEdge> normal;   ///< 2 edges per intermediate node, node by node
  std::vector<int> normal_concat;  ///< node indices concatenated into the cell output
  std::vector<GeneEdge> reduce;
  std::vector<int> reduce_concat;
  bool operator==(const Genotype& o) const {
    return normal == o.normal && normal_concat == o.normal_concat && reduce == o.reduce &&
           reduce_concat == o.reduce_concat;
  }
  /// Number of intermediate nodes (normal.size() / 2).
  int steps() const { return static_cast<int>(normal.size() / 2); }
};

/// Derives one cell from softmax weights [num_edges, num_ops] (edges ordered node by node,
/// node i having i + 2 incoming edges): for each node keep the 2 incoming edges whose strongest
/// non-`none` weight is largest (ties: lower input index first), and on each the strongest
/// non-`none` op (ties: first in `primitives`).
std::vector<GeneEdge> derive_cell(const torch::Tensor& weights,
                                  const std::vector<std::string>& primitives, int steps = 4);
/// Derives both cells; concat = the last `multiplier` nodes.
Genotype derive_genotype(const torch::Tensor& weights_normal, const torch::Tensor& weights_reduce,
                         const std::vector<std::string>& primitives, int steps = 4,
                         int multiplier = 4);

/// Checks op names (against all_op_names() of ops.h), input indices (edge of node i takes
/// input < i + 2), even edge count, non-empty concat within [0, steps + 2). Throws ConfigError
/// naming the offending entry.
void validate_genotype(const Genotype& g);

/// {"normal": [["sep_conv_3x3", 1], ...], "normal_concat": [2,3,4,5], "reduce": ..., "reduce_concat": ...}
nlohmann::json genotype_to_json(const Genotype& g);
/// Parses the JSON form; validates. Throws ConfigError.
Genotype genotype_from_json(const nlohmann::json& j);
/// `Genotype(normal=[('sep_conv_3x3', 1), ...], normal_concat=[2, 3, 4, 5], reduce=[...], reduce_concat=[2, 3, 4, 5])`
std::string genotype_to_text(const Genotype& g);
/// Parses the DARTS Python text form (also accepts `range(2, 6)` for concat lists, double
/// quotes, whitespace/newlines, an optional `NAME = ` prefix); validates. Throws ConfigError.
Genotype genotype_from_text(const std::string& text);

/// Built-in genotypes: DARTS_V1, DARTS_V2, NASNet, AmoebaNet, NoisyDARTS_a, NoisyDARTS_b.
std::vector<std::string> builtin_genotype_names();
/// Throws ConfigError listing the known names when `name` is unknown.
Genotype builtin_genotype(const std::string& name);
/// Resolves a user's --genotype: a built-in name, a path to a .json or text file, or inline
/// JSON/text. Throws ConfigError (unknown name / malformed) or IoError-free DataError-free:
/// a missing file is a ConfigError naming the path.
Genotype resolve_genotype(const std::string& spec);

/// Number of edges of a cell whose op is `op`.
int count_op(const std::vector<GeneEdge>& cell, const std::string& op);

/// Graphviz DOT of one cell (inputs c_{k-2}, c_{k-1}, intermediate nodes 0..n-1, output c_{k}).
std::string cell_to_dot(const std::vector<GeneEdge>& cell, const std::vector<int>& concat,
                        const std::string& title);
/// Writes `stem`.dot and, when Graphviz `dot` is on PATH, `stem`.svg and `stem`.png. Returns the
/// files written. Files are written atomically.
std::vector<std::string> write_cell_diagram(const std::vector<GeneEdge>& cell,
                                            const std::vector<int>& concat,
                                            const std::string& title, const std::string& stem);

}  // namespace noisydarts
