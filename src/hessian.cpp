#include "noisydarts/hessian.h"

#include <cmath>

namespace noisydarts {

namespace F = torch::nn::functional;

BufferRestore::BufferRestore(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (auto& b : m.buffers()) {
    live_.push_back(b);
    saved_.push_back(b.clone());
  }
}

BufferRestore::~BufferRestore() {
  torch::NoGradGuard ng;
  for (size_t i = 0; i < live_.size(); ++i) live_[i].copy_(saved_[i]);
}

RngFork::RngFork(torch::Device device) : device_(device) {
  auto cpu = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu_ = cpu.get_state();
  }
  if (!device_.is_cpu()) {
    auto g = at::globalContext().defaultGenerator(device_);
    std::lock_guard<std::mutex> lock(g.mutex());
    dev_ = g.get_state();
  }
}

void RngFork::replay() const {
  auto cpu = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu.set_state(cpu_);
  }
  if (dev_.defined()) {
    auto g = at::globalContext().defaultGenerator(device_);
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_state(dev_);
  }
}

std::vector<torch::Tensor> grads_or_zero(const torch::Tensor& loss, const std::vector<torch::Tensor>& inputs,
                                         bool retain_graph, bool create_graph) {
  auto g = torch::autograd::grad({loss}, inputs, {}, retain_graph, create_graph, /*allow_unused=*/true);
  for (size_t i = 0; i < g.size(); ++i)
    if (!g[i].defined()) g[i] = torch::zeros_like(inputs[i]);
  return g;
}

double global_norm(const std::vector<torch::Tensor>& ts) {
  double s = 0;
  for (const auto& t : ts) s += t.detach().to(torch::kDouble).pow(2).sum().item<double>();
  return std::sqrt(s);
}

namespace {

torch::Tensor batch_loss(SearchNetwork& net, const Batch& b, torch::Tensor* logits = nullptr) {
  auto lg = net->forward(b.x);
  if (logits) *logits = lg.detach();
  return F::cross_entropy(lg, b.y);
}

void reduce_if(const GradReducer& reduce, std::vector<torch::Tensor>& g) {
  if (reduce) reduce(g);
}

/// w_i <- base_i + scale * dir_i for every weight (in place, no autograd history).
void set_weights(std::vector<torch::Tensor>& w, const std::vector<torch::Tensor>& base, double scale,
                 const std::vector<torch::Tensor>& dir) {
  torch::NoGradGuard ng;
  for (size_t i = 0; i < w.size(); ++i) {
    w[i].copy_(base[i]);
    if (scale != 0) w[i].add_(dir[i], scale);
  }
}

std::vector<torch::Tensor> clone_all(const std::vector<torch::Tensor>& ts) {
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.detach().clone());
  return out;
}

std::vector<torch::Tensor> fd_hvp_at(SearchNetwork& net, std::vector<torch::Tensor>& w,
                                     const std::vector<torch::Tensor>& w0, const Batch& batch,
                                     const std::vector<torch::Tensor>& v, double r, const GradReducer& reduce) {
  auto alphas = net->arch_parameters();
  const double norm = global_norm(v);
  if (!(norm > 0) || !std::isfinite(norm)) {
    std::vector<torch::Tensor> z;
    for (auto& a : alphas) z.push_back(torch::zeros_like(a));
    return z;
  }
  const double eps = r / norm;
  const RngFork fork(batch.x.device());
  set_weights(w, w0, eps, v);
  auto gp = grads_or_zero(batch_loss(net, batch), alphas);
  reduce_if(reduce, gp);
  fork.replay();  // the minus pass sees the same noise and drop-path draws
  set_weights(w, w0, -eps, v);
  auto gn = grads_or_zero(batch_loss(net, batch), alphas);
  reduce_if(reduce, gn);
  set_weights(w, w0, 0, v);
  std::vector<torch::Tensor> h;
  for (size_t i = 0; i < gp.size(); ++i) h.push_back((gp[i] - gn[i]) / (2 * eps));
  return h;
}

}  // namespace

std::vector<torch::Tensor> finite_difference_mixed_hvp(SearchNetwork& net, const Batch& batch,
                                                       const std::vector<torch::Tensor>& v, double r,
                                                       const GradReducer& reduce) {
  BufferRestore keep(*net);
  auto w = net->weight_parameters();
  const auto w0 = clone_all(w);
  return fd_hvp_at(net, w, w0, batch, v, r, reduce);
}

UnrolledGradient unrolled_alpha_gradient(SearchNetwork& net, const Batch& valid, const Batch& train,
                                         const std::vector<torch::Tensor>& momentum_buffers,
                                         const UnrolledOptions& opt, const GradReducer& reduce) {
  BufferRestore keep(*net);
  auto w = net->weight_parameters();
  auto alphas = net->arch_parameters();
  const auto w0 = clone_all(w);

  // 1. The virtual SGD step w' = w - xi * (momentum * buf + grad_w L_train(w) + wd * w).
  auto gw = grads_or_zero(batch_loss(net, train), w);
  reduce_if(reduce, gw);
  {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < w.size(); ++i) {
      auto d = gw[i] + opt.weight_decay * w0[i];
      if (i < momentum_buffers.size() && momentum_buffers[i].defined()) d = d + opt.momentum * momentum_buffers[i];
      w[i].sub_(d, opt.xi);
    }
  }
  gw.clear();

  // 2. L_val(w', alpha): its gradient w.r.t. the alphas and v = its gradient w.r.t. w'.
  UnrolledGradient out;
  torch::Tensor logits;
  auto lv = batch_loss(net, valid, &logits);
  std::vector<torch::Tensor> inputs = alphas;
  inputs.insert(inputs.end(), w.begin(), w.end());
  auto g = grads_or_zero(lv, inputs);
  reduce_if(reduce, g);
  out.valid_loss = lv.item<double>();
  out.correct = logits.argmax(1).eq(valid.y).sum().item<int64_t>();
  std::vector<torch::Tensor> v(g.begin() + static_cast<long>(alphas.size()), g.end());

  // 3. Back to w, then the implicit term by central differences around w.
  set_weights(w, w0, 0, v);
  auto hv = fd_hvp_at(net, w, w0, train, v, opt.fd_r, reduce);
  for (size_t i = 0; i < alphas.size(); ++i) out.alpha_grad.push_back(g[i] - opt.xi * hv[i]);
  return out;
}

std::vector<torch::Tensor> alpha_hessian_vector_product(SearchNetwork& net, const Batch& batch,
                                                        const std::vector<torch::Tensor>& v) {
  BufferRestore keep(*net);
  NoiseSuspend quiet(net->noise());
  auto alphas = net->arch_parameters();
  auto g = grads_or_zero(batch_loss(net, batch), alphas, true, true);
  torch::Tensor dot;
  for (size_t i = 0; i < g.size(); ++i)
    if (g[i].requires_grad()) dot = dot.defined() ? dot + (g[i] * v[i]).sum() : (g[i] * v[i]).sum();
  if (!dot.defined()) {
    std::vector<torch::Tensor> z;
    for (auto& a : alphas) z.push_back(torch::zeros_like(a));
    return z;
  }
  return grads_or_zero(dot, alphas);
}

AlphaHvp alpha_hvp_on_batch(SearchNetwork& net, const Batch& batch) {
  BufferRestore keep(*net);
  NoiseSuspend quiet(net->noise());
  auto alphas = net->arch_parameters();
  auto g = grads_or_zero(batch_loss(net, batch), alphas, true, true);
  // Alphas outside the graph (zero gradient, no history) have zero Hessian rows.
  std::vector<size_t> live;
  for (size_t i = 0; i < g.size(); ++i)
    if (g[i].requires_grad()) live.push_back(i);
  return [alphas, g, live](const std::vector<torch::Tensor>& v) {
    std::vector<torch::Tensor> hv;
    for (auto& a : alphas) hv.push_back(torch::zeros_like(a));
    if (live.empty()) return hv;
    std::vector<torch::Tensor> outs, vs, ins;
    for (size_t i : live) {
      outs.push_back(g[i]);
      vs.push_back(v[i]);
      ins.push_back(alphas[i]);
    }
    auto hl = torch::autograd::grad(outs, ins, vs, /*retain_graph=*/true, /*create_graph=*/false, true);
    for (size_t k = 0; k < live.size(); ++k)
      if (hl[k].defined()) hv[live[k]] = hl[k].detach();
    return hv;
  };
}

namespace {

double dot(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (a[i].to(torch::kDouble) * b[i].to(torch::kDouble)).sum().item<double>();
  return s;
}

double normalize(std::vector<torch::Tensor>& x) {
  const double n = global_norm(x);
  if (n > 0)
    for (auto& t : x) t.div_(n);
  return n;
}

/// x <- x - sum_k (x . u_k) u_k for orthonormal u_k.
void project_out(std::vector<torch::Tensor>& x, const std::vector<EigenResult>& found) {
  for (const auto& f : found) {
    const double c = dot(x, f.vector);
    for (size_t i = 0; i < x.size(); ++i) x[i].sub_(f.vector[i] * c);
  }
}

}  // namespace

std::vector<EigenResult> top_eigenpairs(const AlphaHvp& hvp, const std::vector<torch::Tensor>& like, int k,
                                        const EigenOptions& opt) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(opt.seed);
  std::vector<EigenResult> found;
  for (int n = 0; n < k; ++n) {
    std::vector<torch::Tensor> v;
    for (auto& a : like)
      v.push_back(torch::randn(a.sizes(), gen, torch::TensorOptions().dtype(a.scalar_type())).to(a.device()));
    project_out(v, found);
    normalize(v);
    EigenResult res;
    double prev = 0;
    for (int it = 0; it < opt.max_iters; ++it) {
      auto hv = hvp(v);
      const double lambda = dot(v, hv);
      res.eigenvalue = lambda;
      res.iterations = it + 1;
      if (it > 0 && std::abs(lambda - prev) <= opt.tol * std::abs(lambda)) {
        res.converged = true;
        break;
      }
      prev = lambda;
      // Deflation: the iteration runs in the complement of the eigenvectors already found.
      project_out(hv, found);
      if (normalize(hv) == 0) {  // H v = 0: v is in the null space, the Rayleigh quotient is 0
        res.converged = true;
        break;
      }
      v = hv;
    }
    // Exactly orthonormal to the earlier vectors (power iteration drifts by rounding).
    project_out(v, found);
    normalize(v);
    res.vector = v;
    found.push_back(res);
  }
  return found;
}

EigenResult hessian_dominant_eigenvalue(SearchNetwork& net, const Batch& batch, const EigenOptions& opt) {
  return top_eigenpairs(alpha_hvp_on_batch(net, batch), net->arch_parameters(), 1, opt)[0];
}

}  // namespace noisydarts
