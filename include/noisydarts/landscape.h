#pragma once
/// Loss landscapes of the architecture (docs/analysis.md): the validation loss on a 2-D grid of
/// alpha perturbations alpha + a d1 + b d2, with the weights fixed, the noise and skip drop-path
/// off, BatchNorm in training mode with batch statistics (as the architecture step sees it; the
/// running statistics are restored), on fixed architecture-half batches. d1, d2 are random
/// directions normalised per edge (filter normalisation: each edge's direction has the norm of
/// that edge's alphas) or the top-2 eigenvectors of the alpha Hessian.
#include <nlohmann/json.hpp>
#include <functional>
#include <string>
#include <torch/torch.h>
#include <vector>

#include "noisydarts/data.h"
#include "noisydarts/search_network.h"

namespace noisydarts {

/// n equally spaced coordinates from -span to span, exactly antisymmetric (c[n-1-i] == -c[i]) and
/// with an exact 0 in the middle when n is odd. n >= 2.
std::vector<double> grid_coords(int n, double span);

/// values[i][j] = f(center + coords[i] d1 + coords[j] d2) (a along d1 indexes rows), without
/// autograd; `row_done(rows done, rows)` after every row.
std::vector<std::vector<double>> evaluate_grid(
    const std::vector<torch::Tensor>& center, const std::vector<torch::Tensor>& d1, const std::vector<torch::Tensor>& d2,
    const std::vector<double>& coords, const std::function<double(const std::vector<torch::Tensor>&)>& f,
    const std::function<void(int, int)>& row_done = {});

/// A random direction shaped like `alphas` (standard normal from its own generator seeded with
/// `seed`), normalised per edge (per row of each alpha table): to the norm of that row of
/// `alphas` when `filter` (rows that are all zero get unit norm), else to unit norm.
std::vector<torch::Tensor> random_direction(const std::vector<torch::Tensor>& alphas, uint64_t seed, bool filter);

/// The mean cross-entropy over `batches` (weighted by batch size) with the network's alphas set
/// to `alphas` for the call: training-mode BatchNorm with batch statistics, noise and drop-path
/// off, no autograd; the alphas and every buffer are restored afterwards.
double architecture_loss(SearchNetwork& net, const std::vector<Batch>& batches, const std::vector<torch::Tensor>& alphas);

struct LandscapeOptions {
  int grid = 21;                     ///< points per axis (>= 3)
  double span = 1.0;                 ///< the grid covers [-span, span]^2
  std::string directions = "random"; ///< random | hessian
  bool filter_norm = true;           ///< random directions: per-edge filter normalisation (else unit rows)
  int64_t batches = 2;               ///< architecture-half batches the loss is averaged over
  uint64_t seed = 0;                 ///< random directions' seed
  int hessian_iters = 50;            ///< power-iteration steps per eigenvector (hessian directions)
  int threads = -1;                  ///< < 0: the run's
  std::string device;                ///< empty: the run's
  /// Called after every grid row with (rows done, rows in all).
  std::function<void(int, int)> progress;
};

struct Landscape {
  std::string checkpoint;            ///< the file evaluated
  std::string run;                   ///< a short label (run directory name)
  int64_t epoch = 0, step = 0;
  LandscapeOptions options;
  std::vector<double> coords;
  std::vector<std::vector<double>> loss;  ///< loss[i][j] at (coords[i], coords[j])
  std::vector<double> eigenvalues;         ///< hessian directions: the two eigenvalues
  std::string genotype;                    ///< derived from the checkpoint's alphas
  double seconds = 0;
  nlohmann::json to_json() const;
};

/// Computes the landscape of a search checkpoint (a .pt file or a run directory: its latest).
Landscape compute_landscape(const std::string& checkpoint, const LandscapeOptions& opt);

/// The landscape(s) as one SVG: per landscape a heat map with contour lines, the centre (the
/// checkpoint's alphas) and the minimum marked, all on one colour scale with a colour bar.
std::string landscape_svg(const std::vector<Landscape>& panels);

}  // namespace noisydarts
