#pragma once
/// SplitMix64 (Steele, Lea, Flood 2014): a bijective 64-bit mixer. Turns a seed and an index
/// into well-spread seeds or random words (data order and augmentation streams, the parallel
/// noise sampler's per-block generators).
#include <cstdint>

namespace noisydarts {

/// SplitMix64's increment: the generator's n-th output is splitmix64(seed + (n - 1) * gamma).
constexpr uint64_t kSplitMixGamma = 0x9e3779b97f4a7c15ULL;

inline uint64_t splitmix64(uint64_t x) {
  x += kSplitMixGamma;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace noisydarts
