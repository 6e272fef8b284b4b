#include "noisydarts/architect.h"

namespace noisydarts {

Architect::Architect(SearchNetwork net, ArchitectOptions opt) : net_(std::move(net)) {
  adam_ = std::make_unique<torch::optim::Adam>(
      net_->arch_parameters(), torch::optim::AdamOptions(opt.lr)
                                   .betas({opt.beta1, opt.beta2})
                                   .weight_decay(opt.weight_decay));
}

ArchStepResult Architect::step(const Batch& valid) {
  auto alphas = net_->arch_parameters();
  auto logits = net_->forward(valid.x);
  auto loss = torch::nn::functional::cross_entropy(logits, valid.y);
  // Only the alphas' gradient is needed: autograd::grad leaves the weights' .grad untouched.
  // allow_unused: with very few layers every cell may be a reduction cell, leaving
  // alphas_normal out of the graph; its gradient is then zero.
  auto grads = torch::autograd::grad({loss}, alphas, {}, c10::nullopt, false, /*allow_unused=*/true);
  for (size_t i = 0; i < grads.size(); ++i)
    if (!grads[i].defined()) grads[i] = torch::zeros_like(alphas[i]);
  if (reduce_) reduce_(grads);
  for (size_t i = 0; i < alphas.size(); ++i) alphas[i].mutable_grad() = grads[i];
  adam_->step();
  for (auto& a : alphas) a.mutable_grad() = torch::Tensor();
  ArchStepResult r;
  r.loss = loss.item<double>();
  r.correct = logits.argmax(1).eq(valid.y).sum().item<int64_t>();
  return r;
}

}  // namespace noisydarts
