#include "noisydarts/profile.h"

#include "noisydarts/error.h"
#include "noisydarts/ops.h"

namespace noisydarts {
namespace nn = torch::nn;

namespace {

// Output length of one convolution dimension (PyTorch's formula).
int64_t conv_out(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  return (in + 2 * p - d * (k - 1) - 1) / s + 1;
}

// Multiply-adds of `conv` on an h x w input; updates h, w to its output size.
int64_t conv_macs(const nn::Conv2dImpl& conv, int64_t& h, int64_t& w) {
  const auto& o = conv.options;
  const auto k = o.kernel_size();
  const auto s = o.stride();
  const auto d = o.dilation();
  int64_t ph = 0, pw = 0;
  if (const auto* pad = c10::get_if<torch::ExpandingArray<2>>(&o.padding())) {
    ph = (*pad)->at(0);
    pw = (*pad)->at(1);
  } else if (c10::get_if<torch::enumtype::kSame>(&o.padding())) {
    ph = (d->at(0) * (k->at(0) - 1)) / 2;  // 'same' keeps the size (stride 1 only)
    pw = (d->at(1) * (k->at(1) - 1)) / 2;
  }
  h = conv_out(h, k->at(0), s->at(0), ph, d->at(0));
  w = conv_out(w, k->at(1), s->at(1), pw, d->at(1));
  return o.out_channels() * h * w * (o.in_channels() / o.groups()) * k->at(0) * k->at(1);
}

}  // namespace

int64_t module_macs(const nn::Module& m, int64_t h, int64_t w) {
  if (const auto* fr = dynamic_cast<const FactorizedReduceImpl*>(&m)) {
    // Two parallel 1x1 stride-2 convolutions: on x and on x shifted by one pixel.
    int64_t h1 = h, w1 = w, h2 = h - 1, w2 = w - 1;
    return conv_macs(*fr->conv_1, h1, w1) + conv_macs(*fr->conv_2, h2, w2);
  }
  int64_t total = 0;
  // modules() is a pre-order walk: the registration order of a chain of layers.
  for (const auto& sub : m.modules(/*include_self=*/true)) {
    if (const auto* c = dynamic_cast<const nn::Conv2dImpl*>(sub.get())) {
      total += conv_macs(*c, h, w);
    } else if (const auto* l = dynamic_cast<const nn::LinearImpl*>(sub.get())) {
      total += l->options.in_features() * l->options.out_features();
    } else if (dynamic_cast<const FactorizedReduceImpl*>(sub.get())) {
      throw Error("module_macs: FactorizedReduce nested inside another module is not a chain");
    }
  }
  return total;
}

int64_t count_parameters(const nn::Module& m, const std::string& exclude_prefix) {
  int64_t n = 0;
  for (const auto& p : m.named_parameters(/*recurse=*/true)) {
    if (!exclude_prefix.empty() && p.key().rfind(exclude_prefix, 0) == 0) continue;
    n += p.value().numel();
  }
  return n;
}

ModelProfile profile_network(EvalNetwork& net, int64_t channels, int64_t h, int64_t w) {
  ModelProfile p;
  p.params = count_parameters(*net, "auxiliary_head.");
  const bool was_training = net->is_training();
  net->eval();
  {
    torch::NoGradGuard no_grad;
    const auto device = net->parameters().front().device();
    net->forward_counting(torch::zeros({1, channels, h, w}, torch::TensorOptions().device(device)), p.macs);
  }
  net->train(was_training);
  return p;
}

std::pair<int64_t, int64_t> default_eval_size(const Genotype& g, EvalStyle style) {
  if (g.space == "nb201") return {16, 5};
  if (g.space == "mbv2") return {0, 0};
  return style == EvalStyle::kImageNet ? std::pair<int64_t, int64_t>{48, 14} : std::pair<int64_t, int64_t>{36, 20};
}

std::string eval_size_text(const Genotype& g, std::pair<int64_t, int64_t> size) {
  if (g.space == "mbv2") return "fixed chain";
  return "C " + std::to_string(size.first) + (g.space == "nb201" ? ", N " : ", L ") + std::to_string(size.second);
}

ModelProfile profile_genotype(const Genotype& g, int64_t channels, int64_t layers,
                              const DataShape& shape, EvalStyle style) {
  EvalNetworkOptions o(channels, shape.classes, layers, g);
  o.in_channels(shape.channels).style(style).auxiliary(false);
  EvalNetwork net(o);
  return profile_network(net, shape.channels, shape.height, shape.width);
}

}  // namespace noisydarts
