#pragma once
// Tensor-list helpers shared by the tests: a detached copy of a parameter list, and bitwise
// equality of two lists.
#include <torch/torch.h>

#include <vector>

namespace noisydarts::test {

inline std::vector<torch::Tensor> snapshot(const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) out.push_back(t.detach().clone());
  return out;
}

inline bool bitwise_equal(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!torch::equal(a[i], b[i])) return false;
  return true;
}

}  // namespace noisydarts::test
