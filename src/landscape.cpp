#include "noisydarts/landscape.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>
#include <sstream>

#include "noisydarts/error.h"
#include "noisydarts/hessian.h"
#include "noisydarts/search.h"

namespace noisydarts {
namespace fs = std::filesystem;
using nlohmann::json;

std::vector<double> grid_coords(int n, double span) {
  if (n < 2) throw UsageError("a landscape grid needs at least 2 points per axis");
  std::vector<double> c(n);
  const double mid = (n - 1) / 2.0;  // i - mid is exact, and antisymmetric in i <-> n-1-i
  for (int i = 0; i < n; ++i) c[i] = span * ((i - mid) / mid);
  return c;
}

std::vector<std::vector<double>> evaluate_grid(
    const std::vector<torch::Tensor>& center, const std::vector<torch::Tensor>& d1, const std::vector<torch::Tensor>& d2,
    const std::vector<double>& coords, const std::function<double(const std::vector<torch::Tensor>&)>& f,
    const std::function<void(int, int)>& row_done) {
  torch::NoGradGuard ng;
  const int n = static_cast<int>(coords.size());
  std::vector<std::vector<double>> v(n, std::vector<double>(n));
  std::vector<torch::Tensor> x(center.size());
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      for (size_t k = 0; k < center.size(); ++k) x[k] = center[k] + coords[i] * d1[k] + coords[j] * d2[k];
      v[i][j] = f(x);
    }
    if (row_done) row_done(i + 1, n);
  }
  return v;
}

std::vector<torch::Tensor> random_direction(const std::vector<torch::Tensor>& alphas, uint64_t seed, bool filter) {
  torch::NoGradGuard ng;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<torch::Tensor> d;
  for (const auto& a : alphas) {
    auto r = torch::randn(a.sizes(), gen, torch::TensorOptions().dtype(torch::kDouble));
    auto a2 = a.detach().to(torch::kCPU, torch::kDouble).reshape({a.size(0), -1});
    auto r2 = r.reshape({a.size(0), -1});
    auto target = filter ? a2.norm(2, 1, true) : torch::ones({a.size(0), 1}, torch::kDouble);
    target = torch::where(target > 0, target, torch::ones_like(target));
    r2 = r2 / r2.norm(2, 1, true) * target;
    d.push_back(r2.reshape(a.sizes()).to(a.device(), a.scalar_type()));
  }
  return d;
}

double architecture_loss(SearchNetwork& net, const std::vector<Batch>& batches, const std::vector<torch::Tensor>& alphas) {
  torch::NoGradGuard ng;
  BufferRestore keep(*net);
  NoiseSuspend quiet(net->noise());
  const bool was_training = net->is_training();
  net->train();
  auto params = net->arch_parameters();
  std::vector<torch::Tensor> saved;
  for (size_t i = 0; i < params.size(); ++i) {
    saved.push_back(params[i].detach().clone());
    params[i].copy_(alphas[i]);
  }
  double sum = 0;
  int64_t n = 0;
  for (const auto& b : batches) {
    const auto logits = net->forward(b.x);
    sum += torch::nn::functional::cross_entropy(logits, b.y).item<double>() * static_cast<double>(b.y.size(0));
    n += b.y.size(0);
  }
  for (size_t i = 0; i < params.size(); ++i) params[i].copy_(saved[i]);
  net->train(was_training);
  return n > 0 ? sum / static_cast<double>(n) : std::numeric_limits<double>::quiet_NaN();
}

json Landscape::to_json() const {
  double lo = std::numeric_limits<double>::infinity();
  int bi = 0, bj = 0;
  for (size_t i = 0; i < loss.size(); ++i)
    for (size_t j = 0; j < loss[i].size(); ++j)
      if (loss[i][j] < lo) lo = loss[i][j], bi = static_cast<int>(i), bj = static_cast<int>(j);
  const size_t c = coords.size() / 2;
  json j{{"checkpoint", checkpoint},
         {"run", run},
         {"epoch", epoch},
         {"step", step},
         {"directions", options.directions},
         {"normalisation", options.directions == "random" ? (options.filter_norm ? "filter" : "unit") : "global unit"},
         {"seed", options.seed},
         {"batches", options.batches},
         {"grid", options.grid},
         {"span", options.span},
         {"coords", coords},
         {"loss", loss},
         {"center_loss", loss.empty() ? 0.0 : loss[c][c]},
         {"min", {{"a", coords.empty() ? 0.0 : coords[bi]}, {"b", coords.empty() ? 0.0 : coords[bj]}, {"loss", lo}}},
         {"genotype", genotype},
         {"seconds", seconds}};
  if (!eigenvalues.empty()) j["eigenvalues"] = eigenvalues;
  return j;
}

Landscape compute_landscape(const std::string& checkpoint, const LandscapeOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  if (opt.grid < 3 || opt.grid % 2 == 0 || opt.grid > 201)
    throw UsageError("--grid " + std::to_string(opt.grid) + ": use an odd number of points from 3 to 201 (the centre is the checkpoint's alphas)");
  if (!(opt.span > 0) || !std::isfinite(opt.span)) throw UsageError("--span must be a positive number");
  if (opt.directions != "random" && opt.directions != "hessian")
    throw UsageError("--directions " + opt.directions + ": use random or hessian");
  if (opt.batches < 1) throw UsageError("--batches must be at least 1");
  SearchSnapshot snap = open_search_checkpoint(checkpoint, opt.threads, opt.device, opt.batches);
  Landscape L;
  L.checkpoint = snap.file;
  fs::path run = fs::path(snap.file).parent_path();
  if (run.filename() == "checkpoints") run = run.parent_path();
  L.run = run.filename().string();
  L.epoch = snap.epoch;
  L.step = snap.step;
  L.options = opt;
  L.options.progress = nullptr;
  L.options.batches = static_cast<int64_t>(snap.batches.size());
  L.genotype = genotype_to_text(snap.net->genotype());

  std::vector<torch::Tensor> center;
  for (const auto& a : snap.net->arch_parameters()) center.push_back(a.detach().clone());
  std::vector<torch::Tensor> d1, d2;
  if (opt.directions == "random") {
    d1 = random_direction(center, opt.seed * 2 + 1, opt.filter_norm);
    d2 = random_direction(center, opt.seed * 2 + 2, opt.filter_norm);
  } else {
    const auto eig = top_eigenpairs(alpha_hvp_on_batch(snap.net, snap.batches.front()), center, 2,
                                    EigenOptions{opt.hessian_iters, 1e-4, opt.seed});
    d1 = eig[0].vector;
    d2 = eig[1].vector;
    L.eigenvalues = {eig[0].eigenvalue, eig[1].eigenvalue};
  }
  L.coords = grid_coords(opt.grid, opt.span);
  L.loss = evaluate_grid(
      center, d1, d2, L.coords, [&](const std::vector<torch::Tensor>& a) { return architecture_loss(snap.net, snap.batches, a); },
      opt.progress);
  L.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return L;
}

// ------------------------------------------------------------------------------------------
// Drawing
// ------------------------------------------------------------------------------------------

namespace {

std::string f2(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f", v);
  return b;
}

std::string num(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.4g", v);
  return b;
}

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '&') o += "&amp;";
    else if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '"') o += "&quot;";
    else o += c;
  }
  return o;
}

/// Viridis-like colour of t in [0, 1] (dark blue low, yellow high).
std::string colour(double t) {
  static const double stops[5][3] = {{68, 1, 84}, {59, 82, 139}, {33, 145, 140}, {94, 201, 98}, {253, 231, 37}};
  t = std::clamp(t, 0.0, 1.0) * 4;
  const int k = std::min(3, static_cast<int>(t));
  const double u = t - k;
  char b[16];
  std::snprintf(b, sizeof b, "#%02x%02x%02x", static_cast<int>(std::lround(stops[k][0] + u * (stops[k + 1][0] - stops[k][0]))),
                static_cast<int>(std::lround(stops[k][1] + u * (stops[k + 1][1] - stops[k][1]))),
                static_cast<int>(std::lround(stops[k][2] + u * (stops[k + 1][2] - stops[k][2]))));
  return b;
}

/// Marching squares: the segments of the level-`level` contour of v over the unit grid
/// (point (i, j) at x = i, y = j), appended to `path` through `X`, `Y`.
void contour(const std::vector<std::vector<double>>& v, double level, const std::function<double(double)>& X,
             const std::function<double(double)>& Y, std::ostringstream& path) {
  const size_t n = v.size();
  auto lerp = [&](double x0, double y0, double a, double x1, double y1, double b) {
    const double t = (level - a) / (b - a);
    return std::pair<double, double>{x0 + t * (x1 - x0), y0 + t * (y1 - y0)};
  };
  for (size_t i = 0; i + 1 < n; ++i)
    for (size_t j = 0; j + 1 < n; ++j) {
      const double a = v[i][j], b = v[i + 1][j], c = v[i + 1][j + 1], d = v[i][j + 1];
      std::vector<std::pair<double, double>> pts;
      const double x = static_cast<double>(i), y = static_cast<double>(j);
      if ((a < level) != (b < level)) pts.push_back(lerp(x, y, a, x + 1, y, b));
      if ((b < level) != (c < level)) pts.push_back(lerp(x + 1, y, b, x + 1, y + 1, c));
      if ((c < level) != (d < level)) pts.push_back(lerp(x + 1, y + 1, c, x, y + 1, d));
      if ((d < level) != (a < level)) pts.push_back(lerp(x, y + 1, d, x, y, a));
      for (size_t k = 0; k + 1 < pts.size(); k += 2)
        path << "M" << f2(X(pts[k].first)) << " " << f2(Y(pts[k].second)) << "L" << f2(X(pts[k + 1].first)) << " "
             << f2(Y(pts[k + 1].second));
    }
}

}  // namespace

std::string landscape_svg(const std::vector<Landscape>& panels) {
  // One colour scale over all panels: log(loss) when every loss is positive (cross-entropy is),
  // so the basin keeps its detail next to the steep rim; linear otherwise.
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& L : panels)
    for (const auto& row : L.loss)
      for (double x : row)
        if (std::isfinite(x)) lo = std::min(lo, x), hi = std::max(hi, x);
  if (!std::isfinite(lo)) lo = 0, hi = 1;
  const bool logscale = lo > 0;
  auto tr = [&](double x) { return logscale ? std::log(x) : x; };
  const double tlo = tr(lo), thi = tr(hi) > tr(lo) ? tr(hi) : tr(lo) + 1;
  auto T = [&](double x) { return std::isfinite(x) ? (tr(x) - tlo) / (thi - tlo) : 1.0; };

  const double side = 300, ml = 52, mt = 30, gap = 40, bar = 100, mb = 44;
  const double w = ml + panels.size() * (side + gap) + bar, h = mt + side + mb;
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"landscape\" width=\"" << f2(w) << "\" height=\"" << f2(h)
    << "\" viewBox=\"0 0 " << f2(w) << " " << f2(h) << "\" data-loss-range=\"" << num(lo) << " " << num(hi)
    << "\" data-colour-scale=\"" << (logscale ? "log" : "linear") << "\" font-family=\"DejaVu Sans,Arial,sans-serif\" font-size=\"11\">\n";
  o << "<title>validation loss over alpha + a d1 + b d2</title>\n";
  // Contour levels: 10 equal steps of the colour scale.
  std::vector<double> levels;
  for (int k = 1; k < 10; ++k) {
    const double t = tlo + k * (thi - tlo) / 10;
    levels.push_back(logscale ? std::exp(t) : t);
  }
  for (size_t p = 0; p < panels.size(); ++p) {
    const Landscape& L = panels[p];
    const size_t n = L.coords.size();
    if (n < 2) continue;
    const double x0 = ml + p * (side + gap), cell = side / static_cast<double>(n - 1);
    // Grid point i sits at the centre of its square; the squares tile the panel.
    const double pad = cell / 2, inner = side - cell;
    auto X = [&](double i) { return x0 + pad + i * inner / static_cast<double>(n - 1); };
    auto Y = [&](double j) { return mt + side - pad - j * inner / static_cast<double>(n - 1); };
    o << "<g class=\"panel\" data-run=\"" << esc(L.run) << "\" data-epoch=\"" << L.epoch << "\" data-directions=\""
      << esc(L.options.directions) << "\">\n";
    o << "<text x=\"" << f2(x0) << "\" y=\"" << f2(mt - 10) << "\" font-size=\"12\" font-weight=\"bold\">" << esc(L.run)
      << " (epoch " << L.epoch << ", " << esc(L.options.directions) << " directions)</text>\n";
    const double cw = inner / static_cast<double>(n - 1);
    for (size_t i = 0; i < n; ++i)
      for (size_t j = 0; j < n; ++j)
        o << "<rect x=\"" << f2(X(i) - cw / 2) << "\" y=\"" << f2(Y(j) - cw / 2) << "\" width=\"" << f2(cw + 0.3)
          << "\" height=\"" << f2(cw + 0.3) << "\" fill=\"" << colour(T(L.loss[i][j])) << "\"><title>a " << num(L.coords[i])
          << ", b " << num(L.coords[j]) << ": loss " << num(L.loss[i][j]) << "</title></rect>\n";
    std::ostringstream path;
    for (double lv : levels) contour(L.loss, lv, X, Y, path);
    o << "<path class=\"contours\" d=\"" << path.str() << "\" fill=\"none\" stroke=\"#ffffff\" stroke-opacity=\"0.75\" stroke-width=\"0.8\"/>\n";
    o << "<rect x=\"" << f2(x0) << "\" y=\"" << f2(mt) << "\" width=\"" << f2(side) << "\" height=\"" << f2(side)
      << "\" fill=\"none\" stroke=\"#808080\"/>\n";
    // Centre (the checkpoint's alphas) and minimum.
    const double c = static_cast<double>(n / 2);
    o << "<path class=\"centre\" d=\"M" << f2(X(c) - 6) << " " << f2(Y(c)) << "h12M" << f2(X(c)) << " " << f2(Y(c) - 6)
      << "v12\" stroke=\"#000000\" stroke-width=\"2\"><title>the checkpoint's alphas: loss " << num(L.loss[n / 2][n / 2])
      << "</title></path>\n";
    size_t bi = 0, bj = 0;
    for (size_t i = 0; i < n; ++i)
      for (size_t j = 0; j < n; ++j)
        if (L.loss[i][j] < L.loss[bi][bj]) bi = i, bj = j;
    o << "<circle class=\"minimum\" cx=\"" << f2(X(bi)) << "\" cy=\"" << f2(Y(bj)) << "\" r=\"5\" fill=\"none\" stroke=\"#ff2020\" "
      << "stroke-width=\"2.2\" data-a=\"" << num(L.coords[bi]) << "\" data-b=\"" << num(L.coords[bj]) << "\" data-loss=\""
      << num(L.loss[bi][bj]) << "\"><title>minimum: loss " << num(L.loss[bi][bj]) << " at a " << num(L.coords[bi]) << ", b "
      << num(L.coords[bj]) << "</title></circle>\n";
    // Axes: a along d1 (x), b along d2 (y).
    for (size_t k : {size_t{0}, n / 2, n - 1}) {
      o << "<text x=\"" << f2(X(k)) << "\" y=\"" << f2(mt + side + 14) << "\" text-anchor=\"middle\">" << num(L.coords[k]) << "</text>";
      o << "<text x=\"" << f2(x0 - 4) << "\" y=\"" << f2(Y(k) + 4) << "\" text-anchor=\"end\">" << num(L.coords[k]) << "</text>\n";
    }
    o << "<text x=\"" << f2(x0 + side / 2) << "\" y=\"" << f2(mt + side + 30) << "\" text-anchor=\"middle\">a (d1"
      << (L.eigenvalues.empty() ? "" : ", eigenvalue " + num(L.eigenvalues[0])) << ")</text>\n";
    o << "<text transform=\"translate(" << f2(x0 - 36) << " " << f2(mt + side / 2) << ") rotate(-90)\" text-anchor=\"middle\">b (d2"
      << (L.eigenvalues.size() < 2 ? "" : ", eigenvalue " + num(L.eigenvalues[1])) << ")</text>\n";
    o << "</g>\n";
  }
  // Colour bar.
  const double bx = ml + panels.size() * (side + gap);
  for (int k = 0; k < 50; ++k)
    o << "<rect x=\"" << f2(bx) << "\" y=\"" << f2(mt + side - (k + 1) * side / 50) << "\" width=\"14\" height=\"" << f2(side / 50 + 0.3)
      << "\" fill=\"" << colour((k + 0.5) / 50) << "\"/>";
  o << "\n";
  for (int k = 0; k <= 4; ++k) {
    const double t = tlo + k * (thi - tlo) / 4;
    o << "<text x=\"" << f2(bx + 18) << "\" y=\"" << f2(mt + side - k * side / 4 + 4) << "\">" << num(logscale ? std::exp(t) : t)
      << "</text>";
  }
  o << "<text x=\"" << f2(bx) << "\" y=\"" << f2(mt + side + 16) << "\">loss" << (logscale ? " (log scale)" : "") << "</text>\n";
  o << "</svg>\n";
  return o.str();
}

}  // namespace noisydarts
