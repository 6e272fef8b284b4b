#pragma once
/// The search spaces (SPEC 2; docs/spaces.md): their names, op sets and fixed layouts. Tables
/// only; the networks live in search_network.h (supernets) and eval_network.h (trained nets).
///
/// - `darts`: the DARTS CNN cell space (2 cells of 14 mixed edges), op set from --primitives.
/// - `darts-s1` .. `darts-s4`: RobustDARTS' reduced spaces on the DARTS cell: S1 a published
///   pair of ops per edge (space_edge_ops), S2 {skip_connect, sep_conv_3x3}, S3 {none,
///   skip_connect, sep_conv_3x3}, S4 {sep_conv_3x3, noise}.
/// - `nb201`: the NAS-Bench-201 cell (4 nodes, 6 edges) in its 3-stage network.
/// - `mbv2`: the MobileNetV2-like chain of 19 inverted-bottleneck layers (NoisyDARTS-A).
#include <cstdint>
#include <string>
#include <vector>

namespace noisydarts {

/// Every accepted --space value.
const std::vector<std::string>& search_space_names();
/// Throws UsageError naming the known spaces when `space` is not one of them.
void check_search_space(const std::string& space);
/// The genotype family of a search space: darts (darts, darts-s1..s4), nb201, mbv2.
std::string genotype_space(const std::string& space);
/// The fixed op set of a space (darts-s1..s4, nb201, mbv2; S1: the union of its edges' pairs,
/// in DARTS order); empty for darts, whose ops come from --ops (the preset's by default).
std::vector<std::string> space_primitives(const std::string& space);
/// The candidates of every edge of a cell, for spaces whose edges differ (S1: two each; the
/// alphas keep one column per space_primitives op, the others held at weight 0).
using EdgeOps = std::vector<std::vector<std::string>>;
/// The edge op lists of the normal (`reduce` false) or reduction cell of `space`, or nullptr
/// when every edge has the whole op set.
const EdgeOps* space_edge_ops(const std::string& space, bool reduce);

// ---- NAS-Bench-201.
/// none, skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3 (the benchmark's order).
const std::vector<std::string>& nb201_primitives();
/// Edges of the NB201 cell in the benchmark's order: (target node j, source node i) for
/// j = 1..3, i = 0..j-1, i.e. 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2.
const std::vector<std::pair<int, int>>& nb201_edges();

// ---- MobileNetV2-like chain.
struct Mbv2Layer {
  int64_t out_channels;
  int64_t stride;
  bool skip_allowed;  ///< stride 1 and input channels == output channels
};
/// The 19 searchable layers (stage widths 32, 40, 80, 96, 192, 320; the first layer of a stage
/// strided), after the fixed stem (3x3 conv to 32, stride 2) and the fixed depthwise-separable
/// block to 16 channels.
const std::vector<Mbv2Layer>& mbv2_layout();
/// The candidate names of a searchable layer: ir_k3_e3, ir_k3_e6, ir_k5_e3, ir_k5_e6, ir_k7_e3,
/// ir_k7_e6, skip_connect (skip only where mbv2_layout() allows it).
const std::vector<std::string>& mbv2_choices();
/// Kernel and expansion of an `ir_k{k}_e{e}` name; false for anything else.
bool parse_mbv2_choice(const std::string& name, int64_t& kernel, int64_t& expansion);

}  // namespace noisydarts
