// Benchmarks of the search hot path. Run: build/noisydarts_bench [--benchmark_filter=...]
// Threads: NOISYDARTS_BENCH_THREADS (default: all cores).
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdlib>
#include <string>
#include <thread>

#include "noisydarts/architect.h"
#include "noisydarts/ops.h"
#include "noisydarts/search.h"
#include "noisydarts/search_network.h"

using namespace noisydarts;

namespace {
void set_threads() {
  // NOISYDARTS_BENCH_MKLDNN=0 benchmarks ATen's native convolutions instead of oneDNN's.
  const char* m = std::getenv("NOISYDARTS_BENCH_MKLDNN");
  at::globalContext().setUserEnabledMkldnn(!(m && std::string(m) == "0"));
  const char* t = std::getenv("NOISYDARTS_BENCH_THREADS");
  at::set_num_threads(t ? std::atoi(t) : static_cast<int>(std::thread::hardware_concurrency()));
}

SearchNetwork make_net(int64_t c, int64_t layers, int64_t in_ch) {
  torch::manual_seed(0);
  SearchNetworkOptions o(c, 10, layers);
  o.in_channels(in_ch);
  NoiseOptions n;
  n.skip_drop_path = 0.3;
  o.noise(n);
  return make_search_network(o);
}

// One full first-order NoisyDARTS iteration (architecture step + weight step), args:
// batch, channels, layers, image side.
void BM_SearchIteration(benchmark::State& state) {
  set_threads();
  const int64_t B = state.range(0), C = state.range(1), L = state.range(2), S = state.range(3);
  const int64_t in_ch = S == 28 ? 1 : 3;
  auto net = make_net(C, L, in_ch);
  net->train();
  Architect arch(net, ArchitectOptions{});
  auto weights = net->weight_parameters();
  torch::optim::SGD sgd(weights, torch::optim::SGDOptions(0.05).momentum(0.9).weight_decay(3e-4));
  Batch b{torch::randn({B, in_ch, S, S}), torch::randint(0, 10, {B})};
  auto iteration = [&] {
    arch.step(b);
    search_weight_step(net, sgd, weights, b, 5.0);
  };
  iteration();  // warm-up: oneDNN creates and JIT-compiles its primitives on first use
  for (auto _ : state) iteration();
  state.SetItemsProcessed(state.iterations() * 2 * B);  // images through the network
}
BENCHMARK(BM_SearchIteration)->Args({64, 8, 5, 28})->Args({32, 16, 8, 32})->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_MixedOpForwardBackward(benchmark::State& state) {
  set_threads();
  auto noise = std::make_shared<NoiseState>();
  MixedOp m(16, 1, noisydarts_primitives(), noise);
  m->train();
  auto x = torch::randn({64, 16, 16, 16}, torch::requires_grad());
  auto w = torch::softmax(torch::randn({7}), 0).requires_grad_();
  for (auto _ : state) {
    auto y = m->forward(x, w);
    y.sum().backward();
  }
  state.SetItemsProcessed(state.iterations() * 64);
}
BENCHMARK(BM_MixedOpForwardBackward)->Unit(benchmark::kMillisecond)->UseRealTime();
}  // namespace

BENCHMARK_MAIN();
