#include "noisydarts/noise.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include "noisydarts/error.h"
#include "noisydarts/fused_ops.h"
#include "noisydarts/ops.h"
#include "noisydarts/splitmix.h"

namespace noisydarts {

bool NoiseOptions::applies_to(const std::string& op) const {
  return enabled() && std::find(ops.begin(), ops.end(), op) != ops.end();
}

void NoiseOptions::validate() const {
  if (!(lambda >= 0.0) || !std::isfinite(lambda))
    throw UsageError("--noise-lambda must be a finite number >= 0, got " + std::to_string(lambda));
  if (!std::isfinite(mean))
    throw UsageError("--noise-mean must be finite, got " + std::to_string(mean));
  if (!(skip_drop_path >= 0.0 && skip_drop_path < 1.0))
    throw UsageError("--skip-drop-path must be in [0, 1), got " + std::to_string(skip_drop_path));
}

double noise_decay_factor(const NoiseOptions& opt, double epoch, double total_epochs) {
  if (opt.decay == NoiseDecay::kNone || total_epochs <= 0) return 1.0;
  const double e = std::clamp(epoch, 0.0, total_epochs);
  return (1.0 + std::cos(M_PI * e / total_epochs)) / 2.0;
}

namespace {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ND_NOISE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ND_NOISE_CLONES
#endif

constexpr float kTwo24 = 1.0f / 16777216.0f;  // 2^-24

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ln(x) for a normal float x > 0: Cephes' logf (x = m 2^e with m in [sqrt(1/2), sqrt(2)), a
// degree-9 polynomial in m - 1; ~1 ulp), branch-free so that the sampler's loop vectorises.
inline float log_normal_float(float x) {
  const uint32_t ix = float_bits(x);
  int32_t e = static_cast<int32_t>(ix >> 23) - 126;            // x = m 2^e, m in [0.5, 1)
  const float m = bits_float((ix & 0x007fffffu) | 0x3f000000u);
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  const float f = low ? (m + m) - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return (f + y) + fe * 0.693359375f;
}

// sin(2 pi t) and cos(2 pi t) for t in [0, 1): t reduced to the nearest quarter turn q (exactly:
// t is a multiple of 2^-24), Cephes' sinf/cosf polynomials on [-pi/4, pi/4], then quadrant q's
// swap and signs: (s, c), (c, -s), (-s, -c), (-c, s).
inline void sincos_turns(float t, float& s, float& c) {
  const int32_t q = static_cast<int32_t>(4.0f * t + 0.5f);  // 0..4
  const float x = (t - static_cast<float>(q) * 0.25f) * 6.28318530717958648f;
  const float z = x * x;
  const float sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const float cp = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const int32_t k = q & 3;
  const float s1 = (k & 1) ? cp : sp, c1 = (k & 1) ? sp : cp;
  s = (k & 2) ? -s1 : s1;
  c = ((k ^ (k >> 1)) & 1) ? -c1 : c1;
}

// Pair p of a call's counter-based draws: the SplitMix64 word w = splitmix64(key + p gamma)
// (the (p+1)-th output of SplitMix64 started at key); u = its high 24 bits / 2^24 and v = the
// next 24 / 2^24, both in [0, 1). Gaussian: Box-Muller on (1 - u, v), a + b sqrt(-2 ln(1 - u))
// (cos, sin)(2 pi v). Uniform: a + (b - a) (u, v).
inline uint64_t pair_word(uint64_t key, int64_t p) { return splitmix64(key + static_cast<uint64_t>(p) * kSplitMixGamma); }
inline float word_u(uint64_t w) { return static_cast<float>(static_cast<uint32_t>(w >> 40)) * kTwo24; }
inline float word_v(uint64_t w) { return static_cast<float>(static_cast<uint32_t>((w >> 16) & 0xffffffu)) * kTwo24; }
inline void gaussian_pair(uint64_t w, float a, float b, float& z0, float& z1) {
  const float r = std::sqrt(-2.0f * log_normal_float(1.0f - word_u(w)));
  float sn, cs;
  sincos_turns(word_v(w), sn, cs);
  z0 = a + b * (r * cs);
  z1 = a + b * (r * sn);
}

// The value of draw d (a + b z for Gaussian z, a + (b - a) u for uniform u) scaled by the decay,
// and what it becomes at element i: itself (kValue), y[i] plus it (kAdd), or that times the
// image's drop-path mask m over keep (kAddDrop: drop_path's (x m) / keep of the sum, rounded as
// the two steps round).
enum DrawMode { kValue, kAdd, kAddDrop };
template <DrawMode M>
inline float place(float d, float decay, const float* y, int64_t i, float m, float keep) {
  const float v = d * decay;
  if (M == kValue) return v;
  const float sum = y[i] + v;  // y: the element's image, offset so that y[i] is element i
  return M == kAdd ? sum : (sum * m) / keep;
}
template <bool Gauss>
inline void pair_draws(uint64_t w, float a, float b, float& d0, float& d1) {
  if (Gauss) {
    gaussian_pair(w, a, b, d0, d1);
  } else {
    d0 = a + (b - a) * word_u(w);
    d1 = a + (b - a) * word_v(w);
  }
}

// Pairs [p0, p1) into out[2p], out[2p + 1] (n values in all: an odd n's last pair gives only
// out[n - 1], its first value). IEEE float operations only, in a fixed order
// (-ffp-contract=off): every clone, vectorised or not, gives the same bits.
template <bool Gauss, DrawMode M>
ND_NOISE_CLONES void draw_pairs(float* out, const float* y, uint64_t key, int64_t p0, int64_t p1, int64_t n, float a,
                                float b, float decay, float m = 1.f, float keep = 1.f) {
  const int64_t full = std::min(p1, n / 2);
#pragma omp simd
  for (int64_t p = p0; p < full; ++p) {
    float d0, d1;
    pair_draws<Gauss>(pair_word(key, p), a, b, d0, d1);
    out[2 * p] = place<M>(d0, decay, y, 2 * p, m, keep);
    out[2 * p + 1] = place<M>(d1, decay, y, 2 * p + 1, m, keep);
  }
  if (p1 > full && (n & 1)) {
    float d0, d1;
    pair_draws<Gauss>(pair_word(key, n / 2), a, b, d0, d1);
    out[n - 1] = place<M>(d0, decay, y, n - 1, m, keep);
  }
}

// The call's key: one 64-bit draw of LibTorch's default CPU generator.
uint64_t draw_key() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get<at::CPUGeneratorImpl>()->random64();
}

// A float tensor as images of `inner` contiguous values `stride` apart (a contiguous tensor, or
// a channel slice of one: a cell's node in its output): element i is at
// base[(i / inner) * stride + i % inner].
struct Images {
  const float* base = nullptr;
  int64_t inner = 0, stride = 0;
};
bool as_images(const torch::Tensor& y, Images& im) {
  if (y.numel() == 0) return false;
  if (y.is_contiguous()) {
    im = {y.data_ptr<float>(), y.numel(), y.numel()};
    return true;
  }
  if (y.dim() < 2 || !y.select(0, 0).is_contiguous()) return false;
  im = {y.data_ptr<float>(), y.numel() / y.size(0), y.stride(0)};
  return im.inner % 2 == 0;  // whole pairs in each image
}

// out = decay * (the draws) (y null) or y + decay * (the draws) (y's images), over n floats in
// parallel chunks (counter-based: the same values at any thread count). (ATen's CPU sampler
// runs on one thread: at a search's sizes it held up the other threads for ~5% of an
// iteration; ATen's normal_ by blocks, as here until the eighth session, spent ~4% of one in
// its Mersenne twister and transform.)
// `drop` (with y): the images of y are the drop-path's images, drop[k] image k's mask (kAddDrop).
void draw(float* out, const Images* y, int64_t n, bool gaussian, float a, float b, float decay, uint64_t key,
          const float* drop = nullptr, float keep = 1.f) {
  const int64_t pairs = (n + 1) / 2;
  at::parallel_for(0, pairs, int64_t{1} << 14, [&](int64_t p0, int64_t p1) {
    if (!y) {
      if (gaussian) draw_pairs<true, kValue>(out, nullptr, key, p0, p1, n, a, b, decay);
      else draw_pairs<false, kValue>(out, nullptr, key, p0, p1, n, a, b, decay);
      return;
    }
    const int64_t half = y->inner / 2 + (y->inner == n ? n % 2 : 0);  // pairs per image
    for (int64_t q0 = p0; q0 < p1;) {
      const int64_t k = q0 / half, q1 = std::min(p1, (k + 1) * half);
      // y[i] for this image's elements i: the image's values, offset by its first index.
      const float* yk = y->base + k * (y->stride - y->inner);
      if (drop && gaussian) draw_pairs<true, kAddDrop>(out, yk, key, q0, q1, n, a, b, decay, drop[k], keep);
      else if (drop) draw_pairs<false, kAddDrop>(out, yk, key, q0, q1, n, a, b, decay, drop[k], keep);
      else if (gaussian) draw_pairs<true, kAdd>(out, yk, key, q0, q1, n, a, b, decay);
      else draw_pairs<false, kAdd>(out, yk, key, q0, q1, n, a, b, decay);
      q0 = q1;
    }
  });
}

// The unbiased standard deviation of y's values (as torch::std), summed in double: shifted by
// the first value, in fixed chunks of 2^16 per image whose partial sums are added in order (the
// same value at any thread count).
ND_NOISE_CLONES void shifted_sums(const float* y, int64_t len, float shift, double* out) {
  double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < len; ++i) {
    const double d = static_cast<double>(y[i]) - static_cast<double>(shift);
    s1 += d;
    s2 += d * d;
  }
  out[0] = s1, out[1] = s2;
}
double images_std(const Images& y, int64_t n) {
  if (n < 2) return std::numeric_limits<double>::quiet_NaN();
  const int64_t chunk = int64_t{1} << 16, per = (y.inner + chunk - 1) / chunk, images = n / y.inner;
  std::vector<double> part(static_cast<size_t>(2 * per * images));
  const float shift = y.base[0];
  at::parallel_for(0, per * images, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k = c / per, off = (c % per) * chunk;
      shifted_sums(y.base + k * y.stride + off, std::min(chunk, y.inner - off), shift, part.data() + 2 * c);
    }
  });
  double s1 = 0, s2 = 0;
  for (int64_t c = 0; c < per * images; ++c) s1 += part[2 * c], s2 += part[2 * c + 1];
  const double dn = static_cast<double>(n);
  const double var = (s2 - s1 * s1 / dn) / (dn - 1.0);
  return std::sqrt(var < 0 ? 0.0 : var);  // NaN stays NaN (a diverged input)
}

// The own loops' tensors: CPU floats.
bool cpu_float(const torch::Tensor& y) { return y.device().is_cpu() && y.scalar_type() == torch::kFloat; }

// Where the own sampler runs: CPU float tensors and finite parameters. A diverged input (sigma
// NaN or inf) takes ATen's path and gives NaN/inf noise, as the arithmetic says: the divergence
// check then reports it. Other devices: ATen's samplers.
bool own_sampler(const torch::Tensor& y, double a, double b) { return cpu_float(y) && std::isfinite(a) && std::isfinite(b); }

// Gaussian N(mean, sigma) or uniform U(mean -+ sqrt(3) sigma) (the same mean and std), sigma =
// lambda, or lambda * std(y) for additive noise of relative scale.
struct NoiseParams {
  bool gaussian;
  double a, b;
};
NoiseParams noise_params(const torch::Tensor& yd, const NoiseOptions& opt) {
  double sigma = opt.lambda;
  Images im;
  if (opt.mixture == NoiseMixture::kAdditive && opt.scale == NoiseScale::kRelative)
    sigma = opt.lambda * (cpu_float(yd) && as_images(yd, im) ? images_std(im, yd.numel()) : yd.std().item<double>());
  if (opt.type == NoiseType::kGaussian) return {true, opt.mean, sigma};
  const double half = std::sqrt(3.0) * sigma;  // U(-a, a) has std a / sqrt(3)
  return {false, opt.mean - half, opt.mean + half};
}

// apply_noise's additive form in one pass (y + n, n never stored): the gradient is the identity.
struct NoiseAddBackward : torch::autograd::Node {
  std::string name() const override { return "noisydarts::NoiseAddBackward"; }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override { return {std::move(grads[0])}; }
};

// The noise tensor for parameters p (sample_noise's body).
torch::Tensor sample_with(const torch::Tensor& yd, const NoiseParams& p, double decay) {
  if (!own_sampler(yd, p.a, p.b)) {
    auto n = p.gaussian ? torch::randn_like(yd).mul_(p.b).add_(p.a) : torch::rand_like(yd).mul_(p.b - p.a).add_(p.a);
    if (decay != 1.0) n.mul_(decay);
    return n;
  }
  auto n = torch::empty(yd.sizes(), yd.options().memory_format(c10::MemoryFormat::Contiguous));
  draw(n.data_ptr<float>(), nullptr, n.numel(), p.gaussian, static_cast<float>(p.a), static_cast<float>(p.b),
       static_cast<float>(decay), draw_key());
  return n;
}
}  // namespace

torch::Tensor sample_noise(const torch::Tensor& y, const NoiseOptions& opt, double decay) {
  torch::NoGradGuard no_grad;
  const auto yd = y.detach();
  return sample_with(yd, noise_params(yd, opt), decay);
}

torch::Tensor apply_noise(const torch::Tensor& y, const NoiseOptions& opt, double decay) {
  if (!opt.enabled()) return y;
  if (opt.mixture == NoiseMixture::kMultiplicative) return y * sample_noise(y, opt, decay);
  // One pass where the own sampler runs on y's images (a contiguous tensor or a channel slice of
  // one): the same draws and roundings as y + sample_noise(y) (test
  // Noise.AdditiveNoiseInOnePassEqualsYPlusTheSampledNoise).
  torch::Tensor out, n;
  {
    torch::NoGradGuard no_grad;
    const auto yd = y.detach();
    const NoiseParams p = noise_params(yd, opt);
    Images im;
    if (!own_sampler(yd, p.a, p.b) || !as_images(yd, im)) {
      n = sample_with(yd, p, decay);
    } else {
      out = torch::empty(yd.sizes(), yd.options().memory_format(c10::MemoryFormat::Contiguous));
      draw(out.data_ptr<float>(), &im, out.numel(), p.gaussian, static_cast<float>(p.a), static_cast<float>(p.b),
           static_cast<float>(decay), draw_key());
    }
  }
  if (n.defined()) return y + n;
  if (torch::GradMode::is_enabled() && y.requires_grad()) {
    auto node = std::shared_ptr<NoiseAddBackward>(new NoiseAddBackward(), torch::autograd::deleteNode);
    node->set_next_edges(torch::autograd::collect_next_edges(y));
    torch::autograd::set_history(out, node);
  }
  return out;
}

namespace {
// The skip connection's noise and drop-path as one node: d out / d y = mask[n] / keep.
struct NoiseDropPathBackward : torch::autograd::Node {
  torch::Tensor mask;  // [N, 1, 1, 1] of 0 and 1, no gradient
  double keep = 1.0;
  std::string name() const override { return "noisydarts::NoiseDropPathBackward"; }
  void release_variables() override { mask.reset(); }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    return {drop_path_grad(grads[0], mask, keep)};
  }
};
}  // namespace

torch::Tensor apply_noise_drop_path(const torch::Tensor& y, const NoiseOptions& opt, double decay, double drop_prob) {
  if (drop_prob <= 0.0) return apply_noise(y, opt, decay);
  auto two_steps = [&] { return drop_path(apply_noise(y, opt, decay), drop_prob); };
  if (!opt.enabled() || opt.mixture == NoiseMixture::kMultiplicative || !fused_ops_enabled() || y.dim() < 1) return two_steps();
  // The drop-path's images: y's first dimension, an even number of values each (a pair of draws
  // never spans two masks), each image contiguous.
  const int64_t per = y.numel() / std::max<int64_t>(1, y.size(0));
  const double keep = 1.0 - drop_prob;
  if (!cpu_float(y) || y.numel() == 0 || per % 2 || !y.select(0, 0).is_contiguous() || !(keep > 0.0)) return two_steps();
  torch::Tensor out, mask;
  {
    torch::NoGradGuard no_grad;
    const auto yd = y.detach();
    const NoiseParams p = noise_params(yd, opt);
    if (own_sampler(yd, p.a, p.b)) {  // else the two steps, below (outside this guard)
      const Images im{yd.data_ptr<float>(), per, yd.size(0) > 1 ? yd.stride(0) : per};
      // The same random stream as the two steps: the noise's key, then drop_path's mask.
      const uint64_t key = draw_key();
      mask = torch::empty({yd.size(0), 1, 1, 1}, yd.options()).bernoulli_(keep);
      out = torch::empty(yd.sizes(), yd.options().memory_format(c10::MemoryFormat::Contiguous));
      draw(out.data_ptr<float>(), &im, out.numel(), p.gaussian, static_cast<float>(p.a), static_cast<float>(p.b),
           static_cast<float>(decay), key, mask.data_ptr<float>(), static_cast<float>(keep));
    }
  }
  if (!out.defined()) return two_steps();  // noise parameters the own sampler does not take (not finite)
  if (torch::GradMode::is_enabled() && y.requires_grad()) {
    auto node = std::shared_ptr<NoiseDropPathBackward>(new NoiseDropPathBackward(), torch::autograd::deleteNode);
    node->mask = mask;
    node->keep = keep;
    node->set_next_edges(torch::autograd::collect_next_edges(y));
    torch::autograd::set_history(out, node);
  }
  return out;
}

std::string to_string(NoiseType t) {
  switch (t) {
    case NoiseType::kNone: return "none";
    case NoiseType::kGaussian: return "gaussian";
    case NoiseType::kUniform: return "uniform";
  }
  return "?";
}
std::string to_string(NoiseMixture m) {
  return m == NoiseMixture::kAdditive ? "additive" : "multiplicative";
}
std::string to_string(NoiseScale s) { return s == NoiseScale::kRelative ? "relative" : "absolute"; }
std::string to_string(NoiseDecay d) { return d == NoiseDecay::kNone ? "none" : "cosine"; }

NoiseType parse_noise_type(const std::string& s) {
  if (s == "gaussian") return NoiseType::kGaussian;
  if (s == "uniform") return NoiseType::kUniform;
  if (s == "none") return NoiseType::kNone;
  throw UsageError("--noise must be gaussian, uniform or none, got '" + s + "'");
}
NoiseMixture parse_noise_mixture(const std::string& s) {
  if (s == "additive") return NoiseMixture::kAdditive;
  if (s == "multiplicative") return NoiseMixture::kMultiplicative;
  throw UsageError("--noise-mixture must be additive or multiplicative, got '" + s + "'");
}
NoiseScale parse_noise_scale(const std::string& s) {
  if (s == "relative") return NoiseScale::kRelative;
  if (s == "absolute") return NoiseScale::kAbsolute;
  throw UsageError("--noise-scale must be relative or absolute, got '" + s + "'");
}
NoiseDecay parse_noise_decay(const std::string& s) {
  if (s == "none") return NoiseDecay::kNone;
  if (s == "cosine") return NoiseDecay::kCosine;
  throw UsageError("--noise-decay must be none or cosine, got '" + s + "'");
}

nlohmann::json noise_to_json(const NoiseOptions& o) {
  return {{"type", to_string(o.type)},     {"mixture", to_string(o.mixture)},
          {"scale", to_string(o.scale)},   {"lambda", o.lambda},
          {"mean", o.mean},                {"decay", to_string(o.decay)},
          {"ops", o.ops},                  {"skip_drop_path", o.skip_drop_path}};
}

NoiseOptions noise_from_json(const nlohmann::json& j) {
  NoiseOptions o;
  if (j.contains("type")) o.type = parse_noise_type(j.at("type").get<std::string>());
  if (j.contains("mixture")) o.mixture = parse_noise_mixture(j.at("mixture").get<std::string>());
  if (j.contains("scale")) o.scale = parse_noise_scale(j.at("scale").get<std::string>());
  if (j.contains("lambda")) o.lambda = j.at("lambda").get<double>();
  if (j.contains("mean")) o.mean = j.at("mean").get<double>();
  if (j.contains("decay")) o.decay = parse_noise_decay(j.at("decay").get<std::string>());
  if (j.contains("ops")) o.ops = j.at("ops").get<std::vector<std::string>>();
  if (j.contains("skip_drop_path")) o.skip_drop_path = j.at("skip_drop_path").get<double>();
  return o;
}

}  // namespace noisydarts
