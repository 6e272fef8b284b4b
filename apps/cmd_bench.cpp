// `noisydarts bench search-step|train-step`: seconds per iteration, images/s and peak memory of
// the search iteration and of the evaluation network's training step on synthetic data
// (docs/bench.md).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <ATen/record_function.h>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "commands.h"
#include "noisydarts/architect.h"
#include "noisydarts/error.h"
#include "noisydarts/eval_network.h"
#include "noisydarts/fused_ops.h"
#include "noisydarts/genotype.h"
#include "noisydarts/ops.h"
#include "noisydarts/optim.h"
#include "noisydarts/profile.h"
#include "noisydarts/runtime.h"
#include "noisydarts/method.h"
#include "noisydarts/search.h"
#include "noisydarts/search_network.h"
#include "config_flags.h"

namespace nd = noisydarts;

namespace noisydarts::cli {

namespace {

struct BenchOptions {
  int64_t in_channels = 3, image_size = 32, channels = 16, layers = 8, batch_size = 64, classes = 10;
  int iters = 5, warmup = 2, threads = 0;
  std::string order = "first";
  std::string preset = "noisydarts";
  std::string method;  // search-step: empty = the preset's
  std::string genotype = "NoisyDARTS_a";
  std::string device = "cpu";
  bool json = false;
  bool no_fused = false;
  bool no_blas = false;
  bool no_group = false;
  bool no_direct = false;
  bool no_sinks = false;
  bool no_fold = false;
  bool no_avx2 = false;
  std::string ab;  // a switch to alternate between timed iterations (--ab)
  bool count_ops = false;
  std::string precision = "fp32";  // eval-step only
};

double peak_rss_mb() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;  // Linux: kilobytes
}

void add_common(CLI::App* cmd, BenchOptions& o) {
  cmd->add_option("--in-channels", o.in_channels, "Image channels")->check(CLI::Range(1, 64))->capture_default_str();
  cmd->add_option("--image-size", o.image_size, "Image side in pixels")->check(CLI::Range(8, 1024))->capture_default_str();
  cmd->add_option("--channels", o.channels, "Initial channels C (even)")->check(CLI::Range(2, 1024))->capture_default_str();
  cmd->add_option("--layers", o.layers, "Number of cells L")->check(CLI::Range(1, 100))->capture_default_str();
  cmd->add_option("--batch-size", o.batch_size, "Images per batch")->check(CLI::Range(2, 100000))->capture_default_str();
  cmd->add_option("--classes", o.classes, "Classifier outputs")->check(CLI::Range(2, 100000))->capture_default_str();
  cmd->add_option("--iters", o.iters, "Timed iterations")->check(CLI::Range(1, 100000))->capture_default_str();
  cmd->add_option("--warmup", o.warmup, "Untimed iterations first (oneDNN builds its kernels on first use)")
      ->check(CLI::Range(0, 100000))->capture_default_str();
  cmd->add_option("--threads", o.threads, "Compute threads (0 = all cores)")->check(CLI::Range(0, 1024))->capture_default_str();
  cmd->add_option("--device", o.device, "cpu | cuda | cuda:N")->capture_default_str();
  cmd->add_flag("--no-fused", o.no_fused,
                "Run the search ops module by module as the reference does, instead of the fused nodes (docs/bench.md)");
  cmd->add_flag("--no-blas", o.no_blas,
                "On CPUs without AVX-512: the own portable kernel for the 1x1 convolutions' weight gradient instead of the BLAS "
                "sgemm (AVX-512 CPUs run their own AVX-512 kernel either way; docs/bench.md)");
  cmd->add_flag("--no-group", o.no_group,
                "train-step, eval-step: run the evaluation cells' 1x1 preprocessings that read the same tensor one by one "
                "instead of as one fused node (docs/bench.md)");
  cmd->add_flag("--no-direct", o.no_direct,
                "On AVX-512 CPUs: run the same-padded stride-1 depthwise planes through the padded phase copy instead of "
                "the direct masked-load form (docs/bench.md)");
  cmd->add_flag("--no-grad-sinks", o.no_sinks,
                "search-step: let autograd sum each cell state's input gradients out of place instead of the fused nodes "
                "adding them into one buffer (docs/bench.md)");
  cmd->add_flag("--no-weight-fold", o.no_fold,
                "search-step: let each edge's weighted sum multiply its separable and dilated convolutions' outputs by "
                "their weights instead of their last fused nodes (docs/bench.md)");
  cmd->add_option("--ab", o.ab,
                  "Alternate one switch between the timed iterations (odd: as set by the flags, even: flipped) and report "
                  "both medians and the per-pair ratios: on a machine whose speed drifts, the change's effect measured "
                  "in one process (docs/bench.md)")
      ->check(CLI::IsMember({"grad-sinks", "weight-fold", "direct", "group"}));
  cmd->add_flag("--count-ops", o.count_ops,
                "After the warm-up, count one more (untimed) iteration's ATen operator calls and autograd node runs: the "
                "per-op work on the calling thread between the parallel kernels (docs/bench.md)");
  cmd->add_flag("--no-avx2", o.no_avx2,
                "On CPUs with AVX2 but without AVX-512: the portable loops instead of the AVX2 forms of the kernels that have "
                "one (docs/bench.md)");
  cmd->add_flag("--json", o.json, "Print one JSON object: s_per_iter, img_per_s, peak_rss_mb and the settings");
}

/// Times `iteration` and prints the result; `images` = images through the network per iteration.
/// `gflop`: floating-point operations per iteration in GFLOP (0: not counted), reported with the
/// achieved GFLOP/s.
// The median of `s` (sorted in place).
double median(std::vector<double>& s) {
  std::sort(s.begin(), s.end());
  return s.size() % 2 ? s[s.size() / 2] : 0.5 * (s[s.size() / 2 - 1] + s[s.size() / 2]);
}

// --count-ops: the ATen operator calls ("aten::..." records) of one iteration, those made from
// outside any other operator (each a dispatch from our code or autograd's) and all of them,
// nested ones included; the autograd nodes the engine ran; and the most frequent outer calls
// and nodes by name. A RecordFunction observer, removed afterwards.
struct OpCounts {
  int64_t outer = 0, all = 0, nodes = 0;
  std::map<std::string, int64_t> by_name;
};

OpCounts count_ops(const std::function<void()>& iteration) {
  static std::mutex mu;  // kernels on OpenMP workers may call operators too
  static OpCounts* counts = nullptr;
  static const std::string node_prefix = "autograd::engine::evaluate_function: ";
  thread_local int depth = 0;  // operator records open on this thread
  OpCounts result;
  counts = &result;
  const auto handle = at::addGlobalCallback(
      at::RecordFunctionCallback(
          [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
            const std::string name = fn.name();
            std::lock_guard<std::mutex> lock(mu);
            if (name.compare(0, node_prefix.size(), node_prefix) == 0) {
              ++counts->nodes;
              ++counts->by_name[name.substr(node_prefix.size()) + " (node)"];
            } else if (name.compare(0, 6, "aten::") == 0) {
              ++counts->all;
              if (depth++ == 0) ++counts->outer, ++counts->by_name[name];
            }
            return nullptr;
          },
          [](const at::RecordFunction& fn, at::ObserverContext*) {
            if (std::strncmp(fn.name(), "aten::", 6) == 0) --depth;
          })
          .scopes({at::RecordScope::FUNCTION}));
  struct Remove {
    at::CallbackHandle h;
    ~Remove() { at::removeCallback(h); }
  } remove{handle};
  iteration();
  return result;
}

// The n most frequent names of `c`, most frequent first.
std::vector<std::pair<std::string, int64_t>> most_frequent(const OpCounts& c, size_t n) {
  std::vector<std::pair<std::string, int64_t>> v(c.by_name.begin(), c.by_name.end());
  std::stable_sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  if (v.size() > n) v.resize(n);
  return v;
}

// The --ab switch's setter and its state as the flags set it.
std::pair<std::function<void(bool)>, bool> ab_switch(const BenchOptions& o) {
  if (o.ab == "grad-sinks") return {nd::set_grad_sinks, !o.no_sinks};
  if (o.ab == "weight-fold") return {nd::set_mix_weight_fold, !o.no_fold};
  if (o.ab == "direct") return {nd::set_direct_depthwise, !o.no_direct};
  return {nd::set_grouped_1x1, !o.no_group};
}

int report(const BenchOptions& o, const std::string& what, int64_t images, const std::function<void()>& iteration,
           const std::function<void()>& sync, double gflop = 0) {
  const auto ab = o.ab.empty() ? std::pair<std::function<void(bool)>, bool>{} : ab_switch(o);
  for (int i = 0; i < o.warmup; ++i) {
    if (ab.first) ab.first(i % 2 ? !ab.second : ab.second);
    iteration();
  }
  if (ab.first) ab.first(ab.second);
  const OpCounts ops = o.count_ops ? count_ops(iteration) : OpCounts{};
  if (o.count_ops && !o.json) {
    std::fprintf(stderr, "  one iteration: %lld ATen operator calls from outside other operators (%lld with nested ones), "
                 "%lld autograd nodes run; most frequent:\n", static_cast<long long>(ops.outer),
                 static_cast<long long>(ops.all), static_cast<long long>(ops.nodes));
    for (const auto& [name, k] : most_frequent(ops, 12)) std::fprintf(stderr, "    %8lld  %s\n", static_cast<long long>(k), name.c_str());
  }
  std::vector<double> s, s_a, s_b;  // every iteration; with --ab, as set and flipped
  for (int i = 0; i < o.iters; ++i) {
    const bool flipped = ab.first && i % 2 == 1;
    if (ab.first) ab.first(flipped ? !ab.second : ab.second);
    sync();
    const auto t0 = std::chrono::steady_clock::now();
    iteration();
    sync();
    s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    (flipped ? s_b : s_a).push_back(s.back());
    if (!o.json)
      std::fprintf(stderr, "  iteration %d/%d: %.3f s%s\n", i + 1, o.iters, s.back(),
                   !ab.first ? "" : flipped ? " (--ab switch flipped)" : " (--ab switch as set)");
  }
  if (ab.first) ab.first(ab.second);
  std::vector<double> sorted = s;
  const double med = median(sorted);
  const double rss = peak_rss_mb();
  nlohmann::json abj;
  if (ab.first) {
    // Pairs (2k, 2k + 1): the flipped iteration's time over the one just before it.
    std::vector<double> ratios;
    for (size_t k = 0; k + 1 < s.size(); k += 2) ratios.push_back(s[k + 1] / s[k]);
    std::vector<double> a = s_a, b = s_b, r = ratios;
    abj = {{"switch", o.ab}, {"as_set", ab.second}, {"s_per_iter_as_set", median(a)},
           {"s_per_iter_flipped", b.empty() ? 0.0 : median(b)}, {"flipped_over_as_set", ratios},
           {"median_ratio", r.empty() ? 0.0 : median(r)}};
    if (!o.json)
      std::printf("--ab %s: median %.3f s as set (%s), %.3f s flipped; flipped / as set per pair: median %.3f over %zu pairs\n",
                  o.ab.c_str(), abj["s_per_iter_as_set"].get<double>(), ab.second ? "on" : "off",
                  abj["s_per_iter_flipped"].get<double>(), abj["median_ratio"].get<double>(), ratios.size());
  }
  if (o.json) {
    nlohmann::json j{{"s_per_iter", med},
                     {"s_min", sorted.front()},
                     {"s_max", sorted.back()},
                     {"img_per_s", images / med},
                     {"peak_rss_mb", rss},
                     {"bench", what},
                     {"threads", at::get_num_threads()},
                     {"iters", o.iters},
                     {"warmup", o.warmup},
                     {"batch_size", o.batch_size},
                     {"channels", o.channels},
                     {"layers", o.layers},
                     {"in_channels", o.in_channels},
                     {"image_size", o.image_size},
                     {"device", o.device},
                     {"fused", fused_ops_enabled() && o.precision == "fp32"},
                     {"precision", o.precision},
                     {"blas", blas_gemm_active()},
                     {"direct_depthwise", !o.no_direct && avx512_kernels_active()},
                     {"grad_sinks", !o.no_sinks && fused_ops_enabled()},
                     {"weight_fold", !o.no_fold && fused_ops_enabled()},
                     {"simd", avx512_kernels_active() ? "avx512" : avx2_kernels_active() ? "avx2" : "portable"}};
    if (gflop > 0) j["gflop_per_iter"] = gflop, j["gflop_per_s"] = gflop / med;
    if (ab.first) j["ab"] = abj;
    if (o.count_ops) {
      nlohmann::json top = nlohmann::json::array();
      for (const auto& [name, k] : most_frequent(ops, 20)) top.push_back({name, k});
      j["ops"] = {{"outer", ops.outer}, {"all", ops.all}, {"autograd_nodes", ops.nodes}, {"most_frequent", top},
                  {"by_name", ops.by_name}};
    }
    if (what == "train-step" || what == "eval-step")  // the evaluation network's grouped 1x1s
      j["grouped_1x1"] = !o.no_group && fused_ops_enabled() && o.precision == "fp32";
    if (what == "search-step") {
      j["order"] = o.order;
      j["method"] = o.method.empty() ? o.preset : o.method;
    }
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s: median %.3f s/iteration (min %.3f, max %.3f over %d), %.1f images/s, peak RSS %.0f MB, %d threads\n",
                what.c_str(), med, sorted.front(), sorted.back(), o.iters, images / med, rss, at::get_num_threads());
    if (gflop > 0) std::printf("  %.1f GFLOP per iteration, %.1f GFLOP/s\n", gflop, gflop / med);
  }
  return nd::kExitOk;
}

void setup(const BenchOptions& o) {
  at::set_num_threads(o.threads > 0 ? o.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  nd::keep_freed_memory();
  nd::set_fused_ops(!o.no_fused);
  nd::set_blas_gemm(!o.no_blas);
  nd::set_grouped_1x1(!o.no_group);
  nd::set_direct_depthwise(!o.no_direct);
  nd::set_grad_sinks(!o.no_sinks);
  nd::set_mix_weight_fold(!o.no_fold);
  nd::set_avx2_kernels(!o.no_avx2);
}

/// A subcommand timing the evaluation network (train-step, eval-step): the common options with
/// the paper's C 36, L 20, batch 96, and --genotype.
std::shared_ptr<BenchOptions> add_eval_network_options(CLI::App* cmd) {
  auto o = std::make_shared<BenchOptions>();
  o->channels = 36;
  o->layers = 20;
  o->batch_size = 96;
  add_common(cmd, *o);
  cmd->add_option("--genotype", o->genotype, "Built-in name, genotype.json or run directory")->capture_default_str();
  return o;
}

/// The genotype's evaluation network (auxiliary head) on `device`, seeded 0, and its conv +
/// linear multiply-adds per image (profile.h, auxiliary head excluded).
std::pair<nd::EvalNetwork, int64_t> bench_eval_network(const BenchOptions& o, torch::Device device, double drop_path) {
  torch::manual_seed(0);
  nd::EvalNetworkOptions eo(o.channels, o.classes, o.layers, nd::resolve_genotype(o.genotype));
  eo.in_channels(o.in_channels).auxiliary(true).drop_path_prob(drop_path);
  nd::EvalNetwork net(eo);
  net->to(device);
  const int64_t macs = nd::profile_network(net, o.in_channels, o.image_size, o.image_size).macs;
  return {net, macs};
}

std::function<void()> sync_for(torch::Device d) {
  if (d.is_cuda()) return [] { torch::cuda::synchronize(); };
  return [] {};
}

}  // namespace

void add_bench_command(CLI::App& app, Action& run) {
  auto* bench = app.add_subcommand("bench", "Measure the search iteration and the training step (docs/bench.md)");
  bench->require_subcommand(1);

  auto so = std::make_shared<BenchOptions>();
  auto* ss = bench->add_subcommand("search-step",
                                   "One search iteration (architecture step + weight step) on synthetic data");
  add_common(ss, *so);
  ss->add_option("--order", so->order, "first | second")->check(CLI::IsMember({"first", "second"}))->capture_default_str();
  ss->add_option("--preset", so->preset, "Ops and noise of: noisydarts (7 ops, noise) | darts (8 ops, no noise)")
      ->check(CLI::IsMember({"noisydarts", "darts"}))->capture_default_str();
  ss->add_option("--method", so->method, "Search method (docs/methods.md), with its recipe's ops and noise: " + nd::join_names(nd::method_names()))
      ->check(CLI::IsMember(nd::method_names()));
  ss->callback([so, &run] {
    run = [so] {
      const auto& o = *so;
      setup(o);
      const torch::Device device = nd::parse_device(o.device);
      // The method's network and step parts exactly as the search loop uses them (src/search.cpp).
      auto cfg = nd::SearchConfig::preset_defaults(o.method.empty() ? o.preset : o.method, "paper");
      cfg.method = cfg.preset;
      cfg.channels = o.channels;
      cfg.layers = o.layers;
      cfg.order = o.order;
      nd::check_method_config(cfg);
      torch::manual_seed(0);
      nd::SearchNetwork net = nd::build_search_network(cfg, nd::DataShape{o.in_channels, o.image_size, o.image_size, o.classes});
      net->to(device);
      net->train();
      nd::SearchMethod& method = *net->method();
      method.begin_epoch(*net, cfg.epochs / 2, cfg.epochs);  // mid-search schedule values
      nd::Architect arch(net, nd::ArchitectOptions{});
      arch.set_penalty([&] { return method.arch_penalty(net->op_alphas()); });
      auto weights = net->weight_parameters();
      torch::optim::SGD sgd(weights, torch::optim::SGDOptions(cfg.lr).momentum(cfg.momentum).weight_decay(cfg.weight_decay));
      auto opts = torch::TensorOptions().device(device);
      const nd::Batch valid{torch::randn({o.batch_size, o.in_channels, o.image_size, o.image_size}, opts),
                            torch::randint(0, o.classes, {o.batch_size}, opts.dtype(torch::kLong))};
      const nd::Batch train{torch::randn({o.batch_size, o.in_channels, o.image_size, o.image_size}, opts),
                            torch::randint(0, o.classes, {o.batch_size}, opts.dtype(torch::kLong))};
      const bool second = o.order == "second";
      if (!o.json)
        std::fprintf(stderr, "bench search-step: %s method, %s order, %lldx%lldx%lld input, C %lld, L %lld, batch %lld\n",
                     method.name().c_str(), o.order.c_str(), static_cast<long long>(o.in_channels),
                     static_cast<long long>(o.image_size), static_cast<long long>(o.image_size),
                     static_cast<long long>(o.channels), static_cast<long long>(o.layers),
                     static_cast<long long>(o.batch_size));
      return report(o, "search-step", 2 * o.batch_size, [&] {
        if (second) arch.step_unrolled(valid, train, sgd, cfg.lr);
        else arch.step(valid);
        method.before_weight_step(*net, train);
        nd::search_weight_step(net, sgd, weights, train, cfg.grad_clip);
        method.after_weight_step();
      }, sync_for(device));
    };
  });

  auto* ts = bench->add_subcommand("train-step", "One training step of the evaluation network on synthetic data");
  auto to = add_eval_network_options(ts);
  ts->callback([to, &run] {
    run = [to] {
      const auto& o = *to;
      setup(o);
      const torch::Device device = nd::parse_device(o.device);
      auto [net, macs] = bench_eval_network(o, device, 0.2);
      net->train();
      auto params = net->parameters();
      torch::optim::SGD sgd(params, torch::optim::SGDOptions(0.025).momentum(0.9).weight_decay(3e-4));
      auto opts = torch::TensorOptions().device(device);
      const auto x = torch::randn({o.batch_size, o.in_channels, o.image_size, o.image_size}, opts);
      const auto y = torch::randint(0, o.classes, {o.batch_size}, opts.dtype(torch::kLong));
      // FLOPs per step: 2 per multiply-add, 3 passes (forward, input and weight gradients).
      const double gflop = 6.0 * static_cast<double>(macs) * static_cast<double>(o.batch_size) / 1e9;
      if (!o.json)
        std::fprintf(stderr, "bench train-step: %s, C %lld, L %lld, batch %lld, auxiliary head, drop-path 0.2\n",
                     o.genotype.c_str(), static_cast<long long>(o.channels), static_cast<long long>(o.layers),
                     static_cast<long long>(o.batch_size));
      return report(o, "train-step", o.batch_size, [&] {
        for (auto& p : params) p.mutable_grad().reset();  // as the training loop does (src/train.cpp)
        auto out = net->forward(x);
        auto loss = torch::nn::functional::cross_entropy(out.logits, y);
        if (out.aux_logits.defined()) loss = loss + 0.4 * torch::nn::functional::cross_entropy(out.aux_logits, y);
        loss.backward();
        nd::clip_and_sgd_step(sgd, params, 5.0);
      }, sync_for(device), gflop);
    };
  });

  // Evaluation: the evaluation network's forward in inference mode, as eval/train's test pass run it.
  auto* es = bench->add_subcommand("eval-step", "The evaluation network's forward in inference mode on synthetic data");
  auto eo2 = add_eval_network_options(es);
  add_precision_option(es, eo2->precision);
  es->callback([eo2, &run] {
    run = [eo2] {
      const auto& o = *eo2;
      setup(o);
      const torch::Device device = nd::parse_device(o.device);
      auto [net, macs] = bench_eval_network(o, device, 0.0);
      // 2 FLOPs per multiply-add of one forward (the auxiliary head does not run in eval).
      const double gflop = 2.0 * static_cast<double>(macs) * static_cast<double>(o.batch_size) / 1e9;
      net->eval();
      const auto x = torch::randn({o.batch_size, o.in_channels, o.image_size, o.image_size}, torch::TensorOptions().device(device));
      if (!o.json)
        std::fprintf(stderr, "bench eval-step: %s, C %lld, L %lld, batch %lld, inference mode, %s\n", o.genotype.c_str(),
                     static_cast<long long>(o.channels), static_cast<long long>(o.layers),
                     static_cast<long long>(o.batch_size), o.precision.c_str());
      const nd::Precision precision = nd::parse_precision(o.precision);
      return report(o, "eval-step", o.batch_size, [&] {
        torch::InferenceMode im;
        nd::PrecisionScope scope(precision, device);
        net->forward(x);
      }, sync_for(device), gflop);
    };
  });

  // The machine's dense-convolution speed (oneDNN through ATen): the limit docs/bench.md measures
  // the training step against.
  auto co = std::make_shared<BenchOptions>();
  co->channels = 64;
  auto* cs = bench->add_subcommand("conv", "Dense k x k convolution forward + backward through ATen/oneDNN: this machine's GFLOP/s");
  add_common(cs, *co);
  auto kernel = std::make_shared<int64_t>(3);
  auto fwd_only = std::make_shared<bool>(false);
  cs->add_option("--kernel", *kernel, "Kernel size (same padding)")->check(CLI::Range(1, 11))->capture_default_str();
  cs->add_flag("--forward-only", *fwd_only, "Time the forward alone, in inference mode (the limit of eval-step)");
  cs->callback([co, kernel, fwd_only, &run] {
    run = [co, kernel, fwd_only] {
      const auto& o = *co;
      setup(o);
      const torch::Device device = nd::parse_device(o.device);
      torch::manual_seed(0);
      auto opts = torch::TensorOptions().device(device);
      const int64_t k = *kernel, c = o.channels, hw = o.image_size;
      auto x = torch::randn({o.batch_size, c, hw, hw}, opts).requires_grad_();
      auto w = torch::randn({c, c, k, k}, opts).requires_grad_();
      auto g = torch::randn({o.batch_size, c, hw, hw}, opts);
      const double gflop = (*fwd_only ? 2.0 : 6.0) * static_cast<double>(c * c * k * k * hw * hw * o.batch_size) / 1e9;
      if (!o.json)
        std::fprintf(stderr, "bench conv: %lldx%lld convolution, %lld -> %lld channels, %lldx%lld, batch %lld, %s\n",
                     static_cast<long long>(k), static_cast<long long>(k), static_cast<long long>(c),
                     static_cast<long long>(c), static_cast<long long>(hw), static_cast<long long>(hw),
                     static_cast<long long>(o.batch_size), *fwd_only ? "forward" : "forward + backward");
      return report(o, "conv", o.batch_size, [&] {
        if (*fwd_only) {
          torch::InferenceMode im;
          torch::conv2d(x, w, {}, 1, k / 2);
          return;
        }
        auto y = torch::conv2d(x, w, {}, 1, k / 2);
        torch::autograd::grad({y}, {x, w}, {g});
      }, sync_for(device), gflop);
    };
  });
}

}  // namespace noisydarts::cli
