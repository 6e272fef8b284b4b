#include "noisydarts/optim.h"

#include <cmath>
#include <unordered_map>

#include <ATen/Parallel.h>
#include <c10/util/string_utils.h>

#include "noisydarts/fused_ops.h"

// Compiled with -ffp-contract=off (CMakeLists.txt): a product rounded before its sum stays so,
// where LibTorch's kernels round it (the momentum's buf * m); the fused multiply-adds are
// written as std::fma.

namespace noisydarts {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ND_OPT_AVX512 __attribute__((target("avx512f,fma")))
#define ND_OPT_AVX2 __attribute__((target("avx2,fma")))
#define ND_OPT_X86 1
#endif

// A contiguous range of one parameter: the unit of both passes (parameters vary from a few
// floats to ~100k; chunks of at most kChunk floats keep the two threads' shares even).
struct Chunk {
  size_t param;
  int64_t begin, end;
};
constexpr int64_t kChunk = 16384;

struct Update {
  float coef, wd, momentum, neg_lr;
  bool clip, decay, first;  // first: the momentum buffer starts as the step's d
};

// Sum of g^2 over [0, n): 16 float partial sums (the loop vectorises into them; products and
// sums rounded apart), added in double at the end: the same value for a chunk whichever thread
// and instruction set runs it.
inline double sum_sq_lanes(const float* g, int64_t n) {
  constexpr int L = 16;
  float acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) acc[l] += g[i + l] * g[i + l];
  double s = 0;
  for (int l = 0; l < L; ++l) s += acc[l];
  for (; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
  return s;
}

// One element range of the update (LibTorch's order): g *= coef; d = g + wd p; buf = buf m + d
// (or d, the first time); p = p - lr buf.
template <bool CLIP, bool DECAY, bool MOM, bool FIRST>
inline void update_range(float* p, float* g, float* buf, int64_t n, const Update& u) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i];
    if (CLIP) gi = gi * u.coef, g[i] = gi;
    const float d = DECAY ? std::fma(p[i], u.wd, gi) : gi;
    float step = d;
    if (MOM) {
      if (FIRST) {
        buf[i] = d;
      } else {
        const float t = buf[i] * u.momentum;
        buf[i] = t + d;
      }
      step = buf[i];
    }
    p[i] = std::fma(step, u.neg_lr, p[i]);
  }
}

template <bool CLIP, bool DECAY>
inline void update_mom(float* p, float* g, float* buf, int64_t n, const Update& u) {
  if (!buf) return update_range<CLIP, DECAY, false, false>(p, g, buf, n, u);
  if (u.first) return update_range<CLIP, DECAY, true, true>(p, g, buf, n, u);
  update_range<CLIP, DECAY, true, false>(p, g, buf, n, u);
}

inline void update_any(float* p, float* g, float* buf, int64_t n, const Update& u) {
  if (u.clip) return u.decay ? update_mom<true, true>(p, g, buf, n, u) : update_mom<true, false>(p, g, buf, n, u);
  u.decay ? update_mom<false, true>(p, g, buf, n, u) : update_mom<false, false>(p, g, buf, n, u);
}

#ifdef ND_OPT_X86
ND_OPT_AVX512 double sum_sq_avx512(const float* g, int64_t n) { return sum_sq_lanes(g, n); }
ND_OPT_AVX2 double sum_sq_avx2(const float* g, int64_t n) { return sum_sq_lanes(g, n); }
ND_OPT_AVX512 void update_avx512(float* p, float* g, float* buf, int64_t n, const Update& u) { update_any(p, g, buf, n, u); }
ND_OPT_AVX2 void update_avx2(float* p, float* g, float* buf, int64_t n, const Update& u) { update_any(p, g, buf, n, u); }
#endif

double sum_sq(const float* g, int64_t n) {
#ifdef ND_OPT_X86
  if (avx512_kernels_active()) return sum_sq_avx512(g, n);
  if (avx2_kernels_active()) return sum_sq_avx2(g, n);
#endif
  return sum_sq_lanes(g, n);
}

void update(float* p, float* g, float* buf, int64_t n, const Update& u) {
#ifdef ND_OPT_X86
  if (avx512_kernels_active()) return update_avx512(p, g, buf, n, u);
  if (avx2_kernels_active()) return update_avx2(p, g, buf, n, u);
#endif
  update_any(p, g, buf, n, u);
}

bool own_path(const torch::optim::SGD& sgd, const std::vector<torch::Tensor>& params) {
  for (const auto& group : sgd.param_groups()) {
    const auto& o = static_cast<const torch::optim::SGDOptions&>(group.options());
    if (o.nesterov() || o.dampening() != 0) return false;
  }
  for (const auto& p : params) {
    const auto& g = p.grad();
    if (!g.defined()) continue;
    if (!p.device().is_cpu() || p.scalar_type() != torch::kFloat || g.scalar_type() != torch::kFloat ||
        !p.is_contiguous() || !g.is_contiguous() || g.is_sparse())
      return false;
  }
  return true;
}

}  // namespace

double clip_and_sgd_step(torch::optim::SGD& sgd, const std::vector<torch::Tensor>& params, double max_norm) {
  if (!own_path(sgd, params)) {
    const double norm = torch::nn::utils::clip_grad_norm_(params, max_norm);
    sgd.step();
    return norm;
  }
  // The parameters with a gradient, in `params`' order, and their chunks.
  std::vector<torch::Tensor> ps;
  std::vector<Chunk> chunks;
  for (const auto& p : params) {
    if (!p.grad().defined()) continue;
    const int64_t n = p.numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({ps.size(), b, std::min(n, b + kChunk)});
    ps.push_back(p);
  }
  if (ps.empty()) return 0.0;
  std::vector<double> sq(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Chunk& c = chunks[static_cast<size_t>(i)];
      sq[static_cast<size_t>(i)] = sum_sq(ps[c.param].grad().data_ptr<float>() + c.begin, c.end - c.begin);
    }
  });
  double total = 0;
  for (double s : sq) total += s;  // in chunk order
  const double norm = std::sqrt(total);
  const double raw = max_norm / (norm + 1e-6);
  const float coef = static_cast<float>(raw > 1.0 ? 1.0 : raw);  // NaN stays NaN, as torch::clamp

  // Per parameter: its group's options and its momentum buffer (made here on its first step,
  // as SGD::step makes it: the step's d).
  struct Param {
    const torch::optim::SGDOptions* o = nullptr;
    Update u{};
    float* buf = nullptr;
  };
  std::vector<Param> pp(ps.size());
  std::unordered_map<const void*, size_t> index;
  for (size_t k = 0; k < ps.size(); ++k) index.emplace(ps[k].unsafeGetTensorImpl(), k);
  for (auto& group : sgd.param_groups())
    for (const auto& gp : group.params()) {
      auto it = index.find(gp.unsafeGetTensorImpl());
      if (it != index.end()) pp[it->second].o = &static_cast<const torch::optim::SGDOptions&>(group.options());
    }
  for (const auto& q : pp)
    TORCH_CHECK(q.o, "clip_and_sgd_step: a parameter with a gradient is in none of the optimizer's groups");
  auto& state = sgd.state();
  for (size_t k = 0; k < ps.size(); ++k) {
    Param& q = pp[k];
    const auto& o = *q.o;
    q.u = Update{coef, static_cast<float>(o.weight_decay()), static_cast<float>(o.momentum()),
                 static_cast<float>(-1 * o.lr()), coef != 1.0f, o.weight_decay() != 0, false};
    if (o.momentum() == 0) continue;
    const std::string key = c10::guts::to_string(ps[k].unsafeGetTensorImpl());
    auto it = state.find(key);
    if (it == state.end()) {
      auto st = std::make_unique<torch::optim::SGDParamState>();
      st->momentum_buffer(torch::empty_like(ps[k].detach(), torch::MemoryFormat::Contiguous));
      it = state.emplace(key, std::move(st)).first;
      q.u.first = true;
    }
    auto& mb = static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
    TORCH_CHECK(mb.is_contiguous() && mb.scalar_type() == torch::kFloat && mb.numel() == ps[k].numel(),
                "clip_and_sgd_step: unexpected momentum buffer");
    q.buf = mb.data_ptr<float>();
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Chunk& c = chunks[static_cast<size_t>(i)];
      const Param& q = pp[c.param];
      const auto& p = ps[c.param];
      update(p.data_ptr<float>() + c.begin, p.grad().data_ptr<float>() + c.begin, q.buf ? q.buf + c.begin : nullptr,
             c.end - c.begin, q.u);
    }
  });
  return norm;
}

}  // namespace noisydarts
