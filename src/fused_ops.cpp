#include "noisydarts/fused_ops.h"

#include <array>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <dlfcn.h>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

namespace noisydarts {
using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {
std::atomic<bool> g_fused{true};
std::atomic<bool> g_avx512{true};
std::atomic<bool> g_avx2{true};
std::atomic<bool> g_blas{true};
std::atomic<bool> g_group{true};
std::atomic<bool> g_direct{true};
std::atomic<bool> g_sinks{true};
std::atomic<bool> g_mix_fold{true};

// ---- Gradient sinks -------------------------------------------------------------------------
// A cell state feeds up to 4 edges, and on each edge up to 6 fused nodes (the depthwise chains
// and the pools) take it as input: autograd would sum their input gradients out of place, one
// full pass and one new tensor per term. A state wrapped by GradSinkScope::wrap has a sink
// instead: each fused node adds its input gradient into the sink's one buffer, plane by plane
// while the plane is in cache (the first one writes it), and returns none; SinkFn's backward,
// which autograd runs only after all of them, hands the buffer on (plus, in place, whatever
// gradient reached the state the usual way: the skip connections', ATen's).
struct GradSink : torch::CustomClassHolder {
  Tensor acc;
  // The buffer for an input of `like`'s shape (contiguous); `add`: it already holds terms.
  float* target(const Tensor& like, bool& add) {
    add = acc.defined();
    if (!add) acc = torch::empty(like.sizes(), like.options().memory_format(c10::MemoryFormat::Contiguous));
    TORCH_CHECK(acc.sizes() == like.sizes(), "gradient sink: a term of shape ", like.sizes(), " for a buffer of ", acc.sizes());
    return acc.data_ptr<float>();
  }
};
using SinkPtr = c10::intrusive_ptr<GradSink>;
// The wrapped tensors of the innermost live GradSinkScope on this thread.
struct SinkTable {
  std::vector<std::pair<const c10::TensorImpl*, SinkPtr>> entries;
  SinkTable* outer = nullptr;
};
thread_local SinkTable* t_sinks = nullptr;

// x's sink when x is a wrapped state of the live scope (the fused node then saves it).
SinkPtr sink_of(const Tensor& x) {
  if (!t_sinks || !x.requires_grad()) return {};
  for (const auto& e : t_sinks->entries)
    if (e.first == x.unsafeGetTensorImpl()) return e.second;
  return {};
}
void save_sink(AutogradContext* ctx, const Tensor& x) {
  if (auto s = sink_of(x)) ctx->saved_data["sink"] = c10::IValue::make_capsule(std::move(s));
}
// The saved sink, when the input gradient is wanted, computed by the own kernels and may go to it.
SinkPtr saved_sink(AutogradContext* ctx) {
  auto it = ctx->saved_data.find("sink");
  if (it == ctx->saved_data.end() || torch::GradMode::is_enabled() || !ctx->needs_input_grad(0)) return {};
  return c10::static_intrusive_pointer_cast<GradSink>(it->second.toCapsule());
}

// ---------------------------------------------------------------------------------------------
// CPU kernels (float, NCHW contiguous). Each image plane (n, c) is independent. It is copied into
// a zero-padded scratch buffer split into stride x stride phase sub-planes (rows and columns by
// their residue mod stride), each `wq` columns wide. In that layout the output, kept `wq` wide
// too (the extra columns are discarded), is for every kernel tap one contiguous multiply-add of
// the whole plane at a fixed offset: long vectorisable loops even for 7x7 or 14x14 images. The
// input gradient is the same scatter in reverse, the weight gradient one dot product per tap.
// Planes run in parallel; per-plane weight-gradient partials are summed over the batch in a
// fixed order afterwards, so results do not depend on the thread count.
// ---------------------------------------------------------------------------------------------
struct Geom {
  int64_t h = 0, w = 0, oh = 0, ow = 0, k = 0, s = 1, p = 0, d = 1;
  int64_t hq = 0, wq = 0, sub = 0, len = 0, buf = 0;  // phase rows/columns, phase size, output length, buffer size
  int64_t offset(int64_t kh, int64_t kw) const {
    const int64_t a = kh * d, b = kw * d;
    return ((a % s) * s + b % s) * sub + (a / s) * wq + b / s;
  }
  int64_t at(int64_t row, int64_t col) const {  // padded coordinates
    return ((row % s) * s + col % s) * sub + (row / s) * wq + col / s;
  }
  // Buffer offsets of input row ih / column iw (padding added), tabulated: no divisions in
  // the per-pixel loops of strided planes; and of each kernel tap (kh * k + kw).
  std::vector<int64_t> row_at, col_at, tap;
  // The direct form of a same-padded stride-1 plane (add_direct): per tap, the input's offset
  // from the output's flat index, and per tap and 16-output block the lanes whose input lies
  // inside the plane (blocks rounded up to a multiple of 8, the extra ones all zero).
  int64_t nb = 0;
  std::vector<int64_t> dtap;
  std::vector<uint16_t> dmask;
};

bool direct_wanted();  // the direct form's kernels run (below)

// Tabulates the direct form where it applies (stride 1, output of the input's size) and its
// kernels run: each output reads the unpadded input at its own flat index plus a tap offset,
// the lanes whose tap falls outside the plane masked off, so the plane needs no padded copy and
// no row compaction.
void add_direct(Geom& g) {
  if (g.s != 1 || g.oh != g.h || g.ow != g.w || !direct_wanted()) return;
  const int64_t hw = g.h * g.w, kk = g.k * g.k;
  g.nb = ((hw + 15) / 16 + 7) / 8 * 8;
  g.dmask.assign(static_cast<size_t>(kk * g.nb), 0);
  for (int64_t kh = 0; kh < g.k; ++kh)
    for (int64_t kw = 0; kw < g.k; ++kw) {
      const int64_t t = kh * g.k + kw, dh = kh * g.d - g.p, dw = kw * g.d - g.p;
      g.dtap.push_back(dh * g.w + dw);
      for (int64_t oh = 0; oh < g.h; ++oh) {
        if (oh + dh < 0 || oh + dh >= g.h) continue;
        for (int64_t ow = 0; ow < g.w; ++ow) {
          if (ow + dw < 0 || ow + dw >= g.w) continue;
          const int64_t i = oh * g.w + ow;
          g.dmask[static_cast<size_t>(t * g.nb + i / 16)] |= static_cast<uint16_t>(1u << (i % 16));
        }
      }
    }
}

Geom build_geom(int64_t h, int64_t w, int64_t k, int64_t s, int64_t p, int64_t d) {
  Geom g{h, w, 0, 0, k, s, p, d, 0, 0, 0, 0, 0, {}, {}, {}, 0, {}, {}};
  g.oh = (h + 2 * p - d * (k - 1) - 1) / s + 1;
  g.ow = (w + 2 * p - d * (k - 1) - 1) / s + 1;
  g.hq = (h + 2 * p + s - 1) / s;
  g.wq = (w + 2 * p + s - 1) / s;
  g.sub = g.hq * g.wq;
  g.len = g.oh * g.wq;
  // The discarded columns of the last rows read past the last phase: slack.
  g.buf = s * s * g.sub + (k - 1) * d + g.wq + 16;
  for (int64_t ih = 0; ih < h; ++ih) g.row_at.push_back(g.at(ih + p, 0) - g.at(0, 0));
  for (int64_t iw = 0; iw < w; ++iw) g.col_at.push_back(g.at(0, iw + p));
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t kw = 0; kw < k; ++kw) g.tap.push_back(g.offset(kh, kw));
  add_direct(g);
  return g;
}

// The geometry of a plane shape, tabulated once per process (and per state of the direct
// form's switches): building it walks every tap over the plane, about 10-40 us of serial work
// per call that the other threads waited for, twice per chain and pass in a search step.
// Entries are never removed, so the references stay valid.
const Geom& make_geom(int64_t h, int64_t w, int64_t k, int64_t s, int64_t p, int64_t d) {
  static std::mutex mu;
  static std::map<std::array<int64_t, 7>, std::unique_ptr<const Geom>> cache;
  const std::array<int64_t, 7> key{h, w, k, s, p, d, direct_wanted() ? 1 : 0};
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<const Geom>(build_geom(h, w, k, s, p, d));
  return *slot;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ND_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define ND_AVX512 1
#else
#define ND_CLONES
#endif

// Planes are short rows (28, 14 or 7 floats): compiled loops handle their tails one float at a
// time. On AVX-512 machines the row copies of the phase layout use masked 16-float loads and
// stores instead (a whole 7- or 14-float row in one instruction); elsewhere the loops below.
#ifdef ND_AVX512
bool use_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes && g_avx512;
}
#define ND_AVX512_FN __attribute__((target("avx512f")))

// The AVX2 + FMA forms of the kernels that have one, where the AVX-512 forms do not run.
bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes && g_avx2 && !use_avx512();
}
#define ND_AVX2_FN __attribute__((target("avx2,fma")))

// The lanes [0, n) of an 8-float register, as a maskload/maskstore mask.
ND_AVX2_FN inline __m256i lanes8(int64_t n) {
  const int32_t k = static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(8, n)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// x[0, min(n, 8)), the other lanes 0 (nothing read past n).
ND_AVX2_FN inline __m256 load8(const float* x, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(x) : _mm256_maskload_ps(x, lanes8(n));
}

// y[0, min(n, 8)) = v. A plain store for a whole register; AMD's vmaskmovps store is
// microcoded (Zen 3: tens of micro-ops; it made the first AVX2 row copies slower than the
// compiled loops), so a partial one is 4-, 2- and 1-float stores.
ND_AVX2_FN inline void store8(float* y, __m256 v, int64_t n) {
  if (n >= 8) return _mm256_storeu_ps(y, v);
  __m128 q = _mm256_castps256_ps128(v);
  if (n >= 4) _mm_storeu_ps(y, q), q = _mm256_extractf128_ps(v, 1), y += 4, n -= 4;
  if (n >= 2) _mm_storel_pi(reinterpret_cast<__m64*>(y), q), q = _mm_movehl_ps(q, q), y += 2, n -= 2;
  if (n >= 1) _mm_store_ss(y, q);
}

// y[0, min(n, 8)) = v, or 0 where mk (when given) is not > 0.
ND_AVX2_FN inline void store_kept8(float* y, const float* mk, int64_t n, __m256 v) {
  if (mk) v = _mm256_and_ps(_mm256_cmp_ps(load8(mk, n), _mm256_setzero_ps(), _CMP_GT_OQ), v);
  store8(y, v, n);
}

constexpr __mmask16 all = 0xFFFF;

ND_AVX512_FN inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? all : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

// The 16 lanes summed in a fixed order.
ND_AVX512_FN inline float hsum(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  float a = 0.f;
  for (float f : t) a += f;
  return a;
}

// dst[0, n) = relu?(src[0, n)) ("v > 0 ? v : 0": max(v, 0) returns 0 for NaN and -0 as well).
ND_AVX512_FN inline void row_copy(float* dst, const float* src, int64_t n, bool relu) {
  const __m512 z = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    __m512 v = _mm512_maskz_loadu_ps(m, src + j);
    if (relu) v = _mm512_maskz_max_ps(all, v, z);
    _mm512_mask_storeu_ps(dst + j, m, v);
  }
}

// dst[0, n) = src[0, min(n, have)) followed by zeros.
ND_AVX512_FN inline void row_copy_pad(float* dst, const float* src, int64_t have, int64_t n) {
  for (int64_t j = 0; j < n; j += 16)
    _mm512_mask_storeu_ps(dst + j, lanes(n - j), _mm512_maskz_loadu_ps(lanes(have - j), src + j));
}

// y = (mk > 0 ? v : 0) on the lanes m (y = v without mk).
ND_AVX512_FN inline void store_kept(float* y, const float* mk, __mmask16 m, __m512 v) {
  if (mk) v = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, mk), _mm512_setzero_ps(), _CMP_GT_OQ), v);
  _mm512_mask_storeu_ps(y, m, v);
}

// dst[0, n) = (mask[j] > 0 ? src[j] : 0), or src when mask is null.
ND_AVX512_FN inline void row_copy_masked(float* dst, const float* src, const float* mask, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    store_kept(dst + j, mask ? mask + j : nullptr, m, _mm512_maskz_loadu_ps(m, src + j));
  }
}

// Row of n floats -> its even columns (to `even`) and odd columns (to `odd`), relu?.
ND_AVX512_FN inline void row_split2(float* even, float* odd, const float* src, int64_t n, bool relu) {
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512 z = _mm512_setzero_ps();
  const int64_t ne = (n + 1) / 2, no = n / 2;
  for (int64_t j = 0; 2 * j < n; j += 16) {
    __m512 lo = _mm512_maskz_loadu_ps(lanes(n - 2 * j), src + 2 * j);
    __m512 hi = _mm512_maskz_loadu_ps(lanes(n - 2 * j - 16), src + 2 * j + 16);
    if (relu) lo = _mm512_maskz_max_ps(all, lo, z), hi = _mm512_maskz_max_ps(all, hi, z);
    _mm512_mask_storeu_ps(even + j, lanes(ne - j), _mm512_permutex2var_ps(lo, ie, hi));
    _mm512_mask_storeu_ps(odd + j, lanes(no - j), _mm512_permutex2var_ps(lo, io, hi));
  }
}

// The reverse: dst[2j] = even[j], dst[2j + 1] = odd[j], for 2j(+1) < n, times (mask > 0) when given.
ND_AVX512_FN inline void row_join2(float* dst, const float* even, const float* odd, const float* mask, int64_t n) {
  const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const int64_t ne = (n + 1) / 2, no = n / 2;
  for (int64_t j = 0; 2 * j < n; j += 16) {
    const __m512 e = _mm512_maskz_loadu_ps(lanes(ne - j), even + j);
    const __m512 o = _mm512_maskz_loadu_ps(lanes(no - j), odd + j);
    store_kept(dst + 2 * j, mask ? mask + 2 * j : nullptr, lanes(n - 2 * j), _mm512_permutex2var_ps(e, il, o));
    store_kept(dst + 2 * j + 16, mask ? mask + 2 * j + 16 : nullptr, lanes(n - 2 * j - 16), _mm512_permutex2var_ps(e, ih, o));
  }
}
#endif

#ifdef ND_AVX512
ND_AVX512_FN void fill_phases_avx512(const float* x, float* buf, const Geom& g, bool relu, float pad) {
  const __m512 pv = _mm512_set1_ps(pad);
  for (int64_t i = 0; i < g.buf; i += 16) _mm512_mask_storeu_ps(buf + i, lanes(g.buf - i), pv);
  for (int64_t ih = 0; ih < g.h; ++ih) {
    if (g.s == 1) {
      row_copy(buf + g.at(ih + g.p, g.p), x + ih * g.w, g.w, relu);
    } else {
      float* dst = buf + g.row_at[ih];
      row_split2(dst + g.col_at[0], dst + g.col_at[1], x + ih * g.w, g.w, relu);
    }
  }
}
#endif

// x plane (h x w) -> phase buffer padded with `pad`, relu applied when asked.
ND_CLONES void fill_phases(const float* x, float* buf, const Geom& g, bool relu, float pad = 0.f) {
#ifdef ND_AVX512
  if (use_avx512() && (g.s == 1 || (g.s == 2 && g.w >= 2))) return fill_phases_avx512(x, buf, g, relu, pad);
#endif
  for (int64_t i = 0; i < g.buf; ++i) buf[i] = pad;
  for (int64_t ih = 0; ih < g.h; ++ih) {
    const float* src = x + ih * g.w;
    if (g.s == 1) {
      float* dst = buf + g.at(ih + g.p, g.p);
#pragma omp simd
      for (int64_t iw = 0; iw < g.w; ++iw) dst[iw] = relu ? (src[iw] > 0.f ? src[iw] : 0.f) : src[iw];
      continue;
    }
    float* dst = buf + g.row_at[ih];
    if (g.s == 2) {  // two contiguous runs, one per column phase
      for (int64_t iw0 = 0; iw0 < 2 && iw0 < g.w; ++iw0) {
        float* d = dst + g.col_at[iw0];
        const float* sr = src + iw0;
        const int64_t cnt = (g.w - iw0 + 1) / 2;
#pragma omp simd
        for (int64_t j = 0; j < cnt; ++j) d[j] = relu ? (sr[2 * j] > 0.f ? sr[2 * j] : 0.f) : sr[2 * j];
      }
      continue;
    }
    const int64_t* col = g.col_at.data();
    for (int64_t iw = 0; iw < g.w; ++iw) {
      const float v = src[iw];
      dst[col[iw]] = relu ? (v > 0.f ? v : 0.f) : v;
    }
  }
}

// `wq`-wide output rows -> the output plane (the extra columns dropped), times (mask > 0) when
// a mask plane (of the output's shape) is given.
ND_CLONES void compact_rows(const float* ext, float* out, const Geom& g, const float* mask = nullptr) {
#ifdef ND_AVX512
  if (use_avx512()) {
    for (int64_t oh = 0; oh < g.oh; ++oh)
      row_copy_masked(out + oh * g.ow, ext + oh * g.wq, mask ? mask + oh * g.ow : nullptr, g.ow);
    return;
  }
#endif
  // One vectorisable loop per row (the per-element test of `mask` kept this a scalar loop: 15%
  // of the C 16 training step on an AVX2 CPU).
  for (int64_t oh = 0; oh < g.oh; ++oh) {
    const float* src = ext + oh * g.wq;
    float* dst = out + oh * g.ow;
    if (!mask) {
      std::memcpy(dst, src, static_cast<size_t>(g.ow) * sizeof(float));
      continue;
    }
    const float* m = mask + oh * g.ow;
#pragma omp simd
    for (int64_t ow = 0; ow < g.ow; ++ow) dst[ow] = m[ow] > 0.f ? src[ow] : 0.f;
  }
}

// Outputs in blocks of kBlock floats (one AVX-512 register) held across all the taps: one load
// and one multiply-add per tap, no store until the block is done. (Wider blocks spill.)
constexpr int64_t kBlock = 16;
constexpr int64_t kMaxTaps = 64;  // kernels up to 8x8 use the own kernel, larger ones ATen

#ifdef ND_AVX512
// dw_forward_plane's taps on AVX-512: 64 outputs (four registers) per pass over the taps, so
// the four multiply-add chains overlap; masked at the end of the plane.
ND_AVX512_FN void dw_taps_avx512(const float* buf, const float* wt, const int64_t* offs, int64_t kk, float* ext,
                                 int64_t len) {
  const __m512 z = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < len; i0 += 64) {
    const __mmask16 m0 = lanes(len - i0), m1 = lanes(len - i0 - 16), m2 = lanes(len - i0 - 32), m3 = lanes(len - i0 - 48);
    __m512 a0 = z, a1 = z, a2 = z, a3 = z;
    for (int64_t t = 0; t < kk; ++t) {
      const float* src = buf + offs[t] + i0;
      const __m512 wv = _mm512_set1_ps(wt[t]);
      a0 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m0, src), a0);
      a1 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m1, src + 16), a1);
      a2 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m2, src + 32), a2);
      a3 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m3, src + 48), a3);
    }
    _mm512_mask_storeu_ps(ext + i0, m0, a0);
    _mm512_mask_storeu_ps(ext + i0 + 16, m1, a1);
    _mm512_mask_storeu_ps(ext + i0 + 32, m2, a2);
    _mm512_mask_storeu_ps(ext + i0 + 48, m3, a3);
  }
}

// The same on AVX2 + FMA: 64 outputs in eight registers per pass over the taps (the portable
// loop's one 16-float block is two multiply-add chains, bound by their latency).
ND_AVX2_FN void dw_taps_avx2(const float* buf, const float* wt, const int64_t* offs, int64_t kk, float* ext,
                             int64_t len) {
  int64_t i0 = 0;
  for (; i0 + 64 <= len; i0 += 64) {
    __m256 a[8];
    for (auto& r : a) r = _mm256_setzero_ps();
    for (int64_t t = 0; t < kk; ++t) {
      const float* src = buf + offs[t] + i0;
      const __m256 wv = _mm256_broadcast_ss(wt + t);
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) a[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(src + 8 * q), a[q]);
    }
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) _mm256_storeu_ps(ext + i0 + 8 * q, a[q]);
  }
  if (i0 == len) return;
  __m256i m[8];
  __m256 a[8];
  for (int q = 0; q < 8; ++q) m[q] = lanes8(len - i0 - 8 * q), a[q] = _mm256_setzero_ps();
  for (int64_t t = 0; t < kk; ++t) {
    const float* src = buf + offs[t] + i0;
    const __m256 wv = _mm256_broadcast_ss(wt + t);
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) a[q] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(src + 8 * q, m[q]), a[q]);
  }
  for (int q = 0; q < 8; ++q) store8(ext + i0 + 8 * q, a[q], len - i0 - 8 * q);
}
#endif

ND_CLONES void dw_forward_plane(const float* buf, const float* wt, float* ext, float* out, const Geom& g,
                                const float* mask = nullptr) {
  const int64_t kk = g.k * g.k;  // <= kMaxTaps (checked by the callers)
  const int64_t* offs = g.tap.data();
#ifdef ND_AVX512
  if (use_avx512()) {
    dw_taps_avx512(buf, wt, offs, kk, ext, g.len);
    return compact_rows(ext, out, g, mask);
  }
  if (use_avx2()) {
    dw_taps_avx2(buf, wt, offs, kk, ext, g.len);
    return compact_rows(ext, out, g, mask);
  }
#endif
  int64_t i0 = 0;
  for (; i0 + kBlock <= g.len; i0 += kBlock) {
    float acc[kBlock] = {};
    for (int64_t t = 0; t < kk; ++t) {
      const float* src = buf + offs[t] + i0;
      const float wv = wt[t];
#pragma omp simd
      for (int64_t v = 0; v < kBlock; ++v) acc[v] += wv * src[v];
    }
    for (int64_t v = 0; v < kBlock; ++v) ext[i0 + v] = acc[v];
  }
  for (int64_t i = i0; i < g.len; ++i) {
    float a = 0.f;
    for (int64_t t = 0; t < kk; ++t) a += wt[t] * buf[offs[t] + i];
    ext[i] = a;
  }
  compact_rows(ext, out, g, mask);
}

// Whether the direct-form planes of `g` run in row blocks (dw_rows_avx512,
// dw_grad_weight_rows_avx512): rows of 12-16 or 24-32 outputs (one or two vectors, mostly full;
// narrower planes pack several rows per vector in the flat blocks), same padding, and a kernel
// shape of the spaces (3x3 or 5x5, dilation 1 or 2). Those planes take relu(x) straight from x.
bool rows_form(const Geom& g) {
  const bool shape = (g.k == 3 || g.k == 5) && (g.d == 1 || g.d == 2) && g.p == (g.k / 2) * g.d;
  return shape && ((g.w >= 24 && g.w <= 32) || (g.w >= 12 && g.w <= 16)) && !g.dmask.empty();
}

#ifdef ND_AVX512
// The per-tap-column lanes of the row-block forms (dw_rows_avx512, dw_grad_weight_rows_avx512):
// hm[kw][c], the lanes of row vector c that are outputs (column < w) and whose input column
// (shifted by tap column kw) lies inside the plane; sm[c], the lanes that are outputs.
template <int V, int K, int D>
ND_AVX512_FN void row_lanes(int64_t w, __mmask16 (&hm)[K][V], __mmask16 (&sm)[V]) {
  constexpr int P = (K / 2) * D;
  for (int c = 0; c < V; ++c) sm[c] = lanes(w - 16 * c);
  for (int kw = 0; kw < K; ++kw)
    for (int c = 0; c < V; ++c) {
      uint32_t m = 0;
      for (int l = 0; l < 16; ++l) {
        const int64_t col = c * 16 + l + kw * D - P;
        if (c * 16 + l < w && col >= 0 && col < w) m |= 1u << l;
      }
      hm[kw][c] = static_cast<__mmask16>(m);
    }
}

// The direct form in row blocks, for planes whose rows are one or two vectors wide (w <= 16 V):
// the outputs of R consecutive rows are held in R V registers, and every input row the block
// reads is loaded once per tap column and multiplied into each of the block's rows it feeds (up
// to K), instead of once per tap and output: about a third of the loads for 3 x 3 taps. Each
// output still receives its taps in tap order (input rows ascending = kh ascending, kw
// ascending within a row) from zero, with the same masked zeros as the flat blocks
// (dw_direct_avx512, below): the same values bit for bit. Measured alone on AMD Zen 4 (one
// thread, 64 planes): 1.2-1.6x the flat blocks' rate at 32x32, 28x28, 16x16 and 14x14 for the
// spaces' four kernels (3x3 and 5x5, dilation 1 and 2), slower at 7x7 (which keeps the flat
// blocks).
template <int V, int R, int K, int D, bool RELU>
ND_AVX512_FN void dw_rows_avx512(const float* x, const float* wt, float* out, const Geom& g, const float* mask) {
  constexpr int P = (K / 2) * D, span = R + (K - 1) * D;
  const int64_t w = g.w;
  const __m512 z = _mm512_setzero_ps();
  __mmask16 hm[K][V], sm[V];
  row_lanes<V, K, D>(w, hm, sm);
  for (int64_t r0 = 0; r0 < g.h; r0 += R) {
    __m512 a[R][V];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < V; ++c) a[r][c] = z;
    // Input row s of the block (row r0 + s - P) feeds its output row r through tap row
    // (s - r) / D: all compile-time, the loops unrolled.
#pragma GCC unroll 32
    for (int s = 0; s < span; ++s) {
      const int64_t ir = r0 + s - P;
      const bool inside = ir >= 0 && ir < g.h;
#pragma GCC unroll 5
      for (int kw = 0; kw < K; ++kw) {
        __m512 xv[V];
        const float* src = x + ir * w + kw * D - P;  // masked lanes are never read
#pragma GCC unroll 4
        for (int c = 0; c < V; ++c) {
          xv[c] = inside ? _mm512_maskz_loadu_ps(hm[kw][c], src + c * 16) : z;
          if (RELU) xv[c] = _mm512_maskz_max_ps(all, xv[c], z);  // NaN and -0 -> 0, as relu_plane
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const int dk = s - r;
          if (dk < 0 || dk % D != 0 || dk / D >= K) continue;
          const __m512 wv = _mm512_set1_ps(wt[(dk / D) * K + kw]);
#pragma GCC unroll 4
          for (int c = 0; c < V; ++c) a[r][c] = _mm512_fmadd_ps(wv, xv[c], a[r][c]);
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      if (r0 + r >= g.h) break;  // the last block's rows past the plane: computed, not stored
#pragma GCC unroll 4
      for (int c = 0; c < V; ++c) {
        const int64_t at = (r0 + r) * w + c * 16;
        store_kept(out + at, mask ? mask + at : nullptr, sm[c], a[r][c]);
      }
    }
  }
}

template <int V, int R, bool RELU>
ND_AVX512_FN void dw_rows_shape(const float* x, const float* wt, float* out, const Geom& g, const float* mask) {
  if (g.k == 3 && g.d == 1) return dw_rows_avx512<V, R, 3, 1, RELU>(x, wt, out, g, mask);
  if (g.k == 5 && g.d == 1) return dw_rows_avx512<V, R, 5, 1, RELU>(x, wt, out, g, mask);
  if (g.k == 3 && g.d == 2) return dw_rows_avx512<V, R, 3, 2, RELU>(x, wt, out, g, mask);
  return dw_rows_avx512<V, R, 5, 2, RELU>(x, wt, out, g, mask);
}

// dw_rows_avx512 for a plane of rows_form(g), of relu(x) when `relu`.
template <bool RELU>
ND_AVX512_FN void dw_rows(const float* x, const float* wt, float* out, const Geom& g, const float* mask) {
  if (g.w > 16) return dw_rows_shape<2, 8, RELU>(x, wt, out, g, mask);
  if (g.h % 16 == 0) return dw_rows_shape<1, 16, RELU>(x, wt, out, g, mask);
  dw_rows_shape<1, 8, RELU>(x, wt, out, g, mask);
}

// The direct form of dw_forward_plane (add_direct): 64 outputs (four registers) per pass over
// the taps, each tap a masked load of the unpadded plane and a multiply-add, in tap order from
// zero as in the phase layout, whose padding zeros the masked-off lanes reproduce: the same
// values bit for bit.
ND_AVX512_FN void dw_direct_avx512(const float* x, const float* wt, float* out, const Geom& g, const float* mask) {
  if (rows_form(g)) return dw_rows<false>(x, wt, out, g, mask);
  const int64_t hw = g.h * g.w, kk = g.k * g.k;
  const __m512 z = _mm512_setzero_ps();
  const uint16_t* mt = g.dmask.data();
  const int64_t* offs = g.dtap.data();
  for (int64_t b0 = 0; b0 * 16 < hw; b0 += 4) {
    const int64_t i0 = b0 * 16;
    __m512 a0 = z, a1 = z, a2 = z, a3 = z;
    for (int64_t t = 0; t < kk; ++t) {
      const uint16_t* mk = mt + t * g.nb + b0;
      // Lanes outside the plane are masked: their addresses are never read.
      const float* src = reinterpret_cast<const float*>(reinterpret_cast<intptr_t>(x) +
                                                        static_cast<intptr_t>((i0 + offs[t]) * 4));
      const __m512 wv = _mm512_set1_ps(wt[t]);
      a0 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk[0], src), a0);
      a1 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk[1], src + 16), a1);
      a2 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk[2], src + 32), a2);
      a3 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk[3], src + 48), a3);
    }
    const float* mp = mask ? mask + i0 : nullptr;
    store_kept(out + i0, mp, lanes(hw - i0), a0);
    store_kept(out + i0 + 16, mp ? mp + 16 : nullptr, lanes(hw - i0 - 16), a1);
    store_kept(out + i0 + 32, mp ? mp + 32 : nullptr, lanes(hw - i0 - 32), a2);
    store_kept(out + i0 + 48, mp ? mp + 48 : nullptr, lanes(hw - i0 - 48), a3);
  }
}
#endif

#ifdef ND_AVX512
// One pass of dw_grad_weight_rows_avx512: the taps of columns KW0 .. KW0 + NKW - 1, every tap
// row, K NKW V accumulators over the plane's output rows.
template <int V, int K, int D, int KW0, int NKW, bool RELU>
ND_AVX512_FN inline void dw_grad_weight_rows_pass(const float* x, const float* go, float* part, int64_t h, int64_t w,
                                                  const __mmask16 (&hm)[K][V], const __mmask16 (&sm)[V]) {
  constexpr int P = (K / 2) * D;
  const __m512 z = _mm512_setzero_ps();
  __m512 a[K][NKW][V];
#pragma GCC unroll 5
  for (int kh = 0; kh < K; ++kh)
#pragma GCC unroll 5
    for (int q = 0; q < NKW; ++q)
#pragma GCC unroll 2
      for (int c = 0; c < V; ++c) a[kh][q][c] = z;
  for (int64_t oh = 0; oh < h; ++oh) {
    __m512 gv[V];
#pragma GCC unroll 2
    for (int c = 0; c < V; ++c) gv[c] = _mm512_maskz_loadu_ps(sm[c], go + oh * w + c * 16);
#pragma GCC unroll 5
    for (int kh = 0; kh < K; ++kh) {
      const int64_t ir = oh + kh * D - P;
      if (ir < 0 || ir >= h) continue;
#pragma GCC unroll 5
      for (int q = 0; q < NKW; ++q) {
        const float* src = x + ir * w + (KW0 + q) * D - P;  // masked lanes are never read
#pragma GCC unroll 2
        for (int c = 0; c < V; ++c) {
          __m512 xv = _mm512_maskz_loadu_ps(hm[KW0 + q][c], src + c * 16);
          if (RELU) xv = _mm512_maskz_max_ps(all, xv, z);  // NaN and -0 -> 0, as relu_plane
          a[kh][q][c] = _mm512_fmadd_ps(gv[c], xv, a[kh][q][c]);
        }
      }
    }
  }
#pragma GCC unroll 5
  for (int kh = 0; kh < K; ++kh)
#pragma GCC unroll 5
    for (int q = 0; q < NKW; ++q) {
      __m512 sum = a[kh][q][0];
      for (int c = 1; c < V; ++c) sum = _mm512_add_ps(sum, a[kh][q][c]);
      part[kh * K + KW0 + q] = hsum(sum);
    }
}

// The depthwise weight gradient in row blocks (the planes of dw_rows_avx512): each output row's
// gradient loaded once (V registers) and multiplied with the input rows of every tap, the taps'
// partial sums held in registers across the plane (all taps at once for 3 x 3 and for one-vector
// rows, three passes over the tap columns for 5 x 5 on two-vector rows), summed in a fixed order
// at the end: no per-tap mask loads and a third of the flat form's gradient loads. Equal to the
// flat form to float rounding (another grouping of the same sums). Measured alone on AMD Zen 4
// (one thread, 64 planes): 1.5-1.9x the flat form's rate at 32x32, 28x28, 16x16 and 14x14.
template <int V, int K, int D, bool RELU>
ND_AVX512_FN void dw_grad_weight_rows_avx512(const float* x, const float* go, float* part, const Geom& g) {
  __mmask16 hm[K][V], sm[V];
  row_lanes<V, K, D>(g.w, hm, sm);
  if constexpr (K == 3 || V == 1) {
    dw_grad_weight_rows_pass<V, K, D, 0, K, RELU>(x, go, part, g.h, g.w, hm, sm);
  } else {
    dw_grad_weight_rows_pass<V, K, D, 0, 2, RELU>(x, go, part, g.h, g.w, hm, sm);
    dw_grad_weight_rows_pass<V, K, D, 2, 2, RELU>(x, go, part, g.h, g.w, hm, sm);
    dw_grad_weight_rows_pass<V, K, D, 4, 1, RELU>(x, go, part, g.h, g.w, hm, sm);
  }
}

template <int V, bool RELU>
ND_AVX512_FN void dw_grad_weight_rows_shape(const float* x, const float* go, float* part, const Geom& g) {
  if (g.k == 3 && g.d == 1) return dw_grad_weight_rows_avx512<V, 3, 1, RELU>(x, go, part, g);
  if (g.k == 5 && g.d == 1) return dw_grad_weight_rows_avx512<V, 5, 1, RELU>(x, go, part, g);
  if (g.k == 3 && g.d == 2) return dw_grad_weight_rows_avx512<V, 3, 2, RELU>(x, go, part, g);
  dw_grad_weight_rows_avx512<V, 5, 2, RELU>(x, go, part, g);
}

// dw_grad_weight_rows_avx512 for a plane of rows_form(g), with relu(x) when `relu`.
template <bool RELU>
ND_AVX512_FN void dw_grad_weight_rows(const float* x, const float* go, float* part, const Geom& g) {
  if (g.w > 16) return dw_grad_weight_rows_shape<2, RELU>(x, go, part, g);
  dw_grad_weight_rows_shape<1, RELU>(x, go, part, g);
}
#endif

#ifdef ND_AVX512
// The depthwise weight gradient in the direct form: part[t] = sum_i go[i] x[i + dtap[t]] over
// the lanes inside the plane, four taps per pass over the plane (16-lane partial sums, summed
// in a fixed order at the end).
ND_AVX512_FN void dw_grad_weight_direct_avx512(const float* x, const float* go, float* part, const Geom& g) {
  if (rows_form(g)) return dw_grad_weight_rows<false>(x, go, part, g);
  const int64_t hw = g.h * g.w, kk = g.k * g.k;
  const __m512 z = _mm512_setzero_ps();
  for (int64_t t0 = 0; t0 < kk; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, kk - t0);
    const uint16_t* mk[4];
    intptr_t src[4];
    for (int64_t q = 0; q < 4; ++q) {
      const int64_t t = t0 + std::min(q, nt - 1);
      mk[q] = g.dmask.data() + t * g.nb;
      src[q] = reinterpret_cast<intptr_t>(x) + static_cast<intptr_t>(g.dtap[t] * 4);
    }
    __m512 a[4] = {z, z, z, z};
    for (int64_t b = 0; b * 16 < hw; ++b) {
      const int64_t i = b * 16;
      const __m512 gv = _mm512_maskz_loadu_ps(lanes(hw - i), go + i);
      for (int q = 0; q < 4; ++q) {
        // Lanes outside the plane are masked: their addresses are never read.
        a[q] = _mm512_fmadd_ps(gv, _mm512_maskz_loadu_ps(mk[q][b], reinterpret_cast<const float*>(src[q] + i * 4)), a[q]);
      }
    }
    for (int64_t q = 0; q < nt; ++q) part[t0 + q] = hsum(a[q]);
  }
}
#endif

bool direct_wanted() {
#ifdef ND_AVX512
  return g_direct && use_avx512();
#else
  return false;
#endif
}

// Whether the planes of `g` run in the direct form (add_direct; the switches may have changed
// since `g` was made).
bool direct_form(const Geom& g) { return !g.dmask.empty() && direct_wanted(); }

// dst[0, n) = relu(x[0, n)).
void relu_plane(const float* x, float* dst, int64_t n) {
#ifdef ND_AVX512
  if (use_avx512()) return row_copy(dst, x, n, true);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = x[i] > 0.f ? x[i] : 0.f;
}

// One depthwise output plane: out = dw(relu?(x)), times (mask > 0) where a mask plane is given.
// The direct form where `g` has it (add_direct) and the AVX-512 kernels run (in row blocks, the
// ReLU applied to each loaded input vector; in flat blocks, relu(x) copied into `buf` first: one
// pass instead of one per tap), else the phase layout in `buf` / `ext` (g.buf and g.len floats).
void dw_plane(const float* x, const float* wt, float* out, const Geom& g, bool relu, float* buf, float* ext,
              const float* mask = nullptr) {
#ifdef ND_AVX512
  if (direct_form(g)) {
    if (rows_form(g)) return relu ? dw_rows<true>(x, wt, out, g, mask) : dw_rows<false>(x, wt, out, g, mask);
    if (relu) relu_plane(x, buf, g.h * g.w), x = buf;
    return dw_direct_avx512(x, wt, out, g, mask);
  }
#endif
  fill_phases(x, buf, g, relu);
  dw_forward_plane(buf, wt, ext, out, g, mask);
}

// grad_out plane -> `wq`-wide copy with zeros in the discarded columns.
ND_CLONES void extend_grad(const float* go, float* ext, const Geom& g) {
#ifdef ND_AVX512
  if (use_avx512()) {
    for (int64_t oh = 0; oh < g.oh; ++oh) row_copy_pad(ext + oh * g.wq, go + oh * g.ow, g.ow, g.wq);
    return;
  }
#endif
  for (int64_t oh = 0; oh < g.oh; ++oh) {
    for (int64_t ow = 0; ow < g.ow; ++ow) ext[oh * g.wq + ow] = go[oh * g.ow + ow];
    for (int64_t ow = g.ow; ow < g.wq; ++ow) ext[oh * g.wq + ow] = 0.f;
  }
}

// Scatter of the extended grad_out into the zeroed phase buffer `gbuf`.
ND_CLONES void dw_grad_input_plane(const float* ext, const float* wt, float* gbuf, const Geom& g) {
  for (int64_t i = 0; i < g.buf; ++i) gbuf[i] = 0.f;
  for (int64_t kh = 0; kh < g.k; ++kh)
    for (int64_t kw = 0; kw < g.k; ++kw) {
      float* dst = gbuf + g.tap[kh * g.k + kw];
      const float wv = wt[kh * g.k + kw];
#pragma omp simd
      for (int64_t i = 0; i < g.len; ++i) dst[i] += wv * ext[i];
    }
}

// Phase buffer -> input-gradient plane, times the ReLU mask of x when `relu`.
ND_CLONES void gather_phases(const float* gbuf, const float* x, float* gx, const Geom& g, bool relu) {
#ifdef ND_AVX512
  if (use_avx512() && (g.s == 1 || (g.s == 2 && g.w >= 2))) {
    for (int64_t ih = 0; ih < g.h; ++ih) {
      const float* mask = relu ? x + ih * g.w : nullptr;
      if (g.s == 1) {
        row_copy_masked(gx + ih * g.w, gbuf + g.at(ih + g.p, g.p), mask, g.w);
      } else {
        const float* src = gbuf + g.row_at[ih];
        row_join2(gx + ih * g.w, src + g.col_at[0], src + g.col_at[1], mask, g.w);
      }
    }
    return;
  }
#endif
  for (int64_t ih = 0; ih < g.h; ++ih) {
    const float* xr = x + ih * g.w;
    float* out = gx + ih * g.w;
    if (g.s == 1) {
      const float* src = gbuf + g.at(ih + g.p, g.p);
#pragma omp simd
      for (int64_t iw = 0; iw < g.w; ++iw) out[iw] = relu ? (xr[iw] > 0.f ? src[iw] : 0.f) : src[iw];
      continue;
    }
    const float* src = gbuf + g.row_at[ih];
    if (g.s == 2) {
      for (int64_t iw0 = 0; iw0 < 2 && iw0 < g.w; ++iw0) {
        const float* sp = src + g.col_at[iw0];
        const float* xs = xr + iw0;
        float* o = out + iw0;
        const int64_t cnt = (g.w - iw0 + 1) / 2;
#pragma omp simd
        for (int64_t j = 0; j < cnt; ++j) o[2 * j] = relu ? (xs[2 * j] > 0.f ? sp[j] : 0.f) : sp[j];
      }
      continue;
    }
    const int64_t* col = g.col_at.data();
    for (int64_t iw = 0; iw < g.w; ++iw) {
      const float v = src[col[iw]];
      out[iw] = relu ? (xr[iw] > 0.f ? v : 0.f) : v;
    }
  }
}

#ifdef ND_AVX512
// dw_grad_weight_plane on AVX-512: four taps per pass over the plane (four independent
// accumulators, the gradient vector loaded once for the four).
ND_AVX512_FN void dw_grad_weight_avx512(const float* buf, const float* ext, float* part, const Geom& g) {
  const int64_t kk = g.k * g.k;
  const __m512 z = _mm512_setzero_ps();
  for (int64_t t0 = 0; t0 < kk; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, kk - t0);
    const float* src[4];
    for (int64_t q = 0; q < 4; ++q) {
      const int64_t t = t0 + std::min(q, nt - 1);
      src[q] = buf + g.tap[t];
    }
    __m512 a0 = z, a1 = z, a2 = z, a3 = z;
    for (int64_t i = 0; i < g.len; i += 16) {
      const __mmask16 m = lanes(g.len - i);
      const __m512 gv = _mm512_maskz_loadu_ps(m, ext + i);
      a0 = _mm512_fmadd_ps(gv, _mm512_maskz_loadu_ps(m, src[0] + i), a0);
      a1 = _mm512_fmadd_ps(gv, _mm512_maskz_loadu_ps(m, src[1] + i), a1);
      a2 = _mm512_fmadd_ps(gv, _mm512_maskz_loadu_ps(m, src[2] + i), a2);
      a3 = _mm512_fmadd_ps(gv, _mm512_maskz_loadu_ps(m, src[3] + i), a3);
    }
    const __m512 a[4] = {a0, a1, a2, a3};
    for (int64_t q = 0; q < nt; ++q) part[t0 + q] = hsum(a[q]);
  }
}

// The 8 lanes summed in a fixed order.
ND_AVX2_FN inline float hsum8(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  float a = 0.f;
  for (float f : t) a += f;
  return a;
}

// The same on AVX2 + FMA: four taps per pass, two registers each (eight multiply-add chains).
ND_AVX2_FN void dw_grad_weight_avx2(const float* buf, const float* ext, float* part, const Geom& g) {
  const int64_t kk = g.k * g.k;
  for (int64_t t0 = 0; t0 < kk; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, kk - t0);
    const float* src[4];
    for (int64_t q = 0; q < 4; ++q) src[q] = buf + g.tap[t0 + std::min(q, nt - 1)];
    __m256 a[8];
    for (auto& r : a) r = _mm256_setzero_ps();
    for (int64_t i = 0; i < g.len; i += 16) {
      const __m256i m0 = lanes8(g.len - i), m1 = lanes8(g.len - i - 8);
      const __m256 g0 = _mm256_maskload_ps(ext + i, m0), g1 = _mm256_maskload_ps(ext + i + 8, m1);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        a[2 * q] = _mm256_fmadd_ps(g0, _mm256_maskload_ps(src[q] + i, m0), a[2 * q]);
        a[2 * q + 1] = _mm256_fmadd_ps(g1, _mm256_maskload_ps(src[q] + i + 8, m1), a[2 * q + 1]);
      }
    }
    for (int64_t q = 0; q < nt; ++q) part[t0 + q] = hsum8(_mm256_add_ps(a[2 * q], a[2 * q + 1]));
  }
}
#endif

ND_CLONES void dw_grad_weight_plane(const float* buf, const float* ext, float* part, const Geom& g) {
#ifdef ND_AVX512
  if (use_avx512()) return dw_grad_weight_avx512(buf, ext, part, g);
  if (use_avx2()) return dw_grad_weight_avx2(buf, ext, part, g);
#endif
  for (int64_t kh = 0; kh < g.k; ++kh)
    for (int64_t kw = 0; kw < g.k; ++kw) {
      const float* src = buf + g.tap[kh * g.k + kw];
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t i = 0; i < g.len; ++i) a += src[i] * ext[i];
      part[kh * g.k + kw] = a;
    }
}

#ifdef ND_AVX512
// pw_image on AVX-512: w(o, i) = w[o * so + i * si]. The column of 16 P pixels of every input
// channel is packed contiguously (ReLU applied) once per column; then blocks of NB outputs x 16 P
// pixels: P NB accumulators in registers, P loads from the packed column and P NB multiply-adds
// (weights broadcast from memory) per input channel; masked stores at the plane's end. Two
// shapes: 32-pixel columns in blocks of 8 outputs (then 4, then 1), and 64-pixel columns in blocks
// of 6 (then 4, then 1) for planes of a multiple of 512 pixels, whose output rows, 2 KB apart or
// a multiple of it, fall into the same L1 sets: with 6 rows of 64 pixels instead of 8 of 32 the
// 1x1 of a 32 x 32 plane measured +7% (forward) and +30-48% (masked input gradient) on AMD Zen 4,
// the other sizes within a few percent either way. Every output is the same sum in the same
// order (input channel 0 first, one multiply-add each) in both shapes: the results are equal bit
// for bit. Reading the column in place instead of packing it maps every channel's row (1-4 KB
// apart) to the same few L1 sets: the packed form measured 3-10% faster on the chain
// ReLU-1x1-BN forward + input gradient at the C 36 training step's three plane sizes.
template <int P, int NB>
ND_AVX512_FN inline void pw_block_avx512(const float* xb, const float* w, float* y, int64_t o, int64_t ci,
                                         int64_t hw, int64_t j0, int64_t so, int64_t si, const __mmask16* m,
                                         const float* mask) {
  __m512 a[P * NB];
#pragma GCC unroll 32
  for (int q = 0; q < P * NB; ++q) a[q] = _mm512_setzero_ps();
  for (int64_t i = 0; i < ci; ++i) {
    __m512 xv[P];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) xv[p] = _mm512_loadu_ps(xb + (i * P + p) * 16);
    const float* wi = w + o * so + i * si;
#pragma GCC unroll 8
    for (int q = 0; q < NB; ++q) {
      const __m512 wv = _mm512_set1_ps(wi[q * so]);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) a[q * P + p] = _mm512_fmadd_ps(wv, xv[p], a[q * P + p]);
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < NB; ++q) {
    const int64_t at = (o + q) * hw + j0;
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) store_kept(y + at + 16 * p, mask ? mask + at + 16 * p : nullptr, m[p], a[q * P + p]);
  }
}

template <int P, int NB>
ND_AVX512_FN void pw_columns_avx512(const float* x, const float* w, float* y, int64_t ci, int64_t co, int64_t hw,
                                    int64_t so, int64_t si, bool relu, const float* mask) {
  const __m512 z = _mm512_setzero_ps();
  thread_local std::vector<float> packed;
  if (packed.size() < static_cast<size_t>(ci) * 16 * P) packed.resize(static_cast<size_t>(ci) * 16 * P);
  float* xb = packed.data();
  for (int64_t j0 = 0; j0 < hw; j0 += 16 * P) {
    __mmask16 m[P];
    for (int p = 0; p < P; ++p) m[p] = lanes(hw - j0 - 16 * p);
    for (int64_t i = 0; i < ci; ++i)
      for (int p = 0; p < P; ++p) {
        __m512 v = _mm512_maskz_loadu_ps(m[p], x + i * hw + j0 + 16 * p);
        if (relu) v = _mm512_maskz_max_ps(all, v, z);
        _mm512_storeu_ps(xb + (i * P + p) * 16, v);
      }
    int64_t o = 0;
    for (; o + NB <= co; o += NB) pw_block_avx512<P, NB>(xb, w, y, o, ci, hw, j0, so, si, m, mask);
    for (; o + 4 <= co; o += 4) pw_block_avx512<P, 4>(xb, w, y, o, ci, hw, j0, so, si, m, mask);
    for (; o < co; ++o) pw_block_avx512<P, 1>(xb, w, y, o, ci, hw, j0, so, si, m, mask);
  }
}

ND_AVX512_FN void pw_image_avx512(const float* x, const float* w, float* y, int64_t ci, int64_t co, int64_t hw,
                                  int64_t so, int64_t si, bool relu, const float* mask) {
  if (hw % 512 == 0) return pw_columns_avx512<4, 6>(x, w, y, ci, co, hw, so, si, relu, mask);
  pw_columns_avx512<2, 8>(x, w, y, ci, co, hw, so, si, relu, mask);
}

// pw_image on AVX2 + FMA (16 ymm registers): the same scheme as pw_image_avx512 with 16-pixel
// columns (two registers) and blocks of 4 outputs (8 accumulators), then 1. (Blocks of 6, 12
// accumulators, left GCC too few registers: it stored half of them to the stack on every
// input channel, and the eval step spent 52% of its samples there.)

template <int NB>
ND_AVX2_FN inline void pw_block_avx2(const float* xb, const float* w, float* y, int64_t o, int64_t ci, int64_t hw,
                                     int64_t j0, int64_t so, int64_t si, const float* mask) {
  __m256 a[2 * NB];
#pragma GCC unroll 8
  for (int q = 0; q < 2 * NB; ++q) a[q] = _mm256_setzero_ps();
  for (int64_t i = 0; i < ci; ++i) {
    const __m256 x0 = _mm256_loadu_ps(xb + i * 16), x1 = _mm256_loadu_ps(xb + i * 16 + 8);
    const float* wi = w + o * so + i * si;
#pragma GCC unroll 4
    for (int q = 0; q < NB; ++q) {
      const __m256 wv = _mm256_broadcast_ss(wi + q * so);
      a[2 * q] = _mm256_fmadd_ps(wv, x0, a[2 * q]);
      a[2 * q + 1] = _mm256_fmadd_ps(wv, x1, a[2 * q + 1]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < NB; ++q) {
    const int64_t at = (o + q) * hw + j0;
    store_kept8(y + at, mask ? mask + at : nullptr, hw - j0, a[2 * q]);
    store_kept8(y + at + 8, mask ? mask + at + 8 : nullptr, hw - j0 - 8, a[2 * q + 1]);
  }
}

ND_AVX2_FN void pw_image_avx2(const float* x, const float* w, float* y, int64_t ci, int64_t co, int64_t hw,
                              int64_t so, int64_t si, bool relu, const float* mask) {
  const __m256 z = _mm256_setzero_ps();
  thread_local std::vector<float> packed;
  if (packed.size() < static_cast<size_t>(ci) * 16) packed.resize(static_cast<size_t>(ci) * 16);
  float* xb = packed.data();
  for (int64_t j0 = 0; j0 < hw; j0 += 16) {
    for (int64_t i = 0; i < ci; ++i) {
      __m256 x0 = load8(x + i * hw + j0, hw - j0), x1 = load8(x + i * hw + j0 + 8, hw - j0 - 8);
      if (relu) x0 = _mm256_max_ps(x0, z), x1 = _mm256_max_ps(x1, z);  // NaN -> 0, as "v > 0 ? v : 0"
      _mm256_storeu_ps(xb + i * 16, x0);
      _mm256_storeu_ps(xb + i * 16 + 8, x1);
    }
    int64_t o = 0;
    for (; o + 4 <= co; o += 4) pw_block_avx2<4>(xb, w, y, o, ci, hw, j0, so, si, mask);
    for (; o < co; ++o) pw_block_avx2<1>(xb, w, y, o, ci, hw, j0, so, si, mask);
  }
}

// 16 x 16 transpose in registers: r[k] (row k) becomes column k. (The maskz forms with all
// lanes are the plain shuffles; they keep GCC 12 from warning about their undefined pass-through.)
ND_AVX512_FN inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_maskz_unpacklo_ps(all, r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_maskz_unpackhi_ps(all, r[2 * k], r[2 * k + 1]);
  }
  // u[4 g + c], 128-bit lane L: rows 4 g .. 4 g + 3 of column 4 L + c.
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    u[4 * g] = _mm512_maskz_shuffle_ps(all, t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_maskz_shuffle_ps(all, t[4 * g], t[4 * g + 2], 0xEE);
    u[4 * g + 2] = _mm512_maskz_shuffle_ps(all, t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_maskz_shuffle_ps(all, t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 a = _mm512_maskz_shuffle_f32x4(all, u[c], u[4 + c], 0x88), b = _mm512_maskz_shuffle_f32x4(all, u[c], u[4 + c], 0xDD);
    const __m512 d = _mm512_maskz_shuffle_f32x4(all, u[8 + c], u[12 + c], 0x88), e = _mm512_maskz_shuffle_f32x4(all, u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_maskz_shuffle_f32x4(all, a, d, 0x88), r[8 + c] = _mm512_maskz_shuffle_f32x4(all, a, d, 0xDD);
    r[4 + c] = _mm512_maskz_shuffle_f32x4(all, b, e, 0x88), r[12 + c] = _mm512_maskz_shuffle_f32x4(all, b, e, 0xDD);
  }
}

// xt[j * ciw + i] = relu?(x[i * hw + j]) for i < ci, 0 for ci <= i < ciw (ciw: ci rounded up
// to 16), by 16 x 16 blocks.
ND_AVX512_FN void transpose_planes(const float* x, int64_t ci, int64_t hw, bool relu, float* xt, int64_t ciw) {
  const __m512 z = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < ciw; i0 += 16)
    for (int64_t j0 = 0; j0 < hw; j0 += 16) {
      const __mmask16 m = lanes(hw - j0);
      __m512 r[16];
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) {
        r[k] = i0 + k < ci ? _mm512_maskz_loadu_ps(m, x + (i0 + k) * hw + j0) : z;
        if (relu) r[k] = _mm512_maskz_max_ps(all, r[k], z);  // NaN -> 0, as "v > 0 ? v : 0"
      }
      transpose16(r);
      const int64_t nj = std::min<int64_t>(16, hw - j0);
      for (int64_t k = 0; k < nj; ++k) _mm512_storeu_ps(xt + (j0 + k) * ciw + i0, r[k]);
    }
}

// part[o, i0 .. i0 + 16 IV) (+)= sum_j gy[o, j] xt[j, i0 ..] for OB outputs o0 ..: OB x IV
// accumulators held across all the pixels; per pixel IV loads and OB broadcasts.
template <int OB, int IV>
ND_AVX512_FN inline void pw_grad_weight_block(const float* gy, const float* xt, float* part, int64_t o0, int64_t i0,
                                              int64_t ci, int64_t ciw, int64_t hw, bool accumulate) {
  __m512 acc[OB][IV];
#pragma GCC unroll 8
  for (int b = 0; b < OB; ++b)
#pragma GCC unroll 3
    for (int v = 0; v < IV; ++v) acc[b][v] = _mm512_setzero_ps();
  const float* g0 = gy + o0 * hw;
  for (int64_t j = 0; j < hw; ++j) {
    const float* xr = xt + j * ciw + i0;
    __m512 xv[IV];
#pragma GCC unroll 3
    for (int v = 0; v < IV; ++v) xv[v] = _mm512_loadu_ps(xr + 16 * v);
#pragma GCC unroll 8
    for (int b = 0; b < OB; ++b) {
      const __m512 g = _mm512_set1_ps(g0[b * hw + j]);
#pragma GCC unroll 3
      for (int v = 0; v < IV; ++v) acc[b][v] = _mm512_fmadd_ps(g, xv[v], acc[b][v]);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < OB; ++b)
#pragma GCC unroll 3
    for (int v = 0; v < IV; ++v) {
      const __mmask16 m = lanes(ci - i0 - 16 * v);
      float* dst = part + (o0 + b) * ci + i0 + 16 * v;
      const __m512 r = accumulate ? _mm512_add_ps(acc[b][v], _mm512_maskz_loadu_ps(m, dst)) : acc[b][v];
      _mm512_mask_storeu_ps(dst, m, r);
    }
}

template <int IV>
ND_AVX512_FN void pw_grad_weight_rows(const float* gy, const float* xt, float* part, int64_t i0, int64_t ci,
                                      int64_t co, int64_t ciw, int64_t hw, bool accumulate) {
  int64_t o0 = 0;
  for (; o0 + 8 <= co; o0 += 8) pw_grad_weight_block<8, IV>(gy, xt, part, o0, i0, ci, ciw, hw, accumulate);
  for (; o0 + 4 <= co; o0 += 4) pw_grad_weight_block<4, IV>(gy, xt, part, o0, i0, ci, ciw, hw, accumulate);
  for (; o0 < co; ++o0) pw_grad_weight_block<1, IV>(gy, xt, part, o0, i0, ci, ciw, hw, accumulate);
}

// part[o * ci + i] (+)= sum_j gy[o, j] relu?(x[i, j]) for one image on AVX-512: relu?(x)
// transposed into the thread's `xt` ([hw][ci rounded up to 16]), then blocks of up to 8 outputs
// x 48 inputs (3 vectors) accumulate in registers over the pixels in order: per pixel up to 3
// loads of xt and 8 broadcasts of gy for 24 multiply-adds (no horizontal sums, each gy row read
// once per block, xt read from L2 once per 8 outputs).
ND_AVX512_FN void pw_grad_weight_image_avx512(const float* gy, const float* x, float* part, int64_t ci, int64_t co,
                                              int64_t hw, bool relu, bool accumulate, std::vector<float>& xt) {
  const int64_t ciw = (ci + 15) / 16 * 16;
  xt.resize(static_cast<size_t>(hw * ciw));
  transpose_planes(x, ci, hw, relu, xt.data(), ciw);
  for (int64_t i0 = 0; i0 < ciw; i0 += 48) {
    const int64_t iv = std::min<int64_t>(3, (ciw - i0) / 16);
    if (iv == 3) pw_grad_weight_rows<3>(gy, xt.data(), part, i0, ci, co, ciw, hw, accumulate);
    else if (iv == 2) pw_grad_weight_rows<2>(gy, xt.data(), part, i0, ci, co, ciw, hw, accumulate);
    else pw_grad_weight_rows<1>(gy, xt.data(), part, i0, ci, co, ciw, hw, accumulate);
  }
}
#endif

// 1x1 convolution y[n] = W relu?(x[n]) on [C, HW] planes of one image (`transpose`: W^T, the
// input gradient, then times the ReLU mask of `mask` when given); and the weight gradient.
ND_CLONES void pw_image(const float* x, const float* w, float* y, int64_t ci, int64_t co, int64_t hw,
                        bool transpose, bool relu, const float* mask) {
#ifdef ND_AVX512
  if (use_avx512())
    return pw_image_avx512(x, w, y, ci, co, hw, transpose ? 1 : ci, transpose ? co : 1, relu, mask);
  if (use_avx2()) return pw_image_avx2(x, w, y, ci, co, hw, transpose ? 1 : ci, transpose ? co : 1, relu, mask);
#endif
  auto wat = [&](int64_t o, int64_t i) { return transpose ? w[i * co + o] : w[o * ci + i]; };
  auto store = [&](int64_t o, int64_t j, float v) {
    y[o * hw + j] = (mask && !(mask[o * hw + j] > 0.f)) ? 0.f : v;
  };
  constexpr int64_t V = kBlock;
  int64_t o = 0;
  // Four outputs at a time, each input vector loaded once for the four.
  for (; o + 4 <= co; o += 4) {
    int64_t j0 = 0;
    for (; j0 + V <= hw; j0 += V) {
      float a0[V] = {}, a1[V] = {}, a2[V] = {}, a3[V] = {};
      for (int64_t i = 0; i < ci; ++i) {
        const float* xi = x + i * hw + j0;
        const float w0 = wat(o, i), w1 = wat(o + 1, i), w2 = wat(o + 2, i), w3 = wat(o + 3, i);
        if (relu) {
#pragma omp simd
          for (int64_t v = 0; v < V; ++v) {
            const float xv = xi[v] > 0.f ? xi[v] : 0.f;
            a0[v] += w0 * xv, a1[v] += w1 * xv, a2[v] += w2 * xv, a3[v] += w3 * xv;
          }
        } else {
#pragma omp simd
          for (int64_t v = 0; v < V; ++v) {
            const float xv = xi[v];
            a0[v] += w0 * xv, a1[v] += w1 * xv, a2[v] += w2 * xv, a3[v] += w3 * xv;
          }
        }
      }
      for (int64_t v = 0; v < V; ++v) {
        store(o, j0 + v, a0[v]);
        store(o + 1, j0 + v, a1[v]);
        store(o + 2, j0 + v, a2[v]);
        store(o + 3, j0 + v, a3[v]);
      }
    }
    for (int64_t j = j0; j < hw; ++j)
      for (int64_t q = 0; q < 4; ++q) {
        float acc = 0.f;
        for (int64_t i = 0; i < ci; ++i) {
          const float xv = x[i * hw + j];
          acc += wat(o + q, i) * (relu && !(xv > 0.f) ? 0.f : xv);
        }
        store(o + q, j, acc);
      }
  }
  for (; o < co; ++o)
    for (int64_t j = 0; j < hw; ++j) {
      float acc = 0.f;
      for (int64_t i = 0; i < ci; ++i) {
        const float xv = x[i * hw + j];
        acc += wat(o, i) * (relu && !(xv > 0.f) ? 0.f : xv);
      }
      store(o, j, acc);
    }
}

ND_CLONES void pw_grad_weight_image(const float* gy, const float* x, float* part, int64_t ci,
                                    int64_t co, int64_t hw, bool relu) {
  for (int64_t o = 0; o < co; ++o)
    for (int64_t i = 0; i < ci; ++i) {
      const float* a = gy + o * hw;
      const float* b = x + i * hw;
      float acc = 0.f;
      if (relu) {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < hw; ++j) acc += a[j] * (b[j] > 0.f ? b[j] : 0.f);
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < hw; ++j) acc += a[j] * b[j];
      }
      part[o * ci + i] = acc;
    }
}

// ---- 1x1 weight gradient through BLAS -------------------------------------------------------
// The BLAS sgemm LibTorch itself loaded (Fortran interface; OpenBLAS on Debian), found at run
// time: null when the process has none (the own kernel above then runs). Called from inside the
// parallel image loops, where OpenBLAS' OpenMP build runs single-threaded: each call computes
// its outputs in one fixed order, so results do not depend on the thread count.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
SgemmFn blas_sgemm() {
  static const SgemmFn f = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_"));
  return g_blas ? f : nullptr;
}

// part[o * ci + i] (+)= sum_j gy[o, j] relu?(x[i, j]) for one image (`accumulate`: added to
// part, else written). `scratch`: the thread's buffer for relu(x) (BLAS) or its transpose (AVX-512).
void pw_grad_weight_acc(const float* gy, const float* x, float* part, int64_t ci, int64_t co, int64_t hw, bool relu,
                        bool accumulate, std::vector<float>& scratch) {
#ifdef ND_AVX512
  // The own AVX-512 kernel first: 5-15% faster training steps than OpenBLAS' sgemm here
  // (docs/bench.md).
  if (use_avx512()) return pw_grad_weight_image_avx512(gy, x, part, ci, co, hw, relu, accumulate, scratch);
#endif
  if (const SgemmFn gemm = blas_sgemm()) {
    const float* xs = x;
    if (relu) {
      scratch.resize(static_cast<size_t>(ci * hw));
      float* r = scratch.data();
#pragma omp simd
      for (int64_t j = 0; j < ci * hw; ++j) r[j] = x[j] > 0.f ? x[j] : 0.f;
      xs = r;
    }
    // Row-major part (co x ci) = gy (co x hw) * xs (ci x hw)^T is, column-major, part^T =
    // xs^T' * gy with xs read transposed.
    const int m = static_cast<int>(ci), nn = static_cast<int>(co), k = static_cast<int>(hw), ld = static_cast<int>(hw);
    const float one = 1.f, beta = accumulate ? 1.f : 0.f;
    gemm("T", "N", &m, &nn, &k, &one, xs, &ld, gy, &ld, &beta, part, &m);
    return;
  }
  if (!accumulate) return pw_grad_weight_image(gy, x, part, ci, co, hw, relu);
  scratch.resize(static_cast<size_t>(co * ci));
  pw_grad_weight_image(gy, x, scratch.data(), ci, co, hw, relu);
  for (int64_t j = 0; j < co * ci; ++j) part[j] += scratch[j];
}

// Images per weight-gradient partial: each group's images are accumulated in order by one
// thread, then the groups' partials are summed in a fixed order (independent of the threads).
constexpr int64_t kImageGroup = 4;
int64_t image_groups(int64_t n) { return (n + kImageGroup - 1) / kImageGroup; }

// f(i, group, first): every image i of every group, groups in parallel, images of a group in
// order on one thread; `first`: i is its group's first image.
template <typename F>
void for_image_groups(int64_t n, const F& f) {
  at::parallel_for(0, image_groups(n), 1, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g)
      for (int64_t i = g * kImageGroup; i < std::min(n, (g + 1) * kImageGroup); ++i) f(i, g, i == g * kImageGroup);
  });
}

// 3x3 pooling, padding 1, on the phase layout (`buf` filled with -inf padding for max, 0 for
// average). Forward: ext = max or sum of the taps (then / count, count_include_pad = false).
#ifdef ND_AVX512
// max(a, v) as the portable loop takes it: v where v > a or v is NaN (NaN propagates).
ND_AVX512_FN inline __m512 nan_max(__m512 a, __m512 v) {
  return _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(v, a, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

// pool_forward_plane's taps on AVX-512: 64 outputs (four registers) per pass over the 9 taps,
// in the portable loop's order (the same values, bitwise).
ND_AVX512_FN void pool_taps_avx512(const float* buf, const int64_t* offs, const float* count, float* ext, int64_t len,
                                   bool max_pool) {
  const __m512 init = _mm512_set1_ps(max_pool ? -std::numeric_limits<float>::infinity() : 0.f);
  for (int64_t i0 = 0; i0 < len; i0 += 64) {
    const __mmask16 m[4] = {lanes(len - i0), lanes(len - i0 - 16), lanes(len - i0 - 32), lanes(len - i0 - 48)};
    __m512 a[4] = {init, init, init, init};
    for (int64_t t = 0; t < 9; ++t) {
      const float* src = buf + offs[t] + i0;
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const __m512 v = _mm512_maskz_loadu_ps(m[q], src + 16 * q);
        a[q] = max_pool ? nan_max(a[q], v) : _mm512_add_ps(a[q], v);
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      if (!max_pool) a[q] = _mm512_div_ps(a[q], _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), m[q], count + i0 + 16 * q));
      _mm512_mask_storeu_ps(ext + i0 + 16 * q, m[q], a[q]);
    }
  }
}

// max_pool_grad_plane on AVX-512, 128 outputs (8 registers) at a time: their maxima in registers
// (recomputed from the phase buffer: no forward output needed), then tap by tap each output's
// gradient added to its first maximal tap. A tap's eight read-add-stores are disjoint, so a load
// never waits on the store just before it (16 outputs at a time measured 4.1% of row 4's CPU
// samples). The additions into one input come in another order than the portable loop's
// (outputs before taps), so the sums may differ from it in the last bit.
ND_AVX512_FN void max_pool_grad_avx512(const float* buf, const float* gext, float* gbuf, const Geom& g) {
  constexpr int kB = 8;
  const int64_t* offs = g.tap.data();
  for (int64_t i0 = 0; i0 < g.len; i0 += 16 * kB) {
    __mmask16 open[kB];  // lanes whose gradient has not been placed yet
    __m512 mx[kB], gv[kB];
#pragma GCC unroll 8
    for (int b = 0; b < kB; ++b) {
      open[b] = lanes(g.len - i0 - 16 * b);
      mx[b] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      gv[b] = _mm512_maskz_loadu_ps(open[b], gext + i0 + 16 * b);
    }
    for (int64_t t = 0; t < 9; ++t)
#pragma GCC unroll 8
      for (int b = 0; b < kB; ++b) mx[b] = nan_max(mx[b], _mm512_maskz_loadu_ps(open[b], buf + offs[t] + i0 + 16 * b));
    for (int64_t t = 0; t < 9; ++t) {
      const float* src = buf + offs[t] + i0;
      float* dst = gbuf + offs[t] + i0;
#pragma GCC unroll 8
      for (int b = 0; b < kB; ++b) {
        const __m512 v = _mm512_maskz_loadu_ps(open[b], src + 16 * b);
        const __mmask16 hit =
            _mm512_mask_cmp_ps_mask(open[b], v, mx[b], _CMP_EQ_OQ) | _mm512_mask_cmp_ps_mask(open[b], v, v, _CMP_UNORD_Q);
        _mm512_mask_storeu_ps(dst + 16 * b, hit, _mm512_add_ps(_mm512_maskz_loadu_ps(hit, dst + 16 * b), gv[b]));
        open[b] &= static_cast<__mmask16>(~hit);
      }
    }
  }
}
// max_pool_grad_avx512 on AVX2 + FMA: 64 outputs (8 registers) at a time, the open lanes as
// vector masks.
ND_AVX2_FN inline __m256 nan_max8(__m256 a, __m256 v) {
  return _mm256_blendv_ps(a, v, _mm256_or_ps(_mm256_cmp_ps(v, a, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

ND_AVX2_FN void max_pool_grad_avx2(const float* buf, const float* gext, float* gbuf, const Geom& g) {
  constexpr int kB = 8;
  const int64_t* offs = g.tap.data();
  for (int64_t i0 = 0; i0 < g.len; i0 += 8 * kB) {
    __m256i open[kB];  // lanes whose gradient has not been placed yet
    __m256 mx[kB], gv[kB];
#pragma GCC unroll 8
    for (int b = 0; b < kB; ++b) {
      open[b] = lanes8(g.len - i0 - 8 * b);
      mx[b] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      gv[b] = _mm256_maskload_ps(gext + i0 + 8 * b, open[b]);
    }
    for (int64_t t = 0; t < 9; ++t)
#pragma GCC unroll 8
      for (int b = 0; b < kB; ++b) mx[b] = nan_max8(mx[b], _mm256_maskload_ps(buf + offs[t] + i0 + 8 * b, open[b]));
    for (int64_t t = 0; t < 9; ++t) {
      const float* src = buf + offs[t] + i0;
      float* dst = gbuf + offs[t] + i0;
#pragma GCC unroll 8
      for (int b = 0; b < kB; ++b) {
        if (i0 + 8 * b >= g.len) break;  // no lane of this register or the next is in the plane
        const __m256 v = _mm256_maskload_ps(src + 8 * b, open[b]);
        const __m256i hit = _mm256_and_si256(
            open[b], _mm256_castps_si256(_mm256_or_ps(_mm256_cmp_ps(v, mx[b], _CMP_EQ_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q))));
        // A whole-register read-add-store with the other lanes written back unchanged (no
        // masked store, above): every lane lies inside the buffer, whose slack covers a
        // register past len.
        const __m256 d = _mm256_loadu_ps(dst + 8 * b);
        _mm256_storeu_ps(dst + 8 * b, _mm256_blendv_ps(d, _mm256_add_ps(d, gv[b]), _mm256_castsi256_ps(hit)));
        open[b] = _mm256_andnot_si256(hit, open[b]);
      }
    }
  }
}

// The direct forms of the stride-1 pools (add_direct): the taps read the unpadded plane through
// the masks, masked-off lanes reading -inf (max) or 0 (average) as the phase layout's padding
// does: the same values bit for bit. `count`: per output in the plane's layout.
ND_AVX512_FN void pool_direct_avx512(const float* x, float* out, const float* count, const Geom& g, bool max_pool) {
  const int64_t hw = g.h * g.w;
  const __m512 init = _mm512_set1_ps(max_pool ? -std::numeric_limits<float>::infinity() : 0.f);
  for (int64_t b0 = 0; b0 * 16 < hw; b0 += 4) {
    const int64_t i0 = b0 * 16;
    __m512 a[4] = {init, init, init, init};
    for (int64_t t = 0; t < 9; ++t) {
      const uint16_t* mk = g.dmask.data() + t * g.nb + b0;
      // Lanes outside the plane are masked: their addresses are never read.
      const intptr_t src = reinterpret_cast<intptr_t>(x) + static_cast<intptr_t>((i0 + g.dtap[t]) * 4);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const __m512 v = _mm512_mask_loadu_ps(init, mk[q], reinterpret_cast<const float*>(src + 64 * q));
        a[q] = max_pool ? nan_max(a[q], v) : _mm512_add_ps(a[q], v);
      }
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      const __mmask16 m = lanes(hw - i0 - 16 * q);
      if (!max_pool) a[q] = _mm512_div_ps(a[q], _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), m, count + i0 + 16 * q));
      _mm512_mask_storeu_ps(out + i0 + 16 * q, m, a[q]);
    }
  }
}

// max_pool_grad_avx512 in the direct form: gx (zeroed, the input plane's layout) receives each
// output's gradient at its first maximal tap inside the plane (ATen's choice, also when the
// whole window is -inf).
ND_AVX512_FN void max_pool_grad_direct_avx512(const float* x, const float* go, float* gx, const Geom& g) {
  constexpr int kB = 8;
  const int64_t hw = g.h * g.w;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t b0 = 0; b0 * 16 < hw; b0 += kB) {
    const int64_t i0 = b0 * 16;
    __mmask16 open[kB];
    __m512 mx[kB], gv[kB];
#pragma GCC unroll 8
    for (int b = 0; b < kB; ++b) {
      open[b] = lanes(hw - i0 - 16 * b);
      mx[b] = ninf;
      gv[b] = _mm512_maskz_loadu_ps(open[b], go + i0 + 16 * b);
    }
    for (int64_t t = 0; t < 9; ++t) {
      const uint16_t* mk = g.dmask.data() + t * g.nb + b0;
      const intptr_t src = reinterpret_cast<intptr_t>(x) + static_cast<intptr_t>((i0 + g.dtap[t]) * 4);
#pragma GCC unroll 8
      for (int b = 0; b < kB; ++b)
        mx[b] = nan_max(mx[b], _mm512_mask_loadu_ps(ninf, mk[b], reinterpret_cast<const float*>(src + 64 * b)));
    }
    for (int64_t t = 0; t < 9; ++t) {
      const uint16_t* mk = g.dmask.data() + t * g.nb + b0;
      const intptr_t src = reinterpret_cast<intptr_t>(x) + static_cast<intptr_t>((i0 + g.dtap[t]) * 4);
      const intptr_t dst = reinterpret_cast<intptr_t>(gx) + static_cast<intptr_t>((i0 + g.dtap[t]) * 4);
#pragma GCC unroll 8
      for (int b = 0; b < kB; ++b) {
        const __mmask16 in = open[b] & mk[b];
        const __m512 v = _mm512_maskz_loadu_ps(in, reinterpret_cast<const float*>(src + 64 * b));
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(in, v, mx[b], _CMP_EQ_OQ) | _mm512_mask_cmp_ps_mask(in, v, v, _CMP_UNORD_Q);
        float* d = reinterpret_cast<float*>(dst + 64 * b);
        _mm512_mask_storeu_ps(d, hit, _mm512_add_ps(_mm512_maskz_loadu_ps(hit, d), gv[b]));
        open[b] &= static_cast<__mmask16>(~hit);
      }
    }
  }
}
#endif

ND_CLONES void pool_forward_plane(const float* buf, float* ext, float* out, const float* count,
                                  const Geom& g, bool max_pool) {
#ifdef ND_AVX512
  if (use_avx512()) {
    pool_taps_avx512(buf, g.tap.data(), count, ext, g.len, max_pool);
    return compact_rows(ext, out, g);
  }
#endif
  const float init = max_pool ? -std::numeric_limits<float>::infinity() : 0.f;
  for (int64_t i = 0; i < g.len; ++i) ext[i] = init;
  for (int64_t kh = 0; kh < 3; ++kh)
    for (int64_t kw = 0; kw < 3; ++kw) {
      const float* src = buf + g.tap[kh * 3 + kw];
      if (max_pool) {
#pragma omp simd
        for (int64_t i = 0; i < g.len; ++i) ext[i] = (src[i] > ext[i] || src[i] != src[i]) ? src[i] : ext[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < g.len; ++i) ext[i] += src[i];
      }
    }
  if (!max_pool)
    for (int64_t i = 0; i < g.len; ++i) ext[i] /= count[i];
  compact_rows(ext, out, g);
}

// Max-pool input gradient: each output's gradient goes to its first maximal tap in (kh, kw)
// order, as ATen's indices do. `ext` holds the maxima, `gext` the extended grad_out, `done`
// scratch; `gbuf` (zeroed) receives the scatter.
ND_CLONES void max_pool_grad_plane(const float* buf, const float* ext, const float* gext, float* done,
                                   float* gbuf, const Geom& g) {
  for (int64_t i = 0; i < g.len; ++i) done[i] = 0.f;
  for (int64_t kh = 0; kh < 3; ++kh)
    for (int64_t kw = 0; kw < 3; ++kw) {
      const int64_t off = g.tap[kh * 3 + kw];
      const float* src = buf + off;
      float* dst = gbuf + off;
#pragma omp simd
      for (int64_t i = 0; i < g.len; ++i) {
        const bool hit = done[i] == 0.f && (src[i] == ext[i] || src[i] != src[i]);
        dst[i] += hit ? gext[i] : 0.f;
        done[i] = hit ? 1.f : done[i];
      }
    }
}

bool own_kernel(const Tensor& x) {
  return x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.layout() == torch::kStrided;
}

// An allocator whose elements start uninitialised (a vector of it sized n is not zero-filled):
// for the partial sums that every image writes before anything reads them (zero-filling them
// was a serial memset of up to a few hundred KB per node in the backward).
template <typename T>
struct NoInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = NoInit<U>;
  };
  NoInit() = default;
  template <typename U>
  NoInit(const NoInit<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
using Partials = std::vector<float, NoInit<float>>;

// Sums partials [n, m] over n in a fixed order (double accumulation) into a tensor of `shape`.
Tensor sum_partials(const Partials& part, int64_t n, int64_t m, at::IntArrayRef shape) {
  auto out = torch::empty(shape, torch::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, m, 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      double acc = 0;
      for (int64_t i = 0; i < n; ++i) acc += part[i * m + j];
      o[j] = static_cast<float>(acc);
    }
  });
  return out;
}

// Per-image loop over [N, ...] tensors, in parallel.
template <typename F>
void for_images(int64_t n, const F& f) {
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

// x itself when each image [C, H, W] of it is contiguous (a channel slice of a larger batch, such
// as a node of a cell's output written in place, is), with `img` = its image stride; otherwise a
// contiguous copy (img = C H W).
Tensor image_major(const Tensor& x, int64_t& img) {
  if (x.dim() == 4 && x.stride(3) == 1 && x.stride(2) == x.size(3) && x.stride(1) == x.size(2) * x.size(3) &&
      x.stride(0) >= x.size(1) * x.stride(1)) {
    img = x.stride(0);
    return x;
  }
  auto c = x.contiguous();
  img = c.dim() == 4 ? c.size(1) * c.size(2) * c.size(3) : 0;
  return c;
}

#ifdef ND_AVX512
// The 16 lanes summed as a tree (8 + 8, 4 + 4, 2 + 2, 1 + 1): a fixed order, four dependent adds
// instead of hsum's sixteen.
ND_AVX512_FN inline float tree_sum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, all, v, v, 0x4E));  // 256-bit halves swapped
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, all, v, v, 0xB1));  // 128-bit quarters swapped in pairs
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, all, v, 0x4E));        // 64-bit pairs
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, all, v, 0xB1));        // neighbours
  return _mm512_cvtss_f32(v);
}

// plane_stats on AVX-512: four independent accumulators (the plane is in L1, just written: one
// accumulator is bound by the add latency, 4 cycles per 16 floats), the last partial vector
// masked, the accumulators combined as (0 + 1) + (2 + 3) and then as a tree.
ND_AVX512_FN void plane_stats_avx512(const float* x, int64_t hw, float& mean, float& m2) {
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 64 <= hw; j += 64)
    for (int q = 0; q < 4; ++q) a[q] = _mm512_add_ps(a[q], _mm512_loadu_ps(x + j + 16 * q));
  for (int q = 0; j < hw; j += 16, ++q) a[q] = _mm512_add_ps(a[q], _mm512_maskz_loadu_ps(lanes(hw - j), x + j));
  const float mu = tree_sum(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]))) / static_cast<float>(hw);
  const __m512 m = _mm512_set1_ps(mu);
  for (auto& v : a) v = _mm512_setzero_ps();
  j = 0;
  for (; j + 64 <= hw; j += 64)
    for (int q = 0; q < 4; ++q) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + j + 16 * q), m);
      a[q] = _mm512_fmadd_ps(d, d, a[q]);
    }
  for (int q = 0; j < hw; j += 16, ++q) {
    const __mmask16 k = lanes(hw - j);
    const __m512 d = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, x + j), m);
    a[q] = _mm512_fmadd_ps(d, d, a[q]);
  }
  mean = mu;
  m2 = tree_sum(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
}
#endif

// (ND_CLONES here and in the BN loops below: these loops stream planes that are still in the
// cache; compiled for the baseline they ran 4 floats at a time.)
ND_CLONES void plane_stats(const float* src, int64_t hw, float& mean, float& m2) {
#ifdef ND_AVX512
  if (use_avx512()) return plane_stats_avx512(src, hw, mean, m2);
#endif
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < hw; ++j) acc += src[j];
  const float mu = acc / static_cast<float>(hw);
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < hw; ++j) sq += (src[j] - mu) * (src[j] - mu);
  mean = mu, m2 = sq;
}

// Mean and sum of squared deviations from it of each [N, C] plane of a batch-norm input,
// computed by the kernel that wrote the plane while it is in cache (empty: not computed).
struct PlaneStats {
  std::vector<float> mean, m2;
  void resize(int64_t planes) { mean.resize(static_cast<size_t>(planes)), m2.resize(static_cast<size_t>(planes)); }
  // Plane k (image-major: n * C + c), just written at p.
  void take(int64_t k, const float* p, int64_t hw) { plane_stats(p, hw, mean[k], m2[k]); }
};

// What follows the normalisation in a fused node: z = (gamma * x_hat + beta) * scale[n] (the
// evaluation network's affine BN, then its drop-path as a per-image scale mask / keep).
// Undefined members are absent (gamma 1, beta 0, scale 1); with none, z is x_hat itself. A
// gamma of one element is the same in every channel (a mixed edge's weight folded into its op's
// last BN: the node takes the weight itself, and its gradient is d gamma summed over the
// channels, with no repeat and no autograd nodes between the weight and the node).
struct OutAffine {
  Tensor gamma, beta, scale;
  bool any() const { return gamma.defined() || beta.defined() || scale.defined(); }
};

// Autograd functions take no undefined tensors: absent optional inputs travel as empty
// placeholders, turned back into undefined tensors inside.
Tensor placeholder(const Tensor& like) { return torch::empty({0}, like.options().requires_grad(false)); }
Tensor present(const Tensor& t) { return t.numel() > 0 ? t : Tensor(); }
OutAffine out_affine(const Tensor& gamma, const Tensor& beta, const Tensor& scale) {
  return OutAffine{present(gamma), present(beta), present(scale)};
}

// Host pointers of an OutAffine's members (null where absent), contiguous float.
struct AffinePtrs {
  Tensor g, b, s;
  const float *gp = nullptr, *bp = nullptr, *sp = nullptr;
  int64_t gs = 1;  // gamma's stride over the channels: 0 for a one-element gamma
  explicit AffinePtrs(const OutAffine& a) : gp(ptr(a.gamma, g)), bp(ptr(a.beta, b)), sp(ptr(a.scale, s)) {
    if (a.gamma.defined() && a.gamma.numel() == 1) gs = 0;
  }
  // The tensor's own data where it is contiguous (no ATen call), else a contiguous copy kept in `keep`.
  static const float* ptr(const Tensor& t, Tensor& keep) {
    if (!t.defined()) return nullptr;
    if (t.is_contiguous()) return t.data_ptr<float>();
    keep = t.detach().contiguous();
    return keep.data_ptr<float>();
  }
  float gamma(int64_t ch) const { return gp ? gp[ch * gs] : 1.f; }
  float beta(int64_t ch) const { return bp ? bp[ch] : 0.f; }
  float scale(int64_t img) const { return sp ? sp[img] : 1.f; }
};

// One element of z = (gamma x_hat + beta) * scale[n] (the own kernels' formula, also in
// bn_forward's fused pass and EvalBn).
inline float affine_value(float v, float gm, float bt, float sc) { return (gm * v + bt) * sc; }

// BatchNorm with running statistics (evaluation mode), then gamma, beta and a per-image scale
// (each optional), applied to a plane where its kernel has just written it, in place: z =
// affine_value((x - mean) * invstd), the same float operations as bn_forward's evaluation
// branch followed by affine_out, in one pass over the cached plane instead of three passes
// (and two temporaries) over the tensor. Only for results no gradient can be asked of
// (no_record below): nothing is kept for a backward.
struct EvalBn {
  static bool applies(const Tensor& x, const Tensor& rm, const Tensor& rv) {
    return own_kernel(x) && rm.defined() && rv.defined() && own_kernel(rm) && own_kernel(rv) && rm.dim() == 1 &&
           rv.dim() == 1;
  }
  // `a`: the affine output's members, undefined where absent.
  EvalBn(const Tensor& rm, const Tensor& rv, double eps, const OutAffine& a) : ap(a) {
    torch::NoGradGuard ng;
    mean = rm.contiguous(), invstd = (rv + eps).rsqrt().contiguous();  // as bn_forward computes it
    mp = mean.data_ptr<float>(), ip = invstd.data_ptr<float>();
  }
  void plane(float* p, int64_t hw, int64_t ch, int64_t img) const {
    const float mu = mp[ch], is = ip[ch];
    if (!ap.gp && !ap.bp && !ap.sp) {
#pragma omp simd
      for (int64_t j = 0; j < hw; ++j) p[j] = (p[j] - mu) * is;
      return;
    }
    const float gm = ap.gamma(ch), bt = ap.beta(ch), s = ap.scale(img);
#pragma omp simd
    for (int64_t j = 0; j < hw; ++j) p[j] = affine_value((p[j] - mu) * is, gm, bt, s);
  }
  // Every plane of a contiguous [N, C, H, W] tensor, in place.
  void apply(Tensor& y) const {
    const int64_t c = y.size(1), hw = y.size(2) * y.size(3);
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, y.size(0) * c, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) plane(yp + i * hw, hw, i % c, i / c);
    });
  }
  AffinePtrs ap;
  Tensor mean, invstd;
  const float *mp = nullptr, *ip = nullptr;
};

// No autograd record can be made of a result computed from `ts` (grad mode off, as under
// InferenceMode or NoGradGuard, or none of them requires grad).
bool no_record(std::initializer_list<const Tensor*> ts) {
  if (!torch::GradMode::is_enabled()) return true;
  for (const Tensor* t : ts)
    if (t->defined() && t->requires_grad()) return false;
  return true;
}

// 1x1 convolution of relu?(x); with `stats`, also each output plane's statistics; with `eb`
// (own kernel only), its evaluation-mode BN applied to each output plane.
Tensor pointwise(const Tensor& x, const Tensor& w, bool relu, PlaneStats* stats = nullptr, const EvalBn* eb = nullptr) {
  if (!own_kernel(x)) return at::conv2d(relu ? at::relu(x) : x, w);
  int64_t xs = 0;
  auto xc = image_major(x, xs);
  auto wc = w.contiguous();
  const int64_t n = xc.size(0), ci = xc.size(1), co = wc.size(0), hw = xc.size(2) * xc.size(3);
  auto y = torch::empty({n, co, xc.size(2), xc.size(3)}, xc.options());
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (stats) stats->resize(n * co);
  for_images(n, [&](int64_t i) {
    pw_image(xp + i * xs, wp, yp + i * co * hw, ci, co, hw, false, relu, nullptr);
    if (eb)
      for (int64_t o = 0; o < co; ++o) eb->plane(yp + (i * co + o) * hw, hw, o, i);
    if (stats)
      for (int64_t o = 0; o < co; ++o) stats->take(i * co + o, yp + (i * co + o) * hw, hw);
  });
  return y;
}

// d/d input of pointwise(x, w, relu) (x: the input; the ReLU mask is applied when `relu`).
Tensor pointwise_grad_input(const Tensor& gy, const Tensor& w, const Tensor& x, bool relu) {
  if (!own_kernel(gy)) {
    auto g = std::get<0>(at::convolution_backward(gy, relu ? at::relu(x) : x, w, c10::nullopt, {1, 1}, {0, 0},
                                                  {1, 1}, false, {0, 0}, 1, {true, false, false}));
    return relu ? g * (x > 0) : g;
  }
  auto gc = gy.contiguous();
  auto wc = w.contiguous();
  int64_t xs = 0;
  auto xc = relu ? image_major(x, xs) : Tensor();
  const int64_t n = gc.size(0), co = gc.size(1), ci = wc.size(1), hw = gc.size(2) * gc.size(3);
  auto gx = torch::empty({n, ci, gc.size(2), gc.size(3)}, gc.options());
  const float *gp = gc.data_ptr<float>(), *wp = wc.data_ptr<float>(), *mp = relu ? xc.data_ptr<float>() : nullptr;
  float* xp = gx.data_ptr<float>();
  for_images(n, [&](int64_t i) {
    pw_image(gp + i * co * hw, wp, xp + i * ci * hw, co, ci, hw, true, false, relu ? mp + i * xs : nullptr);
  });
  return gx;
}

Tensor pointwise_grad_weight(const Tensor& gy, const Tensor& x, const Tensor& w, bool relu) {
  if (!own_kernel(gy))
    return std::get<1>(at::convolution_backward(gy, relu ? at::relu(x) : x, w, c10::nullopt, {1, 1}, {0, 0},
                                                {1, 1}, false, {0, 0}, 1, {false, true, false}));
  auto gc = gy.contiguous();
  int64_t xs = 0;
  auto xc = image_major(x, xs);
  const int64_t n = gc.size(0), co = gc.size(1), ci = xc.size(1), hw = gc.size(2) * gc.size(3);
  Partials part(static_cast<size_t>(image_groups(n) * co * ci));
  const float *gp = gc.data_ptr<float>(), *xp = xc.data_ptr<float>();
  for_image_groups(n, [&](int64_t i, int64_t grp, bool first) {
    thread_local std::vector<float> scratch;
    pw_grad_weight_acc(gp + i * co * hw, xp + i * xs, part.data() + grp * co * ci, ci, co, hw, relu, !first, scratch);
  });
  return sum_partials(part, image_groups(n), co * ci, w.sizes());
}

// Valid input pixels under each 3x3 window (padding 1): the average pool's divisor
// (count_include_pad false), in the phase layout's `wq`-wide output rows, or in the direct form
// (add_direct) in the plane's rows.
std::vector<float> pool_counts(const Geom& g, bool direct = false) {
  const int64_t row = direct ? g.ow : g.wq;
  std::vector<float> count(static_cast<size_t>(direct ? g.nb * 16 : g.len), 1.f);
  for (int64_t oh = 0; oh < g.oh; ++oh)
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const int64_t r0 = std::max<int64_t>(oh * g.s - 1, 0), r1 = std::min<int64_t>(oh * g.s + 2, g.h);
      const int64_t c0 = std::max<int64_t>(ow * g.s - 1, 0), c1 = std::min<int64_t>(ow * g.s + 2, g.w);
      count[oh * row + ow] = static_cast<float>((r1 - r0) * (c1 - c0));
    }
  return count;
}

// 3x3 pooling, padding 1 (average: count_include_pad false).
// The same pooling with ATen's (differentiable) ops: other devices and the double backward.
Tensor aten_pool(const Tensor& x, bool max_pool, int64_t s) {
  return max_pool ? at::max_pool2d(x, {3, 3}, {s, s}, {1, 1}) : at::avg_pool2d(x, {3, 3}, {s, s}, {1, 1}, false, false);
}

// Plane i (= n * C + c) of an image-major tensor (image_major) with image stride xs.
inline const float* plane_at(const float* p, int64_t i, int64_t c, int64_t xs, int64_t plane) {
  return p + (i / c) * xs + (i % c) * plane;
}

// 3x3 pool (padding 1, stride s); with `stats` (own kernel only), also each output plane's
// statistics, computed right after the plane is written (as pointwise does).
Tensor pool(const Tensor& x, bool max_pool, int64_t s, PlaneStats* stats = nullptr) {
  if (!own_kernel(x)) return aten_pool(x, max_pool, s);
  int64_t xs = 0;
  auto xc = image_major(x, xs);
  const int64_t n = xc.size(0), c = xc.size(1);
  const Geom& g = make_geom(xc.size(2), xc.size(3), 3, s, 1, 1);
  const bool direct = direct_form(g);
  auto y = torch::empty({n, c, g.oh, g.ow}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const std::vector<float> count = pool_counts(g, direct);
  const float pad = max_pool ? -std::numeric_limits<float>::infinity() : 0.f;
  const int64_t ohw = g.oh * g.ow;
  if (stats) stats->resize(n * c);
  at::parallel_for(0, n * c, 1, [&](int64_t b, int64_t e) {
#ifdef ND_AVX512
    if (direct) {
      for (int64_t i = b; i < e; ++i) {
        pool_direct_avx512(plane_at(xp, i, c, xs, g.h * g.w), yp + i * ohw, count.data(), g, max_pool);
        if (stats) stats->take(i, yp + i * ohw, ohw);
      }
      return;
    }
#endif
    std::vector<float> buf(static_cast<size_t>(g.buf)), ext(static_cast<size_t>(g.len));
    for (int64_t i = b; i < e; ++i) {
      fill_phases(plane_at(xp, i, c, xs, g.h * g.w), buf.data(), g, false, pad);
      pool_forward_plane(buf.data(), ext.data(), yp + i * ohw, count.data(), g, max_pool);
      if (stats) stats->take(i, yp + i * ohw, ohw);
    }
  });
  return y;
}

// dst += src: one plane of an input gradient added into a sink (GradSink).
ND_CLONES void add_plane(float* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

// `gy_plane` (when given, with an own-kernel x): writes plane k (= image * C + channel) of the
// output gradient into its second argument, in place of reading gy (a BN's input gradient made
// plane by plane where it is consumed, PoolBnFn: never a tensor).
using PlaneSource = std::function<void(int64_t, float*)>;
Tensor pool_backward(const Tensor& gy, const Tensor& x, bool max_pool, int64_t s, GradSink* sink = nullptr,
                     const PlaneSource& gy_plane = {}) {
  TORCH_INTERNAL_ASSERT(!gy_plane || own_kernel(x), "pool_backward: a plane source needs the own kernels");
  if (!own_kernel(x)) {
    if (!max_pool) return at::avg_pool2d_backward(gy, x, {3, 3}, {s, s}, {1, 1}, false, false, c10::nullopt);
    auto idx = std::get<1>(at::max_pool2d_with_indices(x, {3, 3}, {s, s}, {1, 1}));
    return at::max_pool2d_with_indices_backward(gy, x, {3, 3}, {s, s}, {1, 1}, {1, 1}, false, idx);
  }
  int64_t xs = 0;
  auto xc = image_major(x, xs);
  auto gc = gy_plane ? gy : gy.contiguous();
  const int64_t n = xc.size(0), c = xc.size(1);
  const Geom& g = make_geom(xc.size(2), xc.size(3), 3, s, 1, 1);
  const bool direct = direct_form(g);
  Tensor gx;
  bool add = false;  // into a sink that already holds terms: each plane made aside, then added
  if (!sink) gx = torch::empty(xc.sizes(), xc.options());  // contiguous
  const float *xp = xc.data_ptr<float>(), *gp = gy_plane ? nullptr : gc.data_ptr<float>();
  float* gxp = sink ? sink->target(xc, add) : gx.data_ptr<float>();
  const std::vector<float> count = pool_counts(g, direct);
  const int64_t ohw = g.oh * g.ow;
  // Plane i of gy: read in place, or made by gy_plane into the thread's `own` scratch.
  auto gy_at = [&](int64_t i, std::vector<float>& own) -> const float* {
    if (!gy_plane) return gp + i * ohw;
    own.resize(static_cast<size_t>(ohw));
    gy_plane(i, own.data());
    return own.data();
  };
  const float ones[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  at::parallel_for(0, n * c, 1, [&](int64_t b, int64_t e) {
#ifdef ND_AVX512
    // Direct form (stride 1): max, the scatter straight into the zeroed input plane; average, the
    // 3x3 all-ones correlation (its own flip) of grad_out / count, a gather.
    if (direct) {
      const int64_t hw = g.h * g.w;
      std::vector<float> tmp(max_pool ? 0 : static_cast<size_t>((add ? 2 : 1) * hw)), own;
      for (int64_t i = b; i < e; ++i) {
        float* gxi = gxp + i * hw;
        const float* gi = gy_at(i, own);
        if (max_pool) {  // the scatter adds: into a sink's plane as it is
          if (!add) std::fill(gxi, gxi + hw, 0.f);
          max_pool_grad_direct_avx512(plane_at(xp, i, c, xs, hw), gi, gxi, g);
        } else {
          for (int64_t j = 0; j < hw; ++j) tmp[j] = gi[j] / count[j];
          dw_direct_avx512(tmp.data(), ones, add ? tmp.data() + hw : gxi, g, nullptr);
          if (add) add_plane(gxi, tmp.data() + hw, hw);
        }
      }
      return;
    }
#endif
    std::vector<float> buf(static_cast<size_t>(g.buf)), gbuf(static_cast<size_t>(g.buf));
    std::vector<float> ext(static_cast<size_t>(g.len)), gext(static_cast<size_t>(g.len)), tmp(static_cast<size_t>(g.len));
    std::vector<float> aside(add ? static_cast<size_t>(g.h * g.w) : 0), own;
    for (int64_t i = b; i < e; ++i) {
      extend_grad(gy_at(i, own), gext.data(), g);
      if (max_pool) {
        fill_phases(plane_at(xp, i, c, xs, g.h * g.w), buf.data(), g, false, -std::numeric_limits<float>::infinity());
        std::fill(gbuf.begin(), gbuf.end(), 0.f);
#ifdef ND_AVX512
        if (use_avx512()) {
          max_pool_grad_avx512(buf.data(), gext.data(), gbuf.data(), g);
        } else if (use_avx2()) {
          max_pool_grad_avx2(buf.data(), gext.data(), gbuf.data(), g);
        } else
#endif
        {
          pool_forward_plane(buf.data(), ext.data(), tmp.data(), count.data(), g, true);
          max_pool_grad_plane(buf.data(), ext.data(), gext.data(), tmp.data(), gbuf.data(), g);
        }
      } else {
        for (int64_t j = 0; j < g.len; ++j) gext[j] /= count[j];
        dw_grad_input_plane(gext.data(), ones, gbuf.data(), g);
      }
      float* gxi = gxp + i * g.h * g.w;
      gather_phases(gbuf.data(), plane_at(xp, i, c, xs, g.h * g.w), add ? aside.data() : gxi, g, false);
      if (add) add_plane(gxi, aside.data(), g.h * g.w);
    }
  });
  return gx;
}

// ---- Depthwise backward, one plane at a time -------------------------------------------------
// Shared by depthwise_conv2d_backward (plane by plane) and the fused chain (image by image).
// Stride 1: the input gradient is the forward kernel (registers accumulate across the taps, one
// store per value) run on grad_out padded by (k - 1) d - pad, with the kernel flipped. Other
// strides: the scatter of dw_grad_input_plane into the phase layout, then gather_phases.
struct DwBackward {
  const Geom& g;
  const Geom* gg = nullptr;  // the stride-1 input gradient's geometry (gather_form)
  bool gather_form = false, relu = false, need_input = false, need_weight = false;
  int64_t kk = 0;
  const float* w = nullptr;
  std::vector<float> flipped;
  struct Scratch {
    std::vector<float> buf, ext, gbuf, gext;
  };

  DwBackward(const Geom& geom, const float* weights, int64_t c, bool relu_input, bool need_in, bool need_w)
      : g(geom), relu(relu_input), need_input(need_in), need_weight(need_w), kk(g.k * g.k), w(weights) {
    const int64_t back_pad = (g.k - 1) * g.d - g.p;
    gather_form = need_input && g.s == 1 && back_pad >= 0;
    if (!gather_form) return;
    gg = &make_geom(g.oh, g.ow, g.k, 1, back_pad, g.d);
    TORCH_CHECK(gg->oh == g.h && gg->ow == g.w, "depthwise backward: bad geometry");
    flipped.resize(static_cast<size_t>(c * kk));
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t t = 0; t < kk; ++t) flipped[ch * kk + t] = w[ch * kk + kk - 1 - t];
  }

  void size(Scratch& sc) const {
    sc.buf.resize(static_cast<size_t>(g.buf));
    sc.ext.resize(static_cast<size_t>(g.len));
    sc.gbuf.resize(static_cast<size_t>(gather_form ? gg->buf : 0));
    sc.gext.resize(static_cast<size_t>(gather_form ? gg->len : 0));
  }

  // Channel ch: go its grad_out plane, x its input plane, xbuf x already relu'd in the phase
  // layout, or in the direct form as a plain plane (null: made here when needed), gx / part
  // (kk floats) the outputs asked for.
  void plane(int64_t ch, const float* go, const float* x, const float* xbuf, float* gx, float* part, Scratch& sc) const {
    const bool direct = direct_form(g);
    if ((need_weight && !direct) || !gather_form) extend_grad(go, sc.ext.data(), g);
    if (need_weight && direct) {
#ifdef ND_AVX512
      if (!xbuf && relu && rows_form(g)) dw_grad_weight_rows<true>(x, go, part, g);  // ReLU on load
      else {
        if (!xbuf && relu) relu_plane(x, sc.buf.data(), g.h * g.w), xbuf = sc.buf.data();
        dw_grad_weight_direct_avx512(xbuf ? xbuf : x, go, part, g);
      }
#endif
    } else if (need_weight) {
      if (!xbuf) fill_phases(x, sc.buf.data(), g, relu), xbuf = sc.buf.data();
      dw_grad_weight_plane(xbuf, sc.ext.data(), part, g);
    }
    if (need_input && gather_form) {
      dw_plane(go, flipped.data() + ch * kk, gx, *gg, false, sc.gbuf.data(), sc.gext.data(), relu ? x : nullptr);
    } else if (need_input) {
      dw_grad_input_plane(sc.ext.data(), w + ch * kk, sc.buf.data(), g);
      gather_phases(sc.buf.data(), x, gx, g, relu);
    }
  }
};

// ---- BatchNorm (non-affine) with a backward from its output ----------------------------------
struct BnParams {
  bool training;
  double momentum;
  double eps;
};

// What BatchNorm2dImpl::forward would use, with its batch counter advanced as it would.
BnParams bn_params(torch::nn::BatchNorm2dImpl& bn) {
  const auto& o = bn.options;
  BnParams p{bn.is_training() || !o.track_running_stats(), o.momentum().value_or(0.0), o.eps()};
  if (bn.is_training() && o.track_running_stats() && bn.num_batches_tracked.defined()) {
    auto& nbt = bn.num_batches_tracked;
    if (nbt.device().is_cpu() && nbt.scalar_type() == torch::kLong && nbt.numel() == 1) {
      const int64_t count = ++*nbt.data_ptr<int64_t>();  // no ATen call on the main thread per BN
      if (!o.momentum()) p.momentum = 1.0 / static_cast<double>(count);
    } else {
      torch::NoGradGuard ng;
      nbt += 1;
      if (!o.momentum()) p.momentum = 1.0 / nbt.item<double>();
    }
  }
  return p;
}

bool affine_own(const Tensor& y, const OutAffine& a) {
  auto ok = [](const Tensor& t) { return !t.defined() || (own_kernel(t) && t.dim() == 1); };
  return own_kernel(y) && y.is_contiguous() && y.dim() == 4 && ok(a.gamma) && ok(a.beta) && ok(a.scale);
}

// dst[n, c] = f(src[n, c], gamma[c], beta[c], scale[n]), plane by plane in parallel (own kernels:
// affine_own(src, a)).
template <typename F>
Tensor affine_planes(const Tensor& src, const OutAffine& a, const F& f) {
  const int64_t c = src.size(1), hw = src.size(2) * src.size(3);
  auto dst = torch::empty_like(src);
  const AffinePtrs ap(a);
  const float* sp = src.data_ptr<float>();
  float* dp = dst.data_ptr<float>();
  at::parallel_for(0, src.size(0) * c, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float gm = ap.gamma(i % c), bt = ap.beta(i % c), sc = ap.scale(i / c);
      const float* sr = sp + i * hw;
      float* dr = dp + i * hw;
#pragma omp simd
      for (int64_t j = 0; j < hw; ++j) dr[j] = f(sr[j], gm, bt, sc);
    }
  });
  return dst;
}

// A per-channel vector (or a one-element one, the same in every channel) as [1, C, 1, 1] to
// broadcast over a batch of c channels.
Tensor channel_view(const Tensor& t, int64_t c) {
  return t.numel() == 1 ? t.reshape({1, 1, 1, 1}) : t.view({1, c, 1, 1});
}

// OutAffine applied with ATen's (differentiable) ops: other devices and the double backward.
Tensor affine_differentiable(const Tensor& y, const Tensor& gamma, const Tensor& beta, const Tensor& scale) {
  const auto cv = std::vector<int64_t>{1, y.size(1), 1, 1};
  auto z = gamma.defined() ? y * channel_view(gamma, y.size(1)) : y;
  if (beta.defined()) z = z + beta.view(cv);
  return scale.defined() ? z * scale.view({-1, 1, 1, 1}) : z;
}

// z from x_hat (ATen ops where the own kernels do not apply).
Tensor affine_out(const Tensor& y, const OutAffine& a) {
  if (!a.any()) return y;
  if (!affine_own(y, a)) return affine_differentiable(y, a.gamma, a.beta, a.scale);
  return affine_planes(y, a, affine_value);
}

// ---- Saving the output instead of x_hat ------------------------------------------------------
// With affine BN and no drop-path scale, a node's output z = gamma x_hat + beta is kept for the
// backward instead of x_hat, and x_hat = (z - beta) / gamma recovered there: z is usually kept
// anyway by its consumers (the next chain of a separable convolution, a cell's edges), so x_hat
// then costs no memory of its own. Only when that loses no precision: every channel has
// |gamma| >= 1e-2 and |beta| <= 8 |gamma| (the recovered x_hat is then within ~20 float
// roundings of the computed one); otherwise x_hat itself is kept. Without beta (a mixed edge's
// weight as gamma, fused_relu_dw_pw_bn) x_hat = z / gamma is within two roundings while gamma is
// far from the subnormal floats: |gamma| >= 1e-20.
bool x_hat_recoverable(const OutAffine& a) {
  if (!a.gamma.defined() || a.scale.defined()) return false;
  const float lo = a.beta.defined() ? 1e-2f : 1e-20f;
  auto own = [&](const Tensor& t) { return own_kernel(t) && t.is_contiguous() && t.numel() == a.gamma.numel(); };
  if (own(a.gamma) && (!a.beta.defined() || own(a.beta))) {  // read in place: no ATen call
    const float* gp = a.gamma.data_ptr<float>();
    const float* bp = a.beta.defined() ? a.beta.data_ptr<float>() : nullptr;
    for (int64_t c = 0; c < a.gamma.numel(); ++c)
      if (!(std::fabs(gp[c]) >= lo) || !(std::fabs(bp ? bp[c] : 0.f) <= 8.f * std::fabs(gp[c]))) return false;
    return true;
  }
  auto g = a.gamma.detach(), b = a.beta.defined() ? a.beta.detach() : torch::zeros_like(g);
  return (g.abs() >= lo).all().item<bool>() && (b.abs() <= 8 * g.abs()).all().item<bool>();
}

// x_hat from one element of the output, with rg = 1 / gamma: a multiply, not a division (the
// small-plane backward was compute-bound on the division).
inline float x_hat_value(float z, float bt, float rg) { return (z - bt) * rg; }

Tensor x_hat_from_output(const Tensor& z, const OutAffine& a) {
  if (!affine_own(z, a)) {
    const auto cv = std::vector<int64_t>{1, z.size(1), 1, 1};
    return (a.beta.defined() ? z - a.beta.view(cv) : z) / channel_view(a.gamma, z.size(1));
  }
  return affine_planes(z, a, [](float v, float gm, float bt, float) { return x_hat_value(v, bt, 1.f / gm); });
}

// bn_forward's normalisation of one plane: dst = x_hat = (src - mu) is, and zr (when given) the
// affine output; with z_over_x, dst is the affine output alone.
ND_CLONES void bn_normalize_plane(const float* src, float* dst, float* zr, int64_t hw, float mu, float is, bool z_over_x,
                                  float gm, float bt, float sc) {
  if (z_over_x) {
#pragma omp simd
    for (int64_t j = 0; j < hw; ++j) dst[j] = affine_value((src[j] - mu) * is, gm, bt, sc);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < hw; ++j) dst[j] = (src[j] - mu) * is;
  if (!zr) return;
#pragma omp simd
  for (int64_t j = 0; j < hw; ++j) zr[j] = affine_value(dst[j], gm, bt, sc);
}

// running = (1 - momentum) running + momentum batch, for the mean (float) and the unbiased
// variance (double, rounded to float first), as ATen's rm.mul_(1 - m).add_(mean, m) computes it
// (float multiply, then a fused multiply-add: the same bits), in a loop over the channels
// instead of five ATen calls per BN (a few microseconds each, on the main thread, between the
// parallel kernels).
void update_running_stats(const Tensor& rm, const Tensor& rv, const Tensor& mean, std::vector<double>& var_unbiased,
                          double momentum) {
  const int64_t c = static_cast<int64_t>(var_unbiased.size());
  auto fits = [c](const Tensor& t) { return own_kernel(t) && t.is_contiguous() && t.numel() == c; };
  if (!fits(rm) || !fits(rv)) {
    torch::NoGradGuard ng;
    auto vu = torch::from_blob(var_unbiased.data(), {c}, torch::kDouble).to(rv.dtype());
    rm.mul_(1 - momentum).add_(mean, momentum);
    rv.mul_(1 - momentum).add_(vu, momentum);
    return;
  }
  const float keep = static_cast<float>(1 - momentum), m = static_cast<float>(momentum);
  const float* mp = mean.data_ptr<float>();
  float *rmp = rm.data_ptr<float>(), *rvp = rv.data_ptr<float>();
  for (int64_t ch = 0; ch < c; ++ch) {
    rmp[ch] = std::fma(mp[ch], m, rmp[ch] * keep);
    rvp[ch] = std::fma(static_cast<float>(var_unbiased[ch]), m, rvp[ch] * keep);
  }
}

// y = BN(x); returns (y, mean, invstd) with the statistics it normalised with.
// `stats`: the planes' statistics when the caller's kernel computed them; `in_place`: x is a
// temporary of the caller's and may be overwritten by the output; `z_only` (with in_place and
// an affine output z): the caller keeps z, not y, so z overwrites x (training mode, own kernel;
// y is then undefined).
std::tuple<Tensor, Tensor, Tensor> bn_forward(const Tensor& x, const Tensor& rm, const Tensor& rv,
                                             const BnParams& p, const PlaneStats* stats = nullptr,
                                             bool in_place = false, const OutAffine* aff = nullptr,
                                             Tensor* z = nullptr, bool z_only = false) {
  if (!p.training) {
    auto invstd = (rv + p.eps).rsqrt();
    const auto view = std::vector<int64_t>{1, x.size(1), 1, 1};
    auto y = (x - rm.view(view)) * invstd.view(view);
    if (z) *z = affine_out(y, *aff);
    return {y, rm.clone(), invstd};
  }
  const bool own_z = z && aff->any() && affine_own(x, *aff);
  if (!own_kernel(x) || !x.is_contiguous() || x.dim() != 4) {
    auto r = at::native_batch_norm(x, {}, {}, rm, rv, p.training, p.momentum, p.eps);
    if (z) *z = affine_out(std::get<0>(r), *aff);
    return r;
  }
  // Own kernel. The threads split the batch by images, as the convolution kernels do, so each
  // thread reads the planes it has just written (still in its cache). Per plane: the mean and
  // the sum of squared deviations from it (two passes over the cached plane); per channel they
  // are combined in double in image order (Chan et al.), then every plane is normalised.
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  auto y = in_place ? x : torch::empty_like(x);
  auto mean = torch::empty({c}, x.options()), invstd = torch::empty({c}, x.options());
  std::vector<double> var_unbiased(static_cast<size_t>(c));
  const float* xp = x.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *mp = mean.data_ptr<float>(), *ip = invstd.data_ptr<float>();
  const double count = static_cast<double>(n * hw);
  PlaneStats own;
  if (!stats || static_cast<int64_t>(stats->mean.size()) != n * c) {
    own.resize(n * c);
    at::parallel_for(0, n * c, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) own.take(i, xp + i * hw, hw);
    });
    stats = &own;
  }
  const std::vector<float>&pmean = stats->mean, &pm2 = stats->m2;
  for (int64_t ch = 0; ch < c; ++ch) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(pmean[i * c + ch]) * static_cast<double>(hw);
    const double mu = sum / count;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double dm = static_cast<double>(pmean[i * c + ch]) - mu;
      ss += static_cast<double>(pm2[i * c + ch]) + static_cast<double>(hw) * dm * dm;
    }
    const double var = ss / count;
    mp[ch] = static_cast<float>(mu);
    ip[ch] = static_cast<float>(1.0 / std::sqrt(var + p.eps));
    var_unbiased[ch] = count > 1 ? ss / (count - 1) : var;
  }
  // With an affine output z (own_z), both x_hat and z are written in the same pass; with
  // z_only, z alone, over x.
  const bool z_over_x = own_z && z_only && in_place;
  Tensor zt = own_z ? (z_over_x ? y : torch::empty_like(x)) : Tensor();
  const AffinePtrs ap(own_z ? *aff : OutAffine{});
  float* zp = own_z ? zt.data_ptr<float>() : nullptr;
  at::parallel_for(0, n * c, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      bn_normalize_plane(xp + i * hw, yp + i * hw, zp && !z_over_x ? zp + i * hw : nullptr, hw, mp[i % c], ip[i % c],
                         z_over_x, ap.gamma(i % c), ap.beta(i % c), ap.scale(i / c));
    }
  });
  if (z) *z = own_z ? zt : affine_out(y, *aff);
  if (z_over_x) y = Tensor();
  if (rm.defined()) update_running_stats(rm, rv, mean, var_unbiased, p.momentum);
  return {y, mean, invstd};
}

// Gradients of z = (gamma * BN(x) + beta) * scale[n] (OutAffine; plain BN when it has no
// members) from y = x_hat and 1/std: with g' = g * scale[n], d beta = sum g', d gamma =
// sum g' y, and d x = invstd * (gamma g' - mean(gamma g') - y * mean(gamma g' y)) in training
// mode, invstd * gamma g' with running statistics. `need_affine`: compute d gamma and d beta.
struct BnGrads {
  Tensor x, gamma, beta;
};

// BnBackwardPlan's loops over one plane (g: its gradient, y: x_hat, or with from_out the
// output z, x_hat recovered as (z - beta) / gamma): the sums of g and g x_hat; and the input
// gradient is (k g - a1 - x_hat a2).
ND_CLONES void bn_plane_sums(const float* gr, const float* yr, int64_t hw, bool from_out, float rg, float bt, float& s1,
                             float& s2) {
  float a = 0.f, b = 0.f;
  if (from_out) {
#pragma omp simd reduction(+ : a, b)
    for (int64_t j = 0; j < hw; ++j) a += gr[j], b += gr[j] * x_hat_value(yr[j], bt, rg);
  } else {
#pragma omp simd reduction(+ : a, b)
    for (int64_t j = 0; j < hw; ++j) a += gr[j], b += gr[j] * yr[j];
  }
  s1 = a, s2 = b;
}

ND_CLONES void bn_grad_plane(const float* gr, const float* yr, float* orow, int64_t hw, bool from_out, float rg,
                             float bt, float is, float k, float a1, float a2) {
  if (from_out) {
#pragma omp simd
    for (int64_t j = 0; j < hw; ++j) orow[j] = is * (k * gr[j] - a1 - x_hat_value(yr[j], bt, rg) * a2);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < hw; ++j) orow[j] = is * (k * gr[j] - a1 - yr[j] * a2);
  }
}

// The own-kernel form in two halves: the constructor reads g and the saved tensor once (per-plane
// sums of g and g x_hat, per-channel totals in double in image order, d gamma, d beta); image(i, dst)
// then writes one image's d x, so that a consumer can compute it where it is used, in cache
// (dw_pw_backward), instead of reading a whole tensor of it back. The saved tensor is x_hat, or
// the node's output z when `from_out` (x_hat = (z - beta) / gamma on the fly, never a tensor).
// g is read where it is when each image of it is contiguous (image_major: a channel slice of a
// cell's output gradient is), not copied.
struct BnBackwardPlan {
  static bool applies(const Tensor& g, const Tensor& saved, const Tensor& invstd, const OutAffine& a) {
    return own_kernel(g) && own_kernel(saved) && saved.is_contiguous() && g.dim() == 4 && invstd.is_contiguous() &&
           invstd.scalar_type() == torch::kFloat && affine_own(saved, a);
  }

  BnBackwardPlan(const Tensor& g, const Tensor& saved, bool from_out, const Tensor& invstd, bool training,
                 const OutAffine& a, bool need_affine)
      : gc(image_major(g, g_img)), saved(saved), invstd(invstd), ap(a), from_out(from_out) {
    n = gc.size(0), c = gc.size(1), hw = gc.size(2) * gc.size(3);
    gp = gc.data_ptr<float>(), yp = saved.data_ptr<float>(), ip = invstd.data_ptr<float>();
    m1.assign(static_cast<size_t>(c), 0.f), m2.assign(static_cast<size_t>(c), 0.f);
    if (!training && !need_affine) return;
    const double count = static_cast<double>(n * hw);
    std::vector<float> psg(static_cast<size_t>(n * c)), psgy(static_cast<size_t>(n * c));
    at::parallel_for(0, n * c, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        float s1 = 0.f, s2 = 0.f;
        bn_plane_sums(plane_at(gp, i, c, g_img, hw), yp + i * hw, hw, this->from_out, 1.f / ap.gamma(i % c), ap.beta(i % c),
                      s1, s2);
        const float scl = ap.scale(i / c);
        psg[i] = s1 * scl, psgy[i] = s2 * scl;
      }
    });
    // A one-element gamma's gradient is the sum over the channels (in double, channel order).
    if (need_affine) dgamma = torch::empty({ap.gs ? c : 1}, gc.options()), dbeta = torch::empty({c}, gc.options());
    double sgy_all = 0;
    for (int64_t ch = 0; ch < c; ++ch) {
      double sg = 0, sgy = 0;
      for (int64_t i = 0; i < n; ++i) sg += psg[i * c + ch], sgy += psgy[i * c + ch];
      sgy_all += sgy;
      if (need_affine) {
        if (ap.gs) dgamma.data_ptr<float>()[ch] = static_cast<float>(sgy);
        dbeta.data_ptr<float>()[ch] = static_cast<float>(sg);
      }
      if (training) {
        const double gm = ap.gamma(ch);
        m1[ch] = static_cast<float>(gm * sg / count), m2[ch] = static_cast<float>(gm * sgy / count);
      }
    }
    if (need_affine && !ap.gs) dgamma.data_ptr<float>()[0] = static_cast<float>(sgy_all);
  }

  // dst [c, hw] = d loss / d (BN input) of image i.
  void image(int64_t i, float* dst) const {
    for (int64_t ch = 0; ch < c; ++ch) plane(i * c + ch, dst + ch * hw);
  }

  // dst [hw] = the same of plane k = i * C + ch alone (image(i) is its C planes).
  void plane(int64_t k, float* dst) const {
    const int64_t ch = k % c;
    const float kg = ap.gamma(ch) * ap.scale(k / c);
    bn_grad_plane(plane_at(gp, k, c, g_img, hw), yp + k * hw, dst, hw, from_out, 1.f / ap.gamma(ch), ap.beta(ch), ip[ch], kg,
                  m1[ch], m2[ch]);
  }

  Tensor whole() const {
    auto gx = torch::empty(gc.sizes(), gc.options());
    float* op = gx.data_ptr<float>();
    for_images(n, [&](int64_t i) { image(i, op + i * c * hw); });
    return gx;
  }

  int64_t g_img = 0;  // g's image stride (image_major)
  Tensor gc, saved, invstd, dgamma, dbeta;
  AffinePtrs ap;
  bool from_out;
  int64_t n = 0, c = 0, hw = 0;
  const float *gp = nullptr, *yp = nullptr, *ip = nullptr;
  std::vector<float> m1, m2;
};

BnGrads bn_backward_affine(const Tensor& g, const Tensor& y, const Tensor& mean, const Tensor& invstd, bool training,
                           double eps, const OutAffine& a, bool need_affine, bool from_out = false) {
  const auto view = std::vector<int64_t>{1, invstd.size(0), 1, 1};
  BnGrads r;
  if (BnBackwardPlan::applies(g, y, invstd, a)) {
    const BnBackwardPlan plan(g, y, from_out, invstd, training, a, need_affine);
    return {plan.whole(), plan.dgamma, plan.dbeta};
  }
  const Tensor xh = from_out ? x_hat_from_output(y, a) : y;
  auto gs = a.scale.defined() ? g * a.scale.view({-1, 1, 1, 1}) : g;
  if (need_affine) r.beta = gs.sum({0, 2, 3}), r.gamma = (gs * xh).sum({0, 2, 3});
  if (need_affine && a.gamma.defined() && a.gamma.numel() == 1) r.gamma = r.gamma.sum().reshape_as(a.gamma);
  if (a.gamma.defined()) gs = gs * channel_view(a.gamma, g.size(1));
  if (!training) {
    r.x = gs * invstd.view(view);
    return r;
  }
  auto zero = torch::zeros_like(invstd), one = torch::ones_like(invstd);
  auto gx = std::get<0>(at::native_batch_norm_backward(gs.contiguous(), xh, {}, {}, {}, zero, one, true,
                                                       eps, {true, false, false}));
  r.x = gx.mul_(invstd.view(view));
  return r;
}

// d gamma and d beta of an affine output alone (its input's gradient not asked): the own
// kernels' sums pass, without writing an input gradient.
BnGrads bn_affine_grads(const Tensor& g, const Tensor& saved, const Tensor& mean, const Tensor& invstd, bool training,
                        double eps, const OutAffine& a, bool from_out) {
  if (!BnBackwardPlan::applies(g, saved, invstd, a)) return bn_backward_affine(g, saved, mean, invstd, training, eps, a, true, from_out);
  const BnBackwardPlan plan(g, saved, from_out, invstd, /*training=*/false, a, true);
  return {Tensor(), plan.dgamma, plan.dbeta};
}

// Differentiable (ATen ops) BN with the given mode, for the double-backward path.
Tensor bn_differentiable(const Tensor& x, const Tensor& mean, const Tensor& invstd, bool training,
                         double eps) {
  if (training) return at::batch_norm(x, {}, {}, {}, {}, true, 0.0, eps, false);
  const auto view = std::vector<int64_t>{1, invstd.size(0), 1, 1};
  return (x - mean.view(view)) * invstd.view(view);
}

// ---- ReLU-depthwise-1x1 image by image (CPU float) --------------------------------------------
// The depthwise output of one image (and in the backward the gradient flowing into it) lives
// in the thread's scratch, in cache, between the two convolutions: it is never a tensor, and
// the pair is one parallel loop instead of two.
bool dw_pw_own(const Tensor& x, const Tensor& w_dw) {
  return own_kernel(x) && x.dim() == 4 && w_dw.dim() == 4 && w_dw.size(2) == w_dw.size(3) &&
         w_dw.size(2) * w_dw.size(3) <= kMaxTaps;
}

// pointwise(depthwise(relu(x))), with each output plane's statistics (`stats`) or its
// evaluation-mode BN applied (`eb`; either may be null).
Tensor dw_pw_forward(const Tensor& x, const Tensor& w_dw, const Tensor& w_pw, int64_t s, int64_t pad, int64_t dil,
                     PlaneStats* stats, const EvalBn* eb = nullptr) {
  int64_t xs = 0;
  auto xc = image_major(x, xs), wd = w_dw.contiguous(), wp = w_pw.contiguous();
  const int64_t n = xc.size(0), c = xc.size(1), co = wp.size(0);
  const Geom& g = make_geom(xc.size(2), xc.size(3), wd.size(2), s, pad, dil);
  TORCH_CHECK(g.oh > 0 && g.ow > 0, "depthwise_conv2d: input ", x.sizes(), " too small for the kernel");
  const int64_t plane = g.h * g.w, ohw = g.oh * g.ow, kk = g.k * g.k;
  auto y = torch::empty({n, co, g.oh, g.ow}, xc.options());
  const float *xp = xc.data_ptr<float>(), *wdp = wd.data_ptr<float>(), *wpp = wp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (stats) stats->resize(n * co);
  for_images(n, [&](int64_t i) {
    thread_local std::vector<float> buf, ext, d;
    buf.resize(static_cast<size_t>(g.buf)), ext.resize(static_cast<size_t>(g.len)), d.resize(static_cast<size_t>(c * ohw));
    for (int64_t ch = 0; ch < c; ++ch) {
      dw_plane(xp + i * xs + ch * plane, wdp + ch * kk, d.data() + ch * ohw, g, true, buf.data(), ext.data());
    }
    float* yi = yp + i * co * ohw;
    pw_image(d.data(), wpp, yi, c, co, ohw, false, false, nullptr);
    for (int64_t o = 0; o < co; ++o) {
      if (eb) eb->plane(yi + o * ohw, ohw, o, i);
      if (stats) stats->take(i * co + o, yi + o * ohw, ohw);
    }
  });
  return y;
}

// Gradients of pointwise(depthwise(relu(x))) from gp = d loss / d its output: {x, w_dw, w_pw},
// undefined where not asked for. The depthwise output is recomputed (for the 1x1 weight
// gradient only): in the direct form straight from x, else from phase buffers of x that then
// also serve the depthwise weight gradient.
// `gp_of(i, scratch)`: image i's gradient [co, oh, ow] (a pointer into a tensor, or computed into
// the thread's `scratch`: BnBackwardPlan::image).
using GpOf = std::function<const float*(int64_t, std::vector<float>&)>;
std::array<Tensor, 3> dw_pw_backward(const GpOf& gp_of, at::IntArrayRef gp_sizes, const Tensor& x, const Tensor& w_dw,
                                     const Tensor& w_pw, int64_t s, int64_t pad, int64_t dil, bool need_x, bool need_dw,
                                     bool need_pw, GradSink* sink = nullptr) {
  int64_t xs = 0;
  auto xc = image_major(x, xs), wd = w_dw.contiguous(), wp = w_pw.contiguous();
  const int64_t n = xc.size(0), c = xc.size(1), co = wp.size(0);
  const Geom& g = make_geom(xc.size(2), xc.size(3), wd.size(2), s, pad, dil);
  // Both depthwise gradients asked: x's relu'd copies (phase buffers, or in the direct form
  // plain planes) serve the recomputation and the weight gradient.
  // In the row-block form both take relu(x) from x itself: no copies.
  const bool direct = direct_form(g), rows = direct && rows_form(g), keep_x = need_pw && need_dw && !rows;
  const int64_t xb_size = direct ? g.h * g.w : g.buf;
  TORCH_CHECK(gp_sizes.size() == 4 && gp_sizes[1] == co && gp_sizes[2] == g.oh && gp_sizes[3] == g.ow,
              "fused chain backward: grad shape ", gp_sizes);
  const int64_t plane = g.h * g.w, ohw = g.oh * g.ow, kk = g.k * g.k;
  const float *xp = xc.data_ptr<float>(), *wdp = wd.data_ptr<float>(), *wpp = wp.data_ptr<float>();
  std::array<Tensor, 3> out;
  // The input gradient: out[0] (contiguous), or with a sink its buffer (out[0] stays undefined);
  // `add`: the buffer holds terms already, so each plane is made aside and added while in cache.
  bool add = false;
  if (need_x && !sink) out[0] = torch::empty(xc.sizes(), xc.options());  // contiguous
  float* gxp = !need_x ? nullptr : sink ? sink->target(xc, add) : out[0].data_ptr<float>();
  Partials part_dw(need_dw ? static_cast<size_t>(n * c * kk) : 0),
      part_pw(need_pw ? static_cast<size_t>(image_groups(n) * co * c) : 0);
  const DwBackward db(g, wdp, c, /*relu_input=*/true, need_x, need_dw);
  for_image_groups(n, [&](int64_t i, int64_t grp, bool first) {
    thread_local DwBackward::Scratch sc;
    thread_local std::vector<float> xbufs, ext, d, gd, gemm_scratch, gp_scratch, aside;
    db.size(sc);
    const float* gi = gp_of(i, gp_scratch);
    if (need_pw) {
      xbufs.resize(static_cast<size_t>((keep_x ? c : 1) * xb_size)), ext.resize(static_cast<size_t>(g.len));
      d.resize(static_cast<size_t>(c * ohw));
      for (int64_t ch = 0; ch < c; ++ch) {
        float* xb = xbufs.data() + (keep_x ? ch * xb_size : 0);
        if (direct) {  // row blocks: the ReLU on load; flat blocks: relu(x) into xb, kept for db
          dw_plane(xp + i * xs + ch * plane, wdp + ch * kk, d.data() + ch * ohw, g, true, xb, nullptr);
        } else {
          fill_phases(xp + i * xs + ch * plane, xb, g, true);
          dw_forward_plane(xb, wdp + ch * kk, ext.data(), d.data() + ch * ohw, g);
        }
      }
      pw_grad_weight_acc(gi, d.data(), part_pw.data() + grp * co * c, c, co, ohw, false, !first, gemm_scratch);
    }
    if (need_x || need_dw) {
      gd.resize(static_cast<size_t>(c * ohw));
      pw_image(gi, wpp, gd.data(), co, c, ohw, true, false, nullptr);
      if (add) aside.resize(static_cast<size_t>(plane));
      for (int64_t ch = 0; ch < c; ++ch) {
        float* gxc = need_x ? gxp + (i * c + ch) * plane : nullptr;
        db.plane(ch, gd.data() + ch * ohw, xp + i * xs + ch * plane, keep_x ? xbufs.data() + ch * xb_size : nullptr,
                 add ? aside.data() : gxc, need_dw ? part_dw.data() + (i * c + ch) * kk : nullptr, sc);
        if (add) add_plane(gxc, aside.data(), plane);
      }
    }
  });
  if (need_dw) out[1] = sum_partials(part_dw, n, c * kk, w_dw.sizes());
  if (need_pw) out[2] = sum_partials(part_pw, image_groups(n), co * c, w_pw.sizes());
  return out;
}

// ---- Autograd nodes ------------------------------------------------------------------------
// The double-backward path of a fused node: d out / d sv[i] (weighted by g) for the saved inputs
// i < need.size() that need it, with a graph (create_graph), into out[i]; `out` otherwise empty.
void grad_of_recomputation(const Tensor& recomputed, const variable_list& sv, const std::vector<int64_t>& need,
                           const Tensor& g, variable_list& out) {
  variable_list ins;
  std::vector<size_t> idx;
  for (size_t i = 0; i < need.size(); ++i)
    if (need[i] && sv[i].defined() && sv[i].requires_grad()) ins.push_back(sv[i]), idx.push_back(i);
  if (ins.empty()) return;
  auto gs = torch::autograd::grad({recomputed}, ins, {g}, /*retain_graph=*/true, /*create_graph=*/true, true);
  for (size_t j = 0; j < idx.size(); ++j) out[idx[j]] = gs[j];
}

// (gamma * BN(conv1x1(depthwise(relu(x)))) + beta) * scale[n] or, with an empty depthwise
// weight, the same of conv1x1(relu(x)). gamma, beta, scale: undefined when absent (the search
// network's non-affine BN has none; the evaluation network's has gamma and beta, and its last
// chain of an op the drop-path scale).
struct ChainFn : torch::autograd::Function<ChainFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w_dw, const Tensor& w_pw,
                        const Tensor& gamma, const Tensor& beta, const Tensor& scale, const Tensor& rm,
                        const Tensor& rv, bool training, double momentum, double eps, int64_t stride, int64_t pad,
                        int64_t dil) {
    const bool has_dw = w_dw.numel() > 0;  // an empty placeholder: no depthwise convolution
    const OutAffine aff = out_affine(gamma, beta, scale);
    const bool from_out = aff.any() && x_hat_recoverable(aff);  // z is kept, x_hat recovered from it
    Tensor y, mean, invstd, z;
    {
      PlaneStats st;
      auto p = !has_dw             ? pointwise(x, w_pw, /*relu=*/true, &st)
               : dw_pw_own(x, w_dw) ? dw_pw_forward(x, w_dw, w_pw, stride, pad, dil, &st)
                                    : pointwise(depthwise_conv2d(x, w_dw, stride, pad, dil, /*relu_input=*/true), w_pw, false, &st);
      std::tie(y, mean, invstd) = bn_forward(p, rm, rv, {training, momentum, eps}, &st, /*in_place=*/true,
                                             aff.any() ? &aff : nullptr, aff.any() ? &z : nullptr, from_out);
    }
    // x serves only its own and the weights' gradients: not kept when none is needed (a search
    // edge on the stem's output in the architecture step, where only the mixing weight as gamma
    // needs one).
    const bool keep_x = x.requires_grad() || (has_dw && w_dw.requires_grad()) || w_pw.requires_grad();
    ctx->save_for_backward({keep_x ? x : Tensor(), w_dw, w_pw, gamma, beta, scale, from_out ? z : y, mean, invstd});
    ctx->saved_data["x_hat_from_out"] = from_out;
    if (has_dw) save_sink(ctx, x);
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["geom"] = std::vector<int64_t>{stride, pad, dil};
    ctx->saved_data["need"] = std::vector<int64_t>{x.requires_grad(), has_dw && w_dw.requires_grad(), w_pw.requires_grad(),
                                                   aff.gamma.defined() && gamma.requires_grad(),
                                                   aff.beta.defined() && beta.requires_grad()};
    return aff.any() ? z : y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    const auto &x = sv[0], &w_dw = sv[1], &w_pw = sv[2], &mean = sv[7], &invstd = sv[8];
    const OutAffine aff = out_affine(sv[3], sv[4], sv[5]);
    const bool has_dw = w_dw.numel() > 0;
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto geom = ctx->saved_data["geom"].toIntVector();
    const auto need = ctx->saved_data["need"].toIntVector();
    const int64_t s = geom[0], pad = geom[1], dil = geom[2];
    variable_list out(14);
    const Tensor& g = grads[0];
    const bool from_out = ctx->saved_data["x_hat_from_out"].toBool();
    if (!x.defined()) {  // only gamma's and beta's gradients: from x_hat and g alone
      if (torch::GradMode::is_enabled()) {
        Tensor xh;  // a constant of the recomputation
        {
          torch::NoGradGuard ng;
          xh = from_out ? x_hat_from_output(sv[6], aff) : sv[6].detach();
        }
        grad_of_recomputation(affine_differentiable(xh, aff.gamma, aff.beta, aff.scale), sv, need, g, out);
        return out;
      }
      auto bg = bn_affine_grads(g, sv[6], mean, invstd, training, eps, aff, from_out);
      if (need[3]) out[3] = bg.gamma;
      if (need[4]) out[4] = bg.beta;
      return out;
    }
    if (torch::GradMode::is_enabled()) {
      // create_graph: differentiate a recomputation built from ATen's differentiable ops.
      auto d = at::relu(x);
      if (has_dw) d = at::conv2d(d, w_dw, {}, {s, s}, {pad, pad}, {dil, dil}, x.size(1));
      auto r = affine_differentiable(bn_differentiable(at::conv2d(d, w_pw), mean, invstd, training, eps), aff.gamma,
                                     aff.beta, aff.scale);
      grad_of_recomputation(r, sv, need, g, out);
      return out;
    }
    const SinkPtr sink = need[0] ? saved_sink(ctx) : SinkPtr();  // dw_pw_backward adds x's gradient into it
    if (has_dw && dw_pw_own(x, w_dw) && BnBackwardPlan::applies(g, sv[6], invstd, aff)) {
      // The BN gradient of each image is computed inside the image loop, where it is consumed.
      const BnBackwardPlan plan(g, sv[6], from_out, invstd, training, aff, need[3] || need[4]);
      if (need[3]) out[3] = plan.dgamma;
      if (need[4]) out[4] = plan.dbeta;
      const int64_t per_image = plan.c * plan.hw;
      auto r = dw_pw_backward(
          [&](int64_t i, std::vector<float>& scratch) {
            scratch.resize(static_cast<size_t>(per_image));
            plan.image(i, scratch.data());
            return static_cast<const float*>(scratch.data());
          },
          g.sizes(), x, w_dw, w_pw, s, pad, dil, need[0], need[1], need[2], sink.get());
      out[0] = r[0], out[1] = r[1], out[2] = r[2];
      return out;
    }
    auto bg = bn_backward_affine(g, sv[6], mean, invstd, training, eps, aff, need[3] || need[4], from_out);
    if (need[3]) out[3] = bg.gamma;
    if (need[4]) out[4] = bg.beta;
    auto gp = std::move(bg.x);
    if (!has_dw) {
      if (need[2]) out[2] = pointwise_grad_weight(gp, x, w_pw, true);
      if (need[0]) out[0] = pointwise_grad_input(gp, w_pw, x, true);
      return out;
    }
    if (dw_pw_own(x, w_dw) && own_kernel(gp)) {
      auto gc = gp.contiguous();
      const float* gpp = gc.data_ptr<float>();
      const int64_t per_image = gc.numel() / std::max<int64_t>(1, gc.size(0));
      auto r = dw_pw_backward([&](int64_t i, std::vector<float>&) { return gpp + i * per_image; }, gc.sizes(), x, w_dw,
                              w_pw, s, pad, dil, need[0], need[1], need[2], sink.get());
      out[0] = r[0], out[1] = r[1], out[2] = r[2];
      return out;
    }
    Tensor d;  // the depthwise output, recomputed (cheaper than keeping it)
    if (need[2] || !own_kernel(gp)) d = depthwise_conv2d(x, w_dw, s, pad, dil, true);
    if (need[2]) out[2] = pointwise_grad_weight(gp, d, w_pw, false);
    if (need[0] || need[1]) {
      auto gd = pointwise_grad_input(gp, w_pw, d, false);
      gp.reset();
      d.reset();
      std::tie(out[0], out[1]) = depthwise_conv2d_backward(gd, x, w_dw, s, pad, dil, true, need[0], need[1]);
    }
    return out;
  }
};

// gamma * BN(pool3x3(x)), gamma (a placeholder when absent) a mixed edge's weight in every
// channel (fused_pool_bn's `mix_weight`).
struct PoolBnFn : torch::autograd::Function<PoolBnFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& gamma, const Tensor& rm, const Tensor& rv,
                        bool max_pool, int64_t stride, bool training, double momentum, double eps) {
    const OutAffine aff = out_affine(gamma, Tensor(), Tensor());
    const bool from_out = aff.any() && x_hat_recoverable(aff);  // z is kept, x_hat recovered from it
    Tensor y, mean, invstd, z;
    PlaneStats stats;
    PlaneStats* ps = training ? &stats : nullptr;  // computed by the pool kernel while each plane is in cache
    auto pooled = pool(x, max_pool, stride, ps);
    std::tie(y, mean, invstd) = bn_forward(pooled, rm, rv, {training, momentum, eps}, ps, true,
                                           aff.any() ? &aff : nullptr, aff.any() ? &z : nullptr, from_out);
    // x serves only its own gradient (as in ChainFn).
    ctx->save_for_backward({x.requires_grad() ? x : Tensor(), gamma, from_out ? z : y, mean, invstd});
    save_sink(ctx, x);
    ctx->saved_data["max"] = max_pool;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["x_hat_from_out"] = from_out;
    return aff.any() ? z : y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sv = ctx->get_saved_variables();
    const auto &x = sv[0], &y = sv[2], &mean = sv[3], &invstd = sv[4];
    const OutAffine aff = out_affine(sv[1], Tensor(), Tensor());
    const bool max_pool = ctx->saved_data["max"].toBool(), training = ctx->saved_data["training"].toBool();
    const bool from_out = ctx->saved_data["x_hat_from_out"].toBool();
    const int64_t s = ctx->saved_data["stride"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool need_x = x.defined() && x.requires_grad(), need_g = aff.gamma.defined() && aff.gamma.requires_grad();
    variable_list out(10);
    const Tensor& g = grads[0];
    if (torch::GradMode::is_enabled()) {
      Tensor xh;  // recomputed from x where x's gradient is asked, else a constant
      if (need_x) {
        xh = bn_differentiable(aten_pool(x, max_pool, s), mean, invstd, training, eps);
      } else {
        torch::NoGradGuard ng;
        xh = from_out ? x_hat_from_output(y, aff) : y.detach();
      }
      grad_of_recomputation(affine_differentiable(xh, aff.gamma, Tensor(), Tensor()), sv, {need_x, need_g}, g, out);
      return out;
    }
    if (!need_x) {
      if (need_g) out[1] = bn_affine_grads(g, y, mean, invstd, training, eps, aff, from_out).gamma;
      return out;
    }
    if (own_kernel(x) && BnBackwardPlan::applies(g, y, invstd, aff)) {
      // The BN's input gradient made plane by plane inside the pool's loop, where it is consumed
      // (the same values as the whole tensor's, which is never written).
      const BnBackwardPlan plan(g, y, from_out, invstd, training, aff, need_g);
      if (need_g) out[1] = plan.dgamma;
      out[0] = pool_backward(g, x, max_pool, s, saved_sink(ctx).get(), [&plan](int64_t k, float* dst) { plan.plane(k, dst); });
      return out;
    }
    auto bg = bn_backward_affine(g, y, mean, invstd, training, eps, aff, need_g, from_out);
    if (need_g) out[1] = bg.gamma;
    out[0] = pool_backward(bg.x, x, max_pool, s, saved_sink(ctx).get());
    return out;
  }
};

// pool3x3(x) alone (the evaluation network's pools): saves only x (max indices recomputed).
struct PoolFn : torch::autograd::Function<PoolFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, bool max_pool, int64_t stride) {
    ctx->save_for_backward({x});
    ctx->saved_data["max"] = max_pool;
    ctx->saved_data["stride"] = stride;
    return pool(x, max_pool, stride);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto x = ctx->get_saved_variables()[0];
    const bool max_pool = ctx->saved_data["max"].toBool();
    const int64_t s = ctx->saved_data["stride"].toInt();
    variable_list out(3);
    if (!x.requires_grad()) return out;
    if (torch::GradMode::is_enabled()) {
      out[0] = torch::autograd::grad({aten_pool(x, max_pool, s)}, {x}, {grads[0]}, true, true)[0];
      return out;
    }
    out[0] = pool_backward(grads[0], x, max_pool, s);
    return out;
  }
};

// FactorizedReduce: BN(cat(conv1x1(relu(x)[::2, ::2]), conv1x1(relu(x)[1::2, 1::2]))), the
// second half zero-padded to the first's size for odd inputs.
#ifdef ND_AVX512
// One plane of fr_subsample on AVX-512: each output row from 32 input columns at a time (two
// masked loads, their even or odd lanes selected by one permute); rows past the input zero.
ND_AVX512_FN void subsample_plane_avx512(const float* src, float* dst, int64_t h, int64_t w, int64_t off) {
  const int64_t h2 = (h + 1) / 2, w2 = (w + 1) / 2;
  alignas(64) int32_t ix[16];
  for (int k = 0; k < 16; ++k) ix[k] = 2 * k + static_cast<int32_t>(off);
  const __m512i idx = _mm512_load_si512(ix);
  for (int64_t r = 0; r < h2; ++r) {
    const int64_t ih = 2 * r + off;
    float* d = dst + r * w2;
    if (ih >= h) {
      for (int64_t q = 0; q < w2; q += 16) _mm512_mask_storeu_ps(d + q, lanes(w2 - q), _mm512_setzero_ps());
      continue;
    }
    const float* s = src + ih * w;
    for (int64_t q = 0; q < w2; q += 16) {
      const int64_t c0 = 2 * q;  // input column of output column q (before the offset)
      const __m512 lo = _mm512_maskz_loadu_ps(lanes(w - c0), s + c0), hi = _mm512_maskz_loadu_ps(lanes(w - c0 - 16), s + c0 + 16);
      _mm512_mask_storeu_ps(d + q, lanes(w2 - q), _mm512_permutex2var_ps(lo, idx, hi));
    }
  }
}

// One plane of fr_scatter on AVX-512: each input row's gradient 32 columns at a time, the 16
// values of its half's row interleaved with zeros (even columns for even rows, odd for odd).
ND_AVX512_FN void scatter_plane_avx512(const float* g0, const float* g1, float* dst, int64_t h, int64_t w) {
  const int64_t w2 = (w + 1) / 2;
  alignas(64) int32_t ix[2][32];
  for (int par = 0; par < 2; ++par)
    for (int k = 0; k < 32; ++k) ix[par][k] = (k % 2 == par) ? k / 2 : 16;  // 16: the zero vector's lane 0
  const __m512i lo_idx[2] = {_mm512_load_si512(ix[0]), _mm512_load_si512(ix[1])};
  const __m512i hi_idx[2] = {_mm512_load_si512(ix[0] + 16), _mm512_load_si512(ix[1] + 16)};
  const __m512 z = _mm512_setzero_ps();
  for (int64_t ih = 0; ih < h; ++ih) {
    const int par = static_cast<int>(ih % 2);
    const float* s = (par ? g1 : g0) + (ih / 2) * w2;
    float* d = dst + ih * w;
    for (int64_t c0 = 0; c0 < w; c0 += 32) {
      const __m512 v = _mm512_maskz_loadu_ps(lanes(w2 - c0 / 2), s + c0 / 2);
      _mm512_mask_storeu_ps(d + c0, lanes(w - c0), _mm512_permutex2var_ps(v, lo_idx[par], z));
      _mm512_mask_storeu_ps(d + c0 + 16, lanes(w - c0 - 16), _mm512_permutex2var_ps(v, hi_idx[par], z));
    }
  }
}
#endif

// x[:, :, off::2, off::2], zero-padded to ceil(h / 2) x ceil(w / 2), contiguous: a plane loop on
// the CPU (ATen's strided copy measured ~1.5% of the C 16 training step), ATen's indexing elsewhere.
Tensor fr_subsample(const Tensor& x, int64_t off) {
  using torch::indexing::None;
  using torch::indexing::Slice;
  if (own_kernel(x) && x.dim() == 4) {
    int64_t xs = 0;
    auto xc = image_major(x, xs);
    const int64_t n = xc.size(0), c = xc.size(1), h = xc.size(2), w = xc.size(3);
    const int64_t h2 = (h + 1) / 2, w2 = (w + 1) / 2;
    auto y = torch::empty({n, c, h2, w2}, xc.options());
    const float* xp = xc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, n * c, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float* src = plane_at(xp, i, c, xs, h * w);
        float* dst = yp + i * h2 * w2;
#ifdef ND_AVX512
        if (use_avx512()) {
          subsample_plane_avx512(src, dst, h, w, off);
          continue;
        }
#endif
        for (int64_t r = 0; r < h2; ++r) {
          const int64_t ih = 2 * r + off;
          for (int64_t q = 0; q < w2; ++q) {
            const int64_t iw = 2 * q + off;
            dst[r * w2 + q] = (ih < h && iw < w) ? src[ih * w + iw] : 0.f;
          }
        }
      }
    });
    return y;
  }
  auto s = x.index({Slice(), Slice(), Slice(off, None, 2), Slice(off, None, 2)});
  const int64_t h = (x.size(2) + 1) / 2, w = (x.size(3) + 1) / 2;
  if (s.size(2) != h || s.size(3) != w) s = at::constant_pad_nd(s, {0, w - s.size(3), 0, h - s.size(2)});
  return s.contiguous();
}

// The factorized reduction before its BN: the two 1x1s of relu(x)'s even and odd subsamples,
// concatenated.
Tensor fr_halves(const Tensor& x, const Tensor& w1, const Tensor& w2) {
  return at::cat({pointwise(fr_subsample(x, 0), w1, true), pointwise(fr_subsample(x, 1), w2, true)}, 1);
}

// The input gradient of the factorized reduction from its two halves' (each [n, c, ceil(h / 2),
// ceil(w / 2)]): g0 at the even rows and columns, g1 at the odd ones, zero elsewhere.
Tensor fr_scatter(const Tensor& g0, const Tensor& g1, int64_t h, int64_t w) {
  const int64_t n = g0.size(0), c = g0.size(1), h2 = g0.size(2), w2 = g0.size(3);
  auto gx = torch::empty({n, c, h, w}, g0.options());
  const float *p0 = g0.data_ptr<float>(), *p1 = g1.data_ptr<float>();
  float* gp = gx.data_ptr<float>();
  at::parallel_for(0, n * c, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float *a = p0 + i * h2 * w2, *o = p1 + i * h2 * w2;
      float* dst = gp + i * h * w;
#ifdef ND_AVX512
      if (use_avx512()) {
        scatter_plane_avx512(a, o, dst, h, w);
        continue;
      }
#endif
      for (int64_t ih = 0; ih < h; ++ih) {
        const float* src = (ih % 2 ? o : a) + (ih / 2) * w2;
        const int64_t par = ih % 2;
        for (int64_t iw = 0; iw < w; ++iw) dst[ih * w + iw] = (iw % 2 == par) ? src[iw / 2] : 0.f;
      }
    }
  });
  return gx;
}

struct FactorizedReduceFn : torch::autograd::Function<FactorizedReduceFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1, const Tensor& w2,
                        const Tensor& gamma, const Tensor& beta, const Tensor& rm, const Tensor& rv, bool training,
                        double momentum, double eps) {
    const OutAffine aff = out_affine(gamma, beta, Tensor());
    const bool from_out = aff.any() && x_hat_recoverable(aff);
    Tensor y, mean, invstd, z;
    {
      auto p = fr_halves(x, w1, w2);
      std::tie(y, mean, invstd) = bn_forward(p, rm, rv, {training, momentum, eps}, nullptr, true,
                                             aff.any() ? &aff : nullptr, aff.any() ? &z : nullptr, from_out);
    }
    ctx->save_for_backward({x, w1, w2, gamma, beta, from_out ? z : y, mean, invstd});
    ctx->saved_data["x_hat_from_out"] = from_out;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["need"] = std::vector<int64_t>{x.requires_grad(), w1.requires_grad(), w2.requires_grad(),
                                                   aff.gamma.defined() && gamma.requires_grad(),
                                                   aff.beta.defined() && beta.requires_grad()};
    return aff.any() ? z : y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using torch::indexing::None;
    using torch::indexing::Slice;
    auto sv = ctx->get_saved_variables();
    const auto &x = sv[0], &w1 = sv[1], &w2 = sv[2], &mean = sv[6], &invstd = sv[7];
    const OutAffine aff = out_affine(sv[3], sv[4], Tensor());
    const bool from_out = ctx->saved_data["x_hat_from_out"].toBool();
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble();
    const auto need = ctx->saved_data["need"].toIntVector();
    variable_list out(10);
    if (torch::GradMode::is_enabled()) {
      auto r = at::relu(x);
      auto a = at::conv2d(r, w1, {}, {2, 2});
      auto b = at::conv2d(r.index({Slice(), Slice(), Slice(1, None), Slice(1, None)}), w2, {}, {2, 2});
      if (b.size(2) != a.size(2) || b.size(3) != a.size(3))
        b = at::constant_pad_nd(b, {0, a.size(3) - b.size(3), 0, a.size(2) - b.size(2)});
      auto z = affine_differentiable(bn_differentiable(at::cat({a, b}, 1), mean, invstd, training, eps), aff.gamma,
                                     aff.beta, {});
      grad_of_recomputation(z, sv, need, grads[0], out);
      return out;
    }
    auto bg = bn_backward_affine(grads[0], sv[5], mean, invstd, training, eps, aff, need[3] || need[4], from_out);
    if (need[3]) out[3] = bg.gamma;
    if (need[4]) out[4] = bg.beta;
    auto gp = std::move(bg.x);
    const int64_t half = w1.size(0);
    auto gp1 = gp.slice(1, 0, half).contiguous(), gp2 = gp.slice(1, half).contiguous();
    gp.reset();
    auto s0 = fr_subsample(x, 0), s1 = fr_subsample(x, 1);
    if (need[1]) out[1] = pointwise_grad_weight(gp1, s0, w1, true);
    if (need[2]) out[2] = pointwise_grad_weight(gp2, s1, w2, true);
    if (need[0]) {
      auto g0 = pointwise_grad_input(gp1, w1, s0, true), g1 = pointwise_grad_input(gp2, w2, s1, true);
      if (own_kernel(g0) && x.dim() == 4) {  // one pass writing every input pixel's gradient
        out[0] = fr_scatter(g0.contiguous(), g1.contiguous(), x.size(2), x.size(3));
        return out;
      }
      auto gx = torch::zeros_like(x);
      gx.index({Slice(), Slice(), Slice(0, None, 2), Slice(0, None, 2)}).copy_(g0);
      auto t1 = gx.index({Slice(), Slice(), Slice(1, None, 2), Slice(1, None, 2)});
      t1.copy_(g1.index({Slice(), Slice(), Slice(0, t1.size(2)), Slice(0, t1.size(3))}));
      out[0] = gx;
    }
    return out;
  }
};

// ---- Channel concatenation written in place --------------------------------------------------
// Part p is copied into its channel slice of the output buffer and the slice returned: the part's
// own tensor is then no longer referenced (its other consumers keep the slice, which shares the
// output's memory). The copy goes below autograd's in-place tracking, so the buffer's version
// counter does not move and slices saved for the backward stay valid; nothing else ever writes
// the buffer.
struct PlaceFn : torch::autograd::Function<PlaceFn> {
  // `parts`: one part, copied; or summands, added in order ((a + b) + c ...) straight into the slice.
  static Tensor forward(AutogradContext* ctx, at::TensorList parts, const Tensor& buffer, int64_t offset) {
    ctx->saved_data["parts"] = static_cast<int64_t>(parts.size());
    auto slice = buffer.narrow(1, offset, parts[0].size(1));
    {
      at::AutoDispatchBelowADInplaceOrView below;
      if (parts.size() == 1) {
        slice.copy_(parts[0]);
      } else {
        at::add_out(slice, parts[0], parts[1]);
        for (size_t j = 2; j < parts.size(); ++j) slice.add_(parts[j]);
      }
    }
    return slice;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // One gradient per summand (every one is the slice's), none for the buffer and the offset.
    const size_t k = ctx->saved_data["parts"].toInt();
    variable_list out(k, grads[0]);
    out.resize(k + 2);
    return out;
  }
};

// The whole buffer, differentiable in every placed slice: its backward hands each slice its
// channels of the gradient.
struct ConcatBackward : torch::autograd::Node {
  std::vector<int64_t> offsets, widths;
  variable_list apply(variable_list&& grads) override {
    variable_list out(offsets.size());
    if (!grads[0].defined()) return out;
    for (size_t i = 0; i < offsets.size(); ++i)
      if (should_compute_output(i)) out[i] = grads[0].narrow(1, offsets[i], widths[i]);
    return out;
  }
};

// A tensor's channel slices (widths in order) as the outputs of one node, whose backward
// concatenates their gradients (zeros for a slice that received none): the slices' gradient is
// then one tensor, not one full-size zero-filled tensor per slice (narrow's own backward).
struct SplitFn : torch::autograd::Function<SplitFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& whole, std::vector<int64_t> widths) {
    variable_list parts;
    int64_t off = 0;
    for (int64_t w : widths) parts.push_back(whole.narrow(1, off, w)), off += w;
    ctx->saved_data["widths"] = widths;
    return parts;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto widths = ctx->saved_data["widths"].toIntVector();
    const Tensor* like = nullptr;
    for (const auto& g : grads)
      if (g.defined()) like = &g;
    if (!like) return {Tensor(), Tensor()};
    variable_list gs;
    for (size_t k = 0; k < grads.size(); ++k) {
      if (grads[k].defined()) {
        gs.push_back(grads[k]);
      } else {
        auto sz = like->sizes().vec();
        sz[1] = widths[k];
        gs.push_back(torch::zeros(sz, like->options()));
      }
    }
    return {torch::cat(gs, 1), Tensor()};
  }
};

// The edge's softmax weights as floats on the host (the own kernels' scalars).
std::vector<float> host_weights(const Tensor& w) {
  auto wd = w.detach().to(torch::kCPU, torch::kDouble).contiguous();
  return std::vector<float>(wd.data_ptr<double>(), wd.data_ptr<double>() + wd.numel());
}

// The weighted sum's loops over one range [b, e) of the flat tensors (ND_CLONES: the forward
// and backward of every search edge stream its candidates' outputs through them). Forward: o =
// sum_j w_j src_j. Backward: part[j] = sum g y_j (the weights' gradient, where y_j is kept; 0
// where not, unless part is null) and gdst_j = g w_j (the candidates' gradients, where asked).
ND_CLONES void ws_forward_range(float* o, const float* const* src, const float* wv, int64_t k, int64_t b, int64_t e) {
  const float* s0 = src[0];
  const float w0 = wv[0];
#pragma omp simd
  for (int64_t i = b; i < e; ++i) o[i] = w0 * s0[i];
  for (int64_t j = 1; j < k; ++j) {
    const float* sj = src[j];
    const float wj = wv[j];
#pragma omp simd
    for (int64_t i = b; i < e; ++i) o[i] += wj * sj[i];
  }
}

ND_CLONES void ws_backward_range(const float* gp, const float* const* ysrc, float* const* gdst, const float* wv,
                                 int64_t k, int64_t b, int64_t e, float* part) {
  for (int64_t j = 0; j < k; ++j) {
    if (const float* sj = ysrc[j]) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = b; i < e; ++i) acc += gp[i] * sj[i];
      part[j] = acc;
    } else if (part) {
      part[j] = 0.f;
    }
    if (float* dj = gdst[j]) {
      const float wj = wv[j];
#pragma omp simd
      for (int64_t i = b; i < e; ++i) dj[i] = gp[i] * wj;
    }
  }
}

// The weighted sum's blocks (16k floats, 64 KB): forward, each output block stays in L1/L2
// across the k summands (over a thread's whole range it was streamed k times); backward, the
// alphas' partial dot products, summed in block order.
constexpr int64_t kSumBlock = 16384;

// sum_k w[k] * y_k over the listed ops (coefficient 1 where `unit`): a hand-made autograd node
// (any number of inputs).
Tensor weighted_sum_forward(const Tensor& w, const std::vector<Tensor>& ys, const std::vector<bool>& unit) {
  bool own = true;
  for (const auto& y : ys) own = own && own_kernel(y) && y.sizes() == ys[0].sizes();
  if (!own) {
    auto term = [&](size_t j) { return unit[j] ? ys[j] : ys[j] * w[static_cast<int64_t>(j)]; };
    auto out = term(0);
    for (size_t j = 1; j < ys.size(); ++j) out = out + term(j);
    return out;
  }
  // An op may return its input itself (the skip), a channel slice of a cell's output: copied.
  std::vector<Tensor> yc;
  for (const auto& y : ys) yc.push_back(y.contiguous());
  auto out = torch::empty(yc[0].sizes(), yc[0].options());
  const int64_t n = out.numel(), k = static_cast<int64_t>(ys.size());
  std::vector<const float*> src(k);
  std::vector<float> wv = host_weights(w);
  for (int64_t j = 0; j < k; ++j) src[j] = yc[j].data_ptr<float>(), wv[j] = unit[j] ? 1.f : wv[j];
  float* o = out.data_ptr<float>();
  const int64_t nb = (n + kSumBlock - 1) / kSumBlock;
  at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
    for (int64_t bi = b; bi < e; ++bi)
      ws_forward_range(o, src.data(), wv.data(), k, bi * kSumBlock, std::min(n, (bi + 1) * kSumBlock));
  });
  return out;
}

struct WeightedSumBackward : torch::autograd::Node {
  torch::autograd::SavedVariable w_;
  // Only when w needs a gradient (their only use), and not for the prescaled terms (empty).
  std::vector<torch::autograd::SavedVariable> ys_;
  std::vector<bool> unit_;  // per summand: prescaled (coefficient 1, gradient g itself)
  int64_t k_ = 0;           // the number of summands
  std::string name() const override { return "noisydarts::WeightedSumBackward"; }
  void release_variables() override {
    w_.reset_data();
    for (auto& y : ys_) y.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const Tensor w = w_.unpack();
    std::vector<Tensor> ys;
    for (auto& y : ys_) ys.push_back(y.unpack());
    const int64_t k = k_;
    variable_list out(1 + k);
    const Tensor& g = grads[0];
    if (!g.defined()) return out;
    if (torch::GradMode::is_enabled() || !own_kernel(g)) {  // differentiable ATen form
      if (should_compute_output(0) && !ys.empty()) {
        std::vector<Tensor> gw;
        for (int64_t j = 0; j < k; ++j) gw.push_back(unit_[j] ? torch::zeros({}, g.options()) : (g * ys[j]).sum());
        out[0] = torch::stack(gw);
      }
      for (int64_t j = 0; j < k; ++j)
        if (should_compute_output(1 + j)) out[1 + j] = unit_[j] ? g : g * w[j];
      return out;
    }
    // One pass over g in blocks: the k dot products <g, y_j> (per-block partials summed in a
    // fixed order: independent of the thread count) and the k input gradients w_j g.
    auto gc = g.contiguous();
    const float* gp = gc.data_ptr<float>();
    const int64_t n = gc.numel();
    const bool need_w = should_compute_output(0) && !ys.empty();
    const std::vector<float> wv = host_weights(w);
    std::vector<const float*> ysrc(static_cast<size_t>(k), nullptr);
    std::vector<float*> gdst(static_cast<size_t>(k), nullptr);
    std::vector<Tensor> yc(static_cast<size_t>(k));
    bool pass = need_w;  // a pass over g is needed at all
    for (int64_t j = 0; j < k; ++j) {
      if (unit_[j]) {  // its gradient is g itself, its weight's comes through its own graph
        if (should_compute_output(1 + j)) out[1 + j] = g;
        continue;
      }
      if (need_w) yc[j] = ys[j].contiguous(), ysrc[j] = yc[j].data_ptr<float>();
      if (should_compute_output(1 + j))
        out[1 + j] = torch::empty_like(gc), gdst[j] = out[1 + j].data_ptr<float>(), pass = true;
    }
    if (!pass) return out;
    const int64_t nb = (n + kSumBlock - 1) / kSumBlock;
    Partials part(need_w ? static_cast<size_t>(nb * k) : 0);
    at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) {
      for (int64_t bi = b; bi < e; ++bi) {
        const int64_t i0 = bi * kSumBlock, i1 = std::min(n, i0 + kSumBlock);
        ws_backward_range(gp, ysrc.data(), gdst.data(), wv.data(), k, i0, i1, need_w ? part.data() + bi * k : nullptr);
      }
    });
    if (need_w) out[0] = sum_partials(part, nb, k, {k}).to(w.options());
    return out;
  }
};

// drop_path's `x * mask / keep` (mask [N] of 0 and 1) in one pass each way, with the same two
// roundings per element as ATen's mul then div, and the backward's `(g / keep) * mask` as
// DivBackward and MulBackward compute it: bitwise the module form. Saves the mask only.
ND_CLONES void drop_path_range(const float* src, float* dst, int64_t b, int64_t e, int64_t per, const float* mask,
                               float keep, bool backward) {
  for (int64_t i = b; i < e; ++i) {
    const float m = mask[i];
    const float* x = src + i * per;
    float* y = dst + i * per;
    if (backward) {
#pragma omp simd
      for (int64_t j = 0; j < per; ++j) y[j] = (x[j] / keep) * m;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < per; ++j) y[j] = (x[j] * m) / keep;
    }
  }
}
Tensor drop_path_apply(const Tensor& x, const Tensor& mask, double keep, bool backward) {
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t n = xc.size(0), per = n ? xc.numel() / n : 0;
  auto mc = mask.contiguous();
  const float* mp = mc.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    drop_path_range(xc.data_ptr<float>(), out.data_ptr<float>(), b, e, per, mp, static_cast<float>(keep), backward);
  });
  return out;
}
}  // namespace

Tensor drop_path_grad(const Tensor& g, const Tensor& mask, double keep) {
  if (torch::GradMode::is_enabled() || !own_kernel(g)) return g / keep * mask;
  return drop_path_apply(g, mask, keep, true);
}

namespace {
struct DropPathFn : torch::autograd::Function<DropPathFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& mask, double keep) {
    ctx->save_for_backward({mask});
    ctx->saved_data["keep"] = keep;
    return drop_path_apply(x, mask, keep, false);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {drop_path_grad(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["keep"].toDouble()), Tensor(), Tensor()};
  }
};

// x itself as a node of its own whose backward hands on the sink's buffer (GradSink).
struct SinkFn : torch::autograd::Function<SinkFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, SinkPtr sink) {
    ctx->set_materialize_grads(false);  // none reached it the usual way: undefined, not zeros
    ctx->saved_data["sink"] = c10::IValue::make_capsule(std::move(sink));
    return x;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto sink = c10::static_intrusive_pointer_cast<GradSink>(ctx->saved_data["sink"].toCapsule());
    Tensor acc = std::move(sink->acc);  // the next backward through this graph starts afresh
    sink->acc = Tensor();
    Tensor& g = grads[0];
    if (!acc.defined()) return {g, Tensor()};
    if (g.defined()) {
      if (torch::GradMode::is_enabled()) return {acc + g, Tensor()};
      acc.add_(g);
    }
    return {acc, Tensor()};
  }
};
}  // namespace

void set_fused_ops(bool on) { g_fused = on; }
bool fused_ops_enabled() { return g_fused; }

void set_avx512_kernels(bool on) { g_avx512 = on; }
void set_avx2_kernels(bool on) { g_avx2 = on; }
bool avx2_kernels_active() {
#ifdef ND_AVX512
  return use_avx2();
#else
  return false;
#endif
}
void set_blas_gemm(bool on) { g_blas = on; }
void set_grouped_1x1(bool on) { g_group = on; }
void set_direct_depthwise(bool on) { g_direct = on; }
void set_grad_sinks(bool on) { g_sinks = on; }
void set_mix_weight_fold(bool on) { g_mix_fold = on; }
bool mix_weight_fold_enabled() { return g_mix_fold && g_fused; }

Tensor fused_drop_path(const Tensor& x, const Tensor& mask, double keep) {
  if (!g_fused || x.dim() < 1 || !own_kernel(x) || !own_kernel(mask) || mask.numel() != x.size(0) ||
      mask.requires_grad())
    return x * mask / keep;
  return DropPathFn::apply(x, mask, keep);
}

GradSinkScope::GradSinkScope() : table_(std::make_shared<SinkTable>()) {
  auto* t = static_cast<SinkTable*>(table_.get());
  t->outer = t_sinks;
  t_sinks = t;
}

GradSinkScope::~GradSinkScope() { t_sinks = static_cast<SinkTable*>(table_.get())->outer; }

Tensor GradSinkScope::wrap(const Tensor& x) {
  auto* t = static_cast<SinkTable*>(table_.get());
  if (!g_sinks || !g_fused || t_sinks != t || !torch::GradMode::is_enabled() || !x.requires_grad() || !own_kernel(x))
    return x;
  auto sink = c10::make_intrusive<GradSink>();
  auto y = SinkFn::apply(x, sink);
  t->entries.emplace_back(y.unsafeGetTensorImpl(), std::move(sink));
  return y;
}
bool blas_gemm_active() { return blas_sgemm() != nullptr && !avx512_kernels_active(); }
bool avx512_kernels_active() {
#ifdef ND_AVX512
  return use_avx512();
#else
  return false;
#endif
}

Tensor depthwise_conv2d(const Tensor& x, const Tensor& w, int64_t stride, int64_t pad, int64_t dilation,
                        bool relu_input) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4 && w.size(0) == x.size(1) && w.size(1) == 1 && w.size(2) == w.size(3),
              "depthwise_conv2d: bad shapes ", x.sizes(), " and ", w.sizes());
  if (!own_kernel(x) || w.size(2) * w.size(3) > kMaxTaps) {
    auto in = relu_input ? at::relu(x) : x;
    return at::conv2d(in, w, {}, {stride, stride}, {pad, pad}, {dilation, dilation}, x.size(1));
  }
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t n = xc.size(0), c = xc.size(1);
  const Geom& g = make_geom(xc.size(2), xc.size(3), wc.size(2), stride, pad, dilation);
  TORCH_CHECK(g.oh > 0 && g.ow > 0, "depthwise_conv2d: input ", x.sizes(), " too small for the kernel");
  auto y = torch::empty({n, c, g.oh, g.ow}, xc.options());
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t plane = g.h * g.w, kk = g.k * g.k;
  at::parallel_for(0, n * c, 1, [&](int64_t b, int64_t e) {
    std::vector<float> buf(static_cast<size_t>(g.buf)), ext(static_cast<size_t>(g.len));
    for (int64_t i = b; i < e; ++i) {
      dw_plane(xp + i * plane, wp + (i % c) * kk, yp + i * g.oh * g.ow, g, relu_input, buf.data(), ext.data());
    }
  });
  return y;
}

std::pair<Tensor, Tensor> depthwise_conv2d_backward(const Tensor& grad_out, const Tensor& x, const Tensor& w,
                                                    int64_t stride, int64_t pad, int64_t dilation,
                                                    bool relu_input, bool need_input, bool need_weight) {
  if (!need_input && !need_weight) return {};
  if (!own_kernel(x) || w.size(2) * w.size(3) > kMaxTaps) {
    auto in = relu_input ? at::relu(x) : x;
    auto r = at::convolution_backward(grad_out, in, w, c10::nullopt, {stride, stride}, {pad, pad},
                                      {dilation, dilation}, false, {0, 0}, x.size(1),
                                      {need_input, need_weight, false});
    auto gx = std::get<0>(r);
    if (need_input && relu_input) gx = gx * (x > 0);
    return {gx, std::get<1>(r)};
  }
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto gc = grad_out.contiguous();
  const int64_t n = xc.size(0), c = xc.size(1);
  const Geom& g = make_geom(xc.size(2), xc.size(3), wc.size(2), stride, pad, dilation);
  TORCH_CHECK(gc.size(2) == g.oh && gc.size(3) == g.ow, "depthwise_conv2d_backward: grad shape ", gc.sizes());
  Tensor gx;
  if (need_input) gx = torch::empty_like(xc);
  Partials part(need_weight ? static_cast<size_t>(n * c * g.k * g.k) : 0);
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>(), *gp = gc.data_ptr<float>();
  float* gxp = need_input ? gx.data_ptr<float>() : nullptr;
  const int64_t plane = g.h * g.w, oplane = g.oh * g.ow, kk = g.k * g.k;
  const DwBackward db(g, wp, c, relu_input, need_input, need_weight);
  at::parallel_for(0, n * c, 1, [&](int64_t b, int64_t e) {
    DwBackward::Scratch sc;
    db.size(sc);
    for (int64_t i = b; i < e; ++i)
      db.plane(i % c, gp + i * oplane, xp + i * plane, nullptr, need_input ? gxp + i * plane : nullptr,
               need_weight ? part.data() + i * kk : nullptr, sc);
  });
  Tensor gw;
  if (need_weight) gw = sum_partials(part, n, c * kk, w.sizes());  // part is [n][c][kk]
  return {gx, gw};
}

// ChainFn's function in evaluation mode where no gradient can be asked (EvalBn): the BN applied
// to each output plane as the 1x1 writes it, no autograd node, nothing saved. An empty w_dw:
// no depthwise convolution.
Tensor chain_eval(const Tensor& x, const Tensor& w_dw, const Tensor& w_pw, const EvalBn& eb, int64_t stride,
                  int64_t pad, int64_t dil) {
  if (w_dw.numel() == 0) return pointwise(x, w_pw, /*relu=*/true, nullptr, &eb);
  if (dw_pw_own(x, w_dw)) return dw_pw_forward(x, w_dw, w_pw, stride, pad, dil, nullptr, &eb);
  return pointwise(depthwise_conv2d(x, w_dw, stride, pad, dil, /*relu_input=*/true), w_pw, false, nullptr, &eb);
}

// A one-element tensor as one dimension (no view, no autograd node, where it is one already).
Tensor one_dim(const Tensor& t) { return t.dim() == 1 ? t : t.reshape({1}); }

Tensor fused_relu_dw_pw_bn(const Tensor& x, const Tensor& w_dw, const Tensor& w_pw,
                           torch::nn::BatchNorm2dImpl& bn, int64_t stride, int64_t pad, int64_t dilation,
                           const Tensor& scale, const Tensor& mix_weight) {
  const BnParams p = bn_params(bn);
  const bool affine = bn.options.affine();
  TORCH_CHECK(!scale.defined() || (scale.dim() == 1 && scale.size(0) == x.size(0)),
              "fused chain: scale of shape ", scale.sizes(), " for a batch of ", x.size(0));
  TORCH_CHECK(!mix_weight.defined() || (mix_weight.numel() == 1 && !affine && !scale.defined()),
              "fused chain: a mixing weight needs one element and a non-affine BN without scale");
  // The mixing weight serves as the BN's gamma, the same value in every channel.
  const Tensor gamma = affine ? bn.weight : mix_weight.defined() ? one_dim(mix_weight) : Tensor(),
               beta = affine ? bn.bias : Tensor();
  if (!p.training && EvalBn::applies(x, bn.running_mean, bn.running_var) &&
      no_record({&x, &w_dw, &w_pw, &gamma, &beta, &scale}))
    return chain_eval(x, w_dw, w_pw, EvalBn(bn.running_mean, bn.running_var, p.eps, OutAffine{gamma, beta, scale}),
                      stride, pad, dilation);
  const Tensor none = placeholder(x);
  return ChainFn::apply(x, w_dw, w_pw, gamma.defined() ? gamma : none, beta.defined() ? beta : none,
                        scale.defined() ? scale : none, bn.running_mean, bn.running_var, p.training, p.momentum,
                        p.eps, stride, pad, dilation);
}

Tensor fused_relu_pw_bn(const Tensor& x, const Tensor& w_pw, torch::nn::BatchNorm2dImpl& bn) {
  return fused_relu_dw_pw_bn(x, placeholder(w_pw), w_pw, bn, 1, 0, 1);  // no depthwise
}

std::vector<Tensor> fused_relu_pw_bn_group(const Tensor& x, const std::vector<PwBn>& members) {
  TORCH_CHECK(!members.empty(), "fused_relu_pw_bn_group: no members");
  // One node when every BN would normalise with the same parameters (options, mode, momentum).
  const auto& o0 = members[0].bn->options;
  bool same = members.size() > 1 && g_group;
  for (const auto& m : members) {
    const auto& o = m.bn->options;
    same = same && o.affine() == o0.affine() && o.eps() == o0.eps() && o.momentum() == o0.momentum() &&
           o.track_running_stats() && o0.track_running_stats() && m.bn->is_training() == members[0].bn->is_training() &&
           m.bn->running_mean.defined() && m.bn->running_var.defined() && m.weight.dim() == 4 &&
           m.weight.size(1) == x.size(1);
    if (same && !o.momentum())  // cumulative averaging: the batch counts must agree too
      same = m.bn->num_batches_tracked.item<int64_t>() == members[0].bn->num_batches_tracked.item<int64_t>();
  }
  std::vector<Tensor> out;
  if (!same) {
    for (const auto& m : members) out.push_back(fused_relu_pw_bn(x, m.weight, *m.bn));
    return out;
  }
  BnParams p{};
  std::vector<Tensor> ws, gammas, betas, rms, rvs;
  std::vector<int64_t> widths;
  for (const auto& m : members) {
    p = bn_params(*m.bn);  // advances each BN's batch count; equal parameters by the checks above
    ws.push_back(m.weight), rms.push_back(m.bn->running_mean), rvs.push_back(m.bn->running_var);
    if (o0.affine()) gammas.push_back(m.bn->weight), betas.push_back(m.bn->bias);
    widths.push_back(m.weight.size(0));
  }
  Tensor rm, rv;
  {
    torch::NoGradGuard ng;
    rm = torch::cat(rms), rv = torch::cat(rvs);
  }
  if (!p.training && EvalBn::applies(x, rm, rv)) {
    bool lean = no_record({&x});
    for (size_t k = 0; k < members.size() && lean; ++k)
      lean = no_record({&ws[k]}) && (!o0.affine() || no_record({&gammas[k], &betas[k]}));
    if (lean) {  // evaluation mode, no gradient: the stacked chain without a node, split by views
      torch::NoGradGuard ng;
      const Tensor gamma = o0.affine() ? torch::cat(gammas) : Tensor(), beta = o0.affine() ? torch::cat(betas) : Tensor();
      auto whole = chain_eval(x, placeholder(x), torch::cat(ws), EvalBn(rm, rv, p.eps, OutAffine{gamma, beta, {}}), 1, 0, 1);
      int64_t off = 0;
      for (int64_t w : widths) out.push_back(whole.narrow(1, off, w)), off += w;
      return out;
    }
  }
  const Tensor none = placeholder(x);
  auto whole = ChainFn::apply(x, /*no depthwise*/ none, torch::cat(ws),
                              o0.affine() ? torch::cat(gammas) : none, o0.affine() ? torch::cat(betas) : none, none,
                              rm, rv, p.training, p.momentum, p.eps, 1, 0, 1);
  if (p.training) {  // the updated running statistics back into each BN
    torch::NoGradGuard ng;
    int64_t off = 0;
    for (size_t k = 0; k < members.size(); ++k) {
      members[k].bn->running_mean.copy_(rm.narrow(0, off, widths[k]));
      members[k].bn->running_var.copy_(rv.narrow(0, off, widths[k]));
      off += widths[k];
    }
  }
  return SplitFn::apply(whole, widths);
}

Tensor fused_factorized_reduce(const Tensor& x, const Tensor& w1, const Tensor& w2, torch::nn::BatchNorm2dImpl& bn) {
  const BnParams p = bn_params(bn);
  const bool affine = bn.options.affine();
  const Tensor gamma = affine ? bn.weight : Tensor(), beta = affine ? bn.bias : Tensor();
  if (!p.training && EvalBn::applies(x, bn.running_mean, bn.running_var) && no_record({&x, &w1, &w2, &gamma, &beta})) {
    auto z = fr_halves(x, w1, w2);
    EvalBn(bn.running_mean, bn.running_var, p.eps, OutAffine{gamma, beta, {}}).apply(z);
    return z;
  }
  const Tensor none = placeholder(x);
  return FactorizedReduceFn::apply(x, w1, w2, affine ? bn.weight : none, affine ? bn.bias : none,
                                   bn.running_mean, bn.running_var, p.training, p.momentum, p.eps);
}

Tensor fused_pool_bn(const Tensor& x, bool max_pool, int64_t stride, torch::nn::BatchNorm2dImpl& bn,
                     const Tensor& mix_weight) {
  TORCH_CHECK(!bn.options.affine(), "fused_pool_bn needs a non-affine BatchNorm (the search network's)");
  TORCH_CHECK(!mix_weight.defined() || mix_weight.numel() == 1, "fused_pool_bn: a mixing weight needs one element");
  const BnParams p = bn_params(bn);
  const Tensor gamma = mix_weight.defined() ? one_dim(mix_weight) : Tensor();
  if (!p.training && EvalBn::applies(x, bn.running_mean, bn.running_var) && no_record({&x, &gamma})) {
    auto z = pool(x, max_pool, stride);
    EvalBn(bn.running_mean, bn.running_var, p.eps, OutAffine{gamma, Tensor(), Tensor()}).apply(z);
    return z;
  }
  return PoolBnFn::apply(x, gamma.defined() ? gamma : placeholder(x), bn.running_mean, bn.running_var, max_pool, stride,
                         p.training, p.momentum, p.eps);
}

Tensor fused_pool(const Tensor& x, bool max_pool, int64_t stride) {
  if (own_kernel(x) && no_record({&x})) return pool(x, max_pool, stride);  // no node where no gradient can be asked
  return PoolFn::apply(x, max_pool, stride);
}

Tensor weighted_sum(const Tensor& w, const std::vector<Tensor>& ys, const std::vector<bool>& prescaled) {
  TORCH_CHECK(!ys.empty() && w.dim() == 1 && w.size(0) == static_cast<int64_t>(ys.size()),
              "weighted_sum: ", ys.size(), " tensors and weights of shape ", w.sizes());
  TORCH_CHECK(prescaled.empty() || prescaled.size() == ys.size(), "weighted_sum: ", prescaled.size(),
              " prescaled flags for ", ys.size(), " tensors");
  const std::vector<bool> unit = prescaled.empty() ? std::vector<bool>(ys.size(), false) : prescaled;
  bool needs_grad = torch::GradMode::is_enabled() && w.requires_grad();
  for (const auto& y : ys) needs_grad = needs_grad || (torch::GradMode::is_enabled() && y.requires_grad());
  Tensor out;
  {
    torch::NoGradGuard ng;
    out = weighted_sum_forward(w, ys, unit);
  }
  if (!needs_grad) return out;
  auto node = std::shared_ptr<WeightedSumBackward>(new WeightedSumBackward(), torch::autograd::deleteNode);
  node->set_next_edges(torch::autograd::collect_next_edges(w, ys));
  node->w_ = torch::autograd::SavedVariable(w, false);
  node->k_ = static_cast<int64_t>(ys.size());
  node->unit_ = unit;
  // The op outputs serve only the weights' gradient: not kept when w needs none (the search's
  // weight step freezes the architecture), which frees e.g. the noisy skip's output.
  if (torch::GradMode::is_enabled() && w.requires_grad())
    for (size_t j = 0; j < ys.size(); ++j)
      node->ys_.push_back(unit[j] ? torch::autograd::SavedVariable() : torch::autograd::SavedVariable(ys[j], false));
  torch::autograd::set_history(out, node);
  return out;
}

ChannelConcat::ChannelConcat(int64_t parts) : placed_(static_cast<size_t>(parts)) {
  TORCH_CHECK(parts > 0, "ChannelConcat needs at least one part");
}

Tensor ChannelConcat::place(int64_t slot, const std::vector<Tensor>& summands) {
  TORCH_CHECK(!summands.empty(), "ChannelConcat: nothing to place in slot ", slot);
  for (const auto& t : summands)
    TORCH_CHECK(t.sizes() == summands[0].sizes(), "ChannelConcat: summands of shapes ", summands[0].sizes(), " and ", t.sizes());
  const Tensor& part = summands[0];
  TORCH_CHECK(slot >= 0 && slot < static_cast<int64_t>(placed_.size()) && !placed_[slot].defined(),
              "ChannelConcat: slot ", slot, " of ", placed_.size(), " placed twice or out of range");
  TORCH_CHECK(part.dim() == 4, "ChannelConcat: parts are [N, C, H, W], got ", part.sizes());
  const int64_t k = static_cast<int64_t>(placed_.size());
  if (!buffer_.defined()) {
    width_ = part.size(1);
    buffer_ = torch::empty({part.size(0), k * width_, part.size(2), part.size(3)}, part.options().requires_grad(false));
  }
  TORCH_CHECK(part.size(0) == buffer_.size(0) && part.size(1) == width_ && part.size(2) == buffer_.size(2) &&
                  part.size(3) == buffer_.size(3),
              "ChannelConcat: part ", slot, " of shape ", part.sizes(), " does not match ", buffer_.sizes());
  placed_[slot] = PlaceFn::apply(at::TensorList(summands), buffer_, slot * width_);  // TensorList: each one an input
  return placed_[slot];
}

Tensor ChannelConcat::output() const {
  for (size_t i = 0; i < placed_.size(); ++i) TORCH_CHECK(placed_[i].defined(), "ChannelConcat: slot ", i, " not placed");
  Tensor out;
  {
    torch::NoGradGuard ng;
    out = buffer_.detach();  // a tensor of its own over the buffer's memory, for the history below
  }
  bool needs_grad = false;
  for (const auto& p : placed_) needs_grad = needs_grad || p.requires_grad();
  if (!torch::GradMode::is_enabled() || !needs_grad) return out;
  auto node = std::shared_ptr<ConcatBackward>(new ConcatBackward(), torch::autograd::deleteNode);
  node->set_next_edges(torch::autograd::collect_next_edges(placed_));
  for (size_t i = 0; i < placed_.size(); ++i) node->offsets.push_back(static_cast<int64_t>(i) * width_), node->widths.push_back(width_);
  torch::autograd::set_history(out, node);
  return out;
}

WeightsFrozen::WeightsFrozen(std::vector<torch::Tensor> params) : params_(std::move(params)) {
  for (auto& p : params_) {
    was_.push_back(p.requires_grad());
    p.set_requires_grad(false);
  }
}

WeightsFrozen::~WeightsFrozen() {
  for (size_t i = 0; i < params_.size(); ++i) params_[i].set_requires_grad(was_[i]);
}

}  // namespace noisydarts
