#include "noisydarts/noise.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include "noisydarts/error.h"
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

constexpr uint64_t kGamma = 0x9e3779b97f4a7c15ULL;  // SplitMix64's increment
constexpr float kTwo24 = 1.0f / 16777216.0f;         // 2^-24

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
inline uint64_t pair_word(uint64_t key, int64_t p) { return splitmix64(key + static_cast<uint64_t>(p) * kGamma); }
inline float word_u(uint64_t w) { return static_cast<float>(static_cast<uint32_t>(w >> 40)) * kTwo24; }
inline float word_v(uint64_t w) { return static_cast<float>(static_cast<uint32_t>((w >> 16) & 0xffffffu)) * kTwo24; }
inline void gaussian_pair(uint64_t w, float a, float b, float& z0, float& z1) {
  const float r = std::sqrt(-2.0f * log_normal_float(1.0f - word_u(w)));
  float sn, cs;
  sincos_turns(word_v(w), sn, cs);
  z0 = a + b * (r * cs);
  z1 = a + b * (r * sn);
}

// Pairs [p0, p1) into out[2p], out[2p + 1] (n values in all: an odd n's last pair gives only
// out[n - 1], its first value). IEEE float operations only, in a fixed order
// (-ffp-contract=off): every clone, vectorised or not, gives the same bits.
ND_NOISE_CLONES void draw_pairs(float* out, uint64_t key, int64_t p0, int64_t p1, int64_t n, bool gaussian, float a, float b) {
  const int64_t full = std::min(p1, n / 2);
  const float span = b - a;
  if (gaussian) {
#pragma omp simd
    for (int64_t p = p0; p < full; ++p) gaussian_pair(pair_word(key, p), a, b, out[2 * p], out[2 * p + 1]);
  } else {
#pragma omp simd
    for (int64_t p = p0; p < full; ++p) {
      const uint64_t w = pair_word(key, p);
      out[2 * p] = a + span * word_u(w);
      out[2 * p + 1] = a + span * word_v(w);
    }
  }
  if (p1 > full && (n & 1)) {
    const uint64_t w = pair_word(key, n / 2);
    float z0 = 0.f, z1 = 0.f;
    if (gaussian) gaussian_pair(w, a, b, z0, z1);
    else z0 = a + span * word_u(w);
    out[n - 1] = z0;
  }
}

// A tensor shaped like y, filled with N(a, b) (gaussian: mean a, sigma b) or U(a, b) (uniform)
// on CPU from one 64-bit draw of the default generator (the key) and counter-based draws
// (draw_pairs), in parallel: same seed, same noise, whatever the thread count or the CPU.
// (ATen's CPU sampler runs on one thread: at a search's sizes it held up the other threads for
// ~5% of an iteration; ATen's normal_ by blocks, as here before, spent 4% of it in the
// Mersenne twister and its transform.) Other devices: ATen.
torch::Tensor random_like(const torch::Tensor& y, bool gaussian, double a, double b) {
  if (!y.device().is_cpu() || !std::isfinite(a) || !std::isfinite(b)) {
    // A diverged input (sigma NaN or inf) gives NaN/inf noise, as the arithmetic says: the
    // divergence check then reports it. ATen's samplers reject such parameters.
    return gaussian ? torch::randn_like(y).mul_(b).add_(a) : torch::rand_like(y).mul_(b - a).add_(a);
  }
  auto out = torch::empty(y.sizes(), y.options().dtype(torch::kFloat).memory_format(c10::MemoryFormat::Contiguous));
  uint64_t key = 0;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    key = gen.get<at::CPUGeneratorImpl>()->random64();
  }
  float* o = out.data_ptr<float>();
  const int64_t n = out.numel(), pairs = (n + 1) / 2;
  at::parallel_for(0, pairs, int64_t{1} << 14, [&](int64_t p0, int64_t p1) {
    draw_pairs(o, key, p0, p1, n, gaussian, static_cast<float>(a), static_cast<float>(b));
  });
  return out.to(y.scalar_type());
}
}  // namespace

torch::Tensor sample_noise(const torch::Tensor& y, const NoiseOptions& opt, double decay) {
  torch::NoGradGuard no_grad;
  const auto yd = y.detach();
  double sigma = opt.lambda;
  if (opt.mixture == NoiseMixture::kAdditive && opt.scale == NoiseScale::kRelative)
    sigma = opt.lambda * yd.std().item<double>();
  torch::Tensor n;
  if (opt.type == NoiseType::kGaussian) {
    n = random_like(yd, true, opt.mean, sigma);
  } else {
    const double half = std::sqrt(3.0) * sigma;  // U(-a, a) has std a / sqrt(3)
    n = random_like(yd, false, opt.mean - half, opt.mean + half);
  }
  if (decay != 1.0) n.mul_(decay);
  return n;
}

torch::Tensor apply_noise(const torch::Tensor& y, const NoiseOptions& opt, double decay) {
  if (!opt.enabled()) return y;
  auto n = sample_noise(y, opt, decay);
  return opt.mixture == NoiseMixture::kAdditive ? y + n : y * n;
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
