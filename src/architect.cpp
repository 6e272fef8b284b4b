#include "noisydarts/architect.h"

#include "noisydarts/checkpoint.h"
#include "noisydarts/fused_ops.h"
#include "noisydarts/hessian.h"

namespace noisydarts {

void reduce_param_grads(std::vector<torch::Tensor> params, const GradReducer& reduce) {
  std::vector<torch::Tensor> g;
  for (const auto& p : params) g.push_back(p.grad().defined() ? p.grad() : torch::zeros_like(p));
  reduce(g);
  for (size_t i = 0; i < params.size(); ++i) params[i].mutable_grad() = g[i];
}

Architect::Architect(SearchNetwork net, ArchitectOptions opt) : net_(std::move(net)) {
  adam_ = std::make_unique<torch::optim::Adam>(
      net_->arch_parameters(), torch::optim::AdamOptions(opt.lr)
                                   .betas({opt.beta1, opt.beta2})
                                   .weight_decay(opt.weight_decay));
}

ArchStepResult Architect::step(const Batch& valid) {
  auto alphas = net_->arch_parameters();
  // The weights are constants of this step: frozen, the forward records no weight-gradient
  // paths (and the fused ops compute no weight gradients).
  WeightsFrozen frozen(net_->weight_parameters());
  auto logits = net_->forward(valid.x);
  auto loss = torch::nn::functional::cross_entropy(logits, valid.y);
  torch::Tensor total = loss;
  if (penalty_) {
    auto p = penalty_();
    if (p.defined()) total = loss + p;
  }
  // Only the alphas' gradient is needed: autograd::grad leaves the weights' .grad untouched and
  // computes no weight gradients. With very few layers every cell may be a reduction cell,
  // leaving alphas_normal out of the graph; its gradient is then zero.
  apply(grads_or_zero(total, alphas), /*reduce=*/true);
  ArchStepResult r;
  r.loss = loss.item<double>();
  r.correct = logits.argmax(1).eq(valid.y).sum().item<int64_t>();
  return r;
}

ArchStepResult Architect::evaluate(const Batch& valid) {
  torch::NoGradGuard g;
  auto logits = net_->forward(valid.x);
  ArchStepResult r;
  r.loss = torch::nn::functional::cross_entropy(logits, valid.y).item<double>();
  r.correct = logits.argmax(1).eq(valid.y).sum().item<int64_t>();
  return r;
}

void Architect::apply(std::vector<torch::Tensor> grads, bool reduce) {
  auto alphas = net_->arch_parameters();
  if (reduce && reduce_) reduce_(grads);
  for (size_t i = 0; i < alphas.size(); ++i) alphas[i].mutable_grad() = grads[i];
  adam_->step();
  for (auto& a : alphas) a.mutable_grad() = torch::Tensor();
}

ArchStepResult Architect::step_unrolled(const Batch& valid, const Batch& train, torch::optim::SGD& sgd, double xi) {
  auto weights = net_->weight_parameters();
  const auto& o = static_cast<const torch::optim::SGDOptions&>(sgd.param_groups().at(0).options());
  UnrolledOptions uo;
  uo.xi = xi;
  uo.momentum = o.momentum();
  uo.weight_decay = o.weight_decay();
  // Every gradient inside is averaged across ranks, so the result is the large-batch gradient;
  // the final alpha gradient is then already reduced.
  auto g = unrolled_alpha_gradient(net_, valid, train, sgd_momentum_buffers(sgd, weights), uo, reduce_);
  if (penalty_) {  // identical on every rank (the alphas are): added after the reduction
    auto p = penalty_();
    if (p.defined()) {
      auto pg = grads_or_zero(p, net_->arch_parameters());
      for (size_t i = 0; i < pg.size(); ++i) g.alpha_grad[i] = g.alpha_grad[i] + pg[i];
    }
  }
  apply(std::move(g.alpha_grad), /*reduce=*/false);
  ArchStepResult r;
  r.loss = g.valid_loss;
  r.correct = g.correct;
  return r;
}

}  // namespace noisydarts
