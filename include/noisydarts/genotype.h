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

/// A derived architecture of one of the genotype families of spaces.h:
/// - `darts`: the two DARTS cells (`normal`, `reduce` and their concat lists);
/// - `nb201`: the NAS-Bench-201 cell in `normal`: its 6 edges in nb201_edges() order, each
///   (op, source node) with source node 0..j-1 for target node j (`reduce` and the concat
///   lists empty);
/// - `mbv2`: the chain in `layers` (one mbv2_choices() name per mbv2_layout() layer) plus the
///   squeeze-excite ratio and activation of its inverted-bottleneck layers.
struct Genotype {
  std::string space = "darts";
  std::vector<GeneEdge> normal;   ///< 2 edges per intermediate node, node by node
  std::vector<int> normal_concat;  ///< node indices concatenated into the cell output
  std::vector<GeneEdge> reduce;
  std::vector<int> reduce_concat;
  std::vector<std::string> layers;  ///< mbv2: the choice of each searchable layer
  double se_ratio = 0;              ///< mbv2: squeeze-excite ratio (0 = no squeeze-excite)
  bool swish = false;               ///< mbv2: swish (else ReLU) in the searchable layers
  bool operator==(const Genotype& o) const {
    return space == o.space && normal == o.normal && normal_concat == o.normal_concat &&
           reduce == o.reduce && reduce_concat == o.reduce_concat && layers == o.layers &&
           se_ratio == o.se_ratio && swish == o.swish;
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
/// How decisive each kept edge of a derived cell is (same rule and order as derive_cell):
/// `op_margin` = weight of the kept op - weight of the runner-up op on that edge (`none`
/// excluded, as in the derivation); `edge_margin` = strength of the kept edge - strength of the
/// strongest dropped edge into the same node (strength: the edge's strongest non-`none` weight).
struct EdgeMargin {
  double op_margin = 0, edge_margin = 0;
};
std::vector<EdgeMargin> cell_margins(const torch::Tensor& weights, const std::vector<std::string>& primitives,
                                     int steps = 4);
/// The op margin of every row of a weight table where each row keeps its strongest entry
/// (nb201 edges, mbv2 layers, whose disallowed skips are 0): strongest - runner-up.
std::vector<double> row_margins(const torch::Tensor& weights);

/// Derives both cells; concat = the last `multiplier` nodes.
Genotype derive_genotype(const torch::Tensor& weights_normal, const torch::Tensor& weights_reduce,
                         const std::vector<std::string>& primitives, int steps = 4,
                         int multiplier = 4);

/// The NAS-Bench-201 cell of softmax weights [6, num_ops] (edges in nb201_edges() order):
/// every edge is kept with its strongest op, `none` included (the benchmark's rule; ties: first
/// in `primitives`). Returns a `nb201` genotype.
Genotype derive_nb201(const torch::Tensor& weights, const std::vector<std::string>& primitives);
/// The MobileNetV2-like chain of softmax weights [19, 7] (columns in mbv2_choices() order): on
/// each layer the strongest choice among those allowed there (skip only where the layout
/// allows it). Returns a `mbv2` genotype with the given squeeze-excite ratio and activation.
Genotype derive_mbv2(const torch::Tensor& weights, double se_ratio, bool swish);

/// The benchmark's architecture string of a `nb201` genotype:
/// `|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|`.
std::string nb201_arch_string(const Genotype& g);
/// Parses such a string (whitespace around it ignored); validates. Throws ConfigError.
Genotype nb201_from_string(const std::string& s);
/// `mbv2:ir_k3_e6,ir_k3_e3,...;se=0.25;swish` (the `se=` and `swish` parts only when set).
std::string mbv2_text(const Genotype& g);
/// Parses the mbv2_text() form; validates. Throws ConfigError.
Genotype mbv2_from_text(const std::string& s);

/// Checks op names (against all_op_names() of ops.h), input indices (edge of node i takes
/// input < i + 2), even edge count, non-empty concat within [0, steps + 2). Throws ConfigError
/// naming the offending entry. nb201: 6 edges, each source in its nb201_edges() order, ops from
/// nb201_primitives(). mbv2: one allowed choice per layer, se_ratio in [0, 1).
void validate_genotype(const Genotype& g);

/// {"normal": [["sep_conv_3x3", 1], ...], "normal_concat": [2,3,4,5], "reduce": ..., "reduce_concat": ...};
/// nb201: {"space": "nb201", "arch": "|...|"}; mbv2: {"space": "mbv2", "layers": [...],
/// "se_ratio": r, "swish": b}.
nlohmann::json genotype_to_json(const Genotype& g);
/// Parses the JSON form; validates. Throws ConfigError.
Genotype genotype_from_json(const nlohmann::json& j);
/// `Genotype(normal=[('sep_conv_3x3', 1), ...], normal_concat=[2, 3, 4, 5], reduce=[...], reduce_concat=[2, 3, 4, 5])`;
/// nb201: nb201_arch_string(); mbv2: mbv2_text().
std::string genotype_to_text(const Genotype& g);
/// Parses any of the text forms (a leading `|`: NAS-Bench-201; `mbv2:`: the chain); the DARTS Python text form (also accepts `range(2, 6)` for concat lists, double
/// quotes, whitespace/newlines, an optional `NAME = ` prefix); validates. Throws ConfigError.
Genotype genotype_from_text(const std::string& text);

/// Built-in genotypes: DARTS_V1, DARTS_V2, NASNet, AmoebaNet, NoisyDARTS_a, NoisyDARTS_b (DARTS
/// cells) and NoisyDARTS_A (the paper's ImageNet model: mbv2, squeeze-excite 0.25, swish).
std::vector<std::string> builtin_genotype_names();
/// Throws ConfigError listing the known names when `name` is unknown.
Genotype builtin_genotype(const std::string& name);
/// Resolves a user's --genotype: a built-in name, a path to a .json or text file, a search's run
/// directory (its genotype.json), or inline
/// JSON/text. Throws ConfigError (unknown name / malformed) or IoError-free DataError-free:
/// a missing file is a ConfigError naming the path.
Genotype resolve_genotype(const std::string& spec);

/// Skip connections of a genotype: both DARTS cells, the NB201 cell's edges, or mbv2 layers.
int count_skips(const Genotype& g);
/// Number of edges of a cell whose op is `op`.
int count_op(const std::vector<GeneEdge>& cell, const std::string& op);

/// Writes the diagrams of a genotype into `dir`: darts: normal.* and reduce.*; nb201: cell.*;
/// mbv2: chain.* (write_cell_diagram's formats). Returns the files written.
std::vector<std::string> write_genotype_diagrams(const Genotype& g, const std::string& dir);
/// Graphviz DOT of the NB201 cell (nodes 0..3) and of the mbv2 chain.
std::string nb201_to_dot(const Genotype& g, const std::string& title);
std::string mbv2_to_dot(const Genotype& g, const std::string& title);

/// Graphviz DOT of one cell (inputs c_{k-2}, c_{k-1}, intermediate nodes 0..n-1, output c_{k}).
std::string cell_to_dot(const std::vector<GeneEdge>& cell, const std::vector<int>& concat,
                        const std::string& title);
/// Writes `stem`.dot and, when Graphviz `dot` is on PATH, `stem`.svg and `stem`.png. Returns the
/// files written. Files are written atomically.
/// Writes `dot` to `stem`.dot and, when Graphviz `dot` is on PATH, renders `stem`.svg and
/// `stem`.png. Returns the files written. Files are written atomically.
std::vector<std::string> write_dot_files(const std::string& dot, const std::string& stem);
std::vector<std::string> write_cell_diagram(const std::vector<GeneEdge>& cell,
                                            const std::vector<int>& concat,
                                            const std::string& title, const std::string& stem);

}  // namespace noisydarts
