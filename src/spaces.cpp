#include "noisydarts/spaces.h"

#include "noisydarts/error.h"

namespace noisydarts {

const std::vector<std::string>& search_space_names() {
  static const std::vector<std::string> k{"darts", "darts-s1", "darts-s2", "darts-s3", "darts-s4", "nb201", "mbv2"};
  return k;
}

void check_search_space(const std::string& space) {
  for (const auto& s : search_space_names())
    if (s == space) return;
  std::string known;
  for (const auto& s : search_space_names()) known += (known.empty() ? "" : ", ") + s;
  throw UsageError("unknown search space '" + space + "' (--space: one of " + known + ")");
}

std::string genotype_space(const std::string& space) {
  check_search_space(space);
  return space.rfind("darts", 0) == 0 ? "darts" : space;
}

std::vector<std::string> space_primitives(const std::string& space) {
  check_search_space(space);
  if (space == "darts-s1") return {"max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "dil_conv_5x5"};
  if (space == "darts-s2") return {"skip_connect", "sep_conv_3x3"};
  if (space == "darts-s3") return {"none", "skip_connect", "sep_conv_3x3"};
  if (space == "darts-s4") return {"sep_conv_3x3", "noise"};
  if (space == "nb201") return nb201_primitives();
  if (space == "mbv2") return mbv2_choices();
  return {};
}

const EdgeOps* space_edge_ops(const std::string& space, bool reduce) {
  // RobustDARTS' S1 (automl/RobustDARTS src/spaces.py), edges in DARTS order (node 0: edges
  // 0-1, node 1: 2-4, node 2: 5-8, node 3: 9-13; inputs c_{k-2}, c_{k-1}, then the nodes).
  static const EdgeOps normal{{"skip_connect", "dil_conv_3x3"}, {"skip_connect", "dil_conv_5x5"}, {"skip_connect", "dil_conv_5x5"},
                              {"skip_connect", "sep_conv_3x3"}, {"skip_connect", "dil_conv_3x3"}, {"max_pool_3x3", "skip_connect"},
                              {"skip_connect", "sep_conv_3x3"}, {"skip_connect", "sep_conv_3x3"}, {"skip_connect", "dil_conv_3x3"},
                              {"skip_connect", "sep_conv_3x3"}, {"max_pool_3x3", "skip_connect"}, {"skip_connect", "dil_conv_3x3"},
                              {"dil_conv_3x3", "dil_conv_5x5"}, {"dil_conv_3x3", "dil_conv_5x5"}};
  static const EdgeOps reduction{{"max_pool_3x3", "avg_pool_3x3"}, {"max_pool_3x3", "dil_conv_3x3"}, {"max_pool_3x3", "avg_pool_3x3"},
                                 {"max_pool_3x3", "avg_pool_3x3"}, {"skip_connect", "dil_conv_5x5"}, {"max_pool_3x3", "avg_pool_3x3"},
                                 {"max_pool_3x3", "sep_conv_3x3"}, {"skip_connect", "dil_conv_3x3"}, {"skip_connect", "dil_conv_5x5"},
                                 {"max_pool_3x3", "avg_pool_3x3"}, {"max_pool_3x3", "avg_pool_3x3"}, {"skip_connect", "dil_conv_5x5"},
                                 {"skip_connect", "dil_conv_5x5"}, {"skip_connect", "dil_conv_5x5"}};
  check_search_space(space);
  if (space != "darts-s1") return nullptr;
  return reduce ? &reduction : &normal;
}

const std::vector<std::string>& nb201_primitives() {
  static const std::vector<std::string> k{"none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"};
  return k;
}

const std::vector<std::pair<int, int>>& nb201_edges() {
  static const std::vector<std::pair<int, int>> k{{1, 0}, {2, 0}, {2, 1}, {3, 0}, {3, 1}, {3, 2}};
  return k;
}

const std::vector<Mbv2Layer>& mbv2_layout() {
  static const std::vector<Mbv2Layer> k = [] {
    // (stage width, layers in the stage); the first layer of a stage has stride 2 except the
    // 96-wide stage, which continues at the resolution of the 80-wide one.
    const std::vector<std::tuple<int64_t, int, int64_t>> stages{{32, 2, 2}, {40, 4, 2}, {80, 4, 2}, {96, 4, 1}, {192, 4, 2}, {320, 1, 1}};
    std::vector<Mbv2Layer> v;
    int64_t c_in = 16;  // output of the fixed depthwise-separable block
    for (const auto& [width, n, first_stride] : stages) {
      for (int i = 0; i < n; ++i) {
        const int64_t s = i == 0 ? first_stride : 1;
        v.push_back({width, s, s == 1 && c_in == width});
        c_in = width;
      }
    }
    return v;
  }();
  return k;
}

const std::vector<std::string>& mbv2_choices() {
  static const std::vector<std::string> k{"ir_k3_e3", "ir_k3_e6", "ir_k5_e3", "ir_k5_e6", "ir_k7_e3", "ir_k7_e6", "skip_connect"};
  return k;
}

bool parse_mbv2_choice(const std::string& name, int64_t& kernel, int64_t& expansion) {
  if (name.size() != 8 || name.compare(0, 4, "ir_k") != 0 || name.compare(5, 2, "_e") != 0) return false;
  const char k = name[4], e = name[7];
  if ((k != '3' && k != '5' && k != '7') || (e != '3' && e != '6')) return false;
  kernel = k - '0';
  expansion = e - '0';
  return true;
}

}  // namespace noisydarts
