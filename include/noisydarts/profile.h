#pragma once
/// Model profile (SPEC 3): parameters (auxiliary head excluded) and multiply-adds of the
/// convolutions and linear layers for one image. A convolution counts
/// out_channels * out_h * out_w * (in_channels / groups) * kh * kw (no bias term), a linear
/// layer in * out; BatchNorm, ReLU, pooling and additions count nothing (the convention of the
/// paper's tables; the reference README's "534 M" also counts 2 per BatchNorm input element).
/// docs/profile.md.
#include <torch/torch.h>
#include <cstdint>
#include <string>

#include "noisydarts/data.h"
#include "noisydarts/eval_network.h"
#include "noisydarts/genotype.h"

namespace noisydarts {

struct ModelProfile {
  int64_t params = 0;  ///< trainable parameters, auxiliary head excluded
  int64_t macs = 0;    ///< conv + linear multiply-adds for one image
};

/// Multiply-adds per image of `m` applied to an input of spatial size h x w. The module's
/// convolutions are taken as a chain in registration order (true for ReLUConvBN, SepConv,
/// DilConv, conv_7x1_1x7 and the stems); FactorizedReduce's two parallel convolutions are
/// counted on x and on x shifted by one pixel. Linear layers count in * out.
int64_t module_macs(const torch::nn::Module& m, int64_t h, int64_t w);

/// Parameters of `m` whose name does not start with `exclude_prefix` (empty: all).
int64_t count_parameters(const torch::nn::Module& m, const std::string& exclude_prefix = "");

/// Profile of a built network for one image of `channels` x h x w (one eval-mode forward with
/// zeros under NoGradGuard; the network's training flag is restored).
ModelProfile profile_network(EvalNetwork& net, int64_t channels, int64_t h, int64_t w);

/// The recipe size (channels, layers) of a genotype's evaluation network: DARTS cells C 36, L 20
/// (ImageNet style: C 48, L 14); nb201 C 16, N 5 (the benchmark's); mbv2 (0, 0): fixed layout.
std::pair<int64_t, int64_t> default_eval_size(const Genotype& g, EvalStyle style);
/// "C 36, L 20" / "C 16, N 5" / "fixed chain" for messages.
std::string eval_size_text(const Genotype& g, std::pair<int64_t, int64_t> size);
/// Profile of the evaluation network of `g` with C = `channels`, L = `layers` for input `shape`
/// (channels, height, width, classes). Needs no data files.
ModelProfile profile_genotype(const Genotype& g, int64_t channels, int64_t layers,
                              const DataShape& shape, EvalStyle style = EvalStyle::kCifar);

}  // namespace noisydarts
