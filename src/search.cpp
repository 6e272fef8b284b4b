#include "noisydarts/search.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "noisydarts/architect.h"
#include "noisydarts/hessian.h"
#include "noisydarts/checkpoint.h"
#include "noisydarts/data.h"
#include "noisydarts/distributed.h"
#include "noisydarts/error.h"
#include "noisydarts/runtime.h"
#include "noisydarts/profile.h"
#include "noisydarts/report.h"
#include "noisydarts/search_network.h"
#include "noisydarts/space_networks.h"
#include "noisydarts/spaces.h"

namespace noisydarts {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {



json weight_table(const torch::Tensor& weights) {
  auto w = weights.detach().to(torch::kCPU, torch::kDouble).contiguous();
  json rows = json::array();
  for (int64_t i = 0; i < w.size(0); ++i) {
    json row = json::array();
    for (int64_t k = 0; k < w.size(1); ++k) row.push_back(w[i][k].item<double>());
    rows.push_back(row);
  }
  return rows;
}

/// Live progress on stderr: rewritten in place on a terminal, one line every few seconds
/// otherwise (logs, CI).
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled), tty_(::isatty(2) != 0) {}
  void update(const std::string& line, bool force = false) {
    if (!enabled_) return;
    const double interval = tty_ ? 0.5 : 15.0;
    if (!force && seconds_since(last_) < interval) return;
    last_ = Clock::now();
    if (tty_) std::fprintf(stderr, "\r\033[K%s", line.c_str());
    else std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
    shown_ = true;
  }
  void finish() {
    if (enabled_ && tty_ && shown_) std::fprintf(stderr, "\n");
    shown_ = false;
  }

 private:
  bool enabled_, tty_;
  bool shown_ = false;
  Clock::time_point last_ = Clock::now() - std::chrono::hours(1);
};

/// Running sums of one epoch; part of the checkpoint so a mid-epoch resume reports the same.
struct EpochAccum {
  double train_loss = 0, arch_loss = 0;
  int64_t train_correct = 0, arch_correct = 0, train_seen = 0, arch_seen = 0;
  double seconds = 0;  // compute time spent in this epoch before the last checkpoint
  json to_json() const {
    return {{"train_loss", train_loss}, {"arch_loss", arch_loss}, {"train_correct", train_correct},
            {"arch_correct", arch_correct}, {"train_seen", train_seen}, {"arch_seen", arch_seen},
            {"seconds", seconds}};
  }
  static EpochAccum from_json(const json& j) {
    EpochAccum a;
    a.train_loss = j.at("train_loss");
    a.arch_loss = j.at("arch_loss");
    a.train_correct = j.at("train_correct");
    a.arch_correct = j.at("arch_correct");
    a.train_seen = j.at("train_seen");
    a.arch_seen = j.at("arch_seen");
    a.seconds = j.at("seconds");
    return a;
  }
};

std::string checkpoint_dir(const std::string& run) { return (fs::path(run) / "checkpoints").string(); }

/// The training images of a search and their two halves (a pure function of the config).
struct SearchData {
  Dataset train;
  std::vector<int64_t> w_idx, a_idx;
};

SearchData load_search_data(const SearchConfig& cfg,
                            const std::function<void(const std::string&)>& progress = {}) {
  LoadOptions lo;
  lo.seed = cfg.seed;
  lo.image_size = cfg.image_size;
  lo.threads = at::get_num_threads();  // set from --threads before the data is loaded
  lo.progress = progress;
  DatasetPair data = load_dataset(cfg.dataset, cfg.data_dir, lo);
  SearchData d;
  d.train = subset(data.train, cfg.subset, cfg.seed);
  std::tie(d.w_idx, d.a_idx) = split_indices(d.train.size(), cfg.train_portion, cfg.seed);
  if (static_cast<int64_t>(d.w_idx.size()) < 2 || static_cast<int64_t>(d.a_idx.size()) < 2)
    throw UsageError("--subset/--train-portion leave fewer than 2 images in a half");
  return d;
}

/// The input geometry of the loaded images (whatever the dataset's nominal shape).
DataShape shape_of(const Dataset& d) {
  return {d.images.size(1), d.images.size(2), d.images.size(3), d.num_classes};
}

SearchNetwork build_search_network(const SearchConfig& cfg, const SearchData& d) {
  return noisydarts::build_search_network(cfg, shape_of(d.train));
}

/// The architecture half in fixed order without augmentation (eval-mode accuracy, curvature).
BatchStream::Options eval_stream_options(const SearchConfig& cfg) {
  BatchStream::Options eo;
  eo.batch_size = cfg.batch_size;
  eo.shuffle = false;
  eo.augment = AugmentOptions{};
  eo.augment.normalize = cfg.augment.normalize;
  eo.workers = cfg.workers;
  eo.prefetch = 2;
  eo.seed = cfg.seed * 2 + 2;
  return eo;
}

/// The batch the Hessian analysis uses: always the first batch of the architecture half in fixed
/// order, so that eigenvalues of different epochs (and `noisydarts analyze`) are comparable.
Batch curvature_batch(BatchStream& eval_stream, torch::Device device) {
  eval_stream.seek({0, 0});
  Batch b = eval_stream.next();
  b.x = b.x.to(device);
  b.y = b.y.to(device);
  return b;
}

void write_text(const std::string& path, const std::string& s) { write_file_atomic(path, s); }

}  // namespace

SearchNetwork build_search_network(const SearchConfig& cfg, const DataShape& shape) {
  SearchNetworkOptions nopt(cfg.channels, shape.classes, cfg.layers);
  nopt.in_channels(shape.channels).steps(cfg.steps).multiplier(cfg.multiplier)
      .primitives(cfg.primitives).noise(cfg.noise).alpha_init_std(cfg.alpha_init_std)
      .space(genotype_space(cfg.space)).se_ratio(cfg.se_ratio).swish(cfg.swish).image_size(shape.height);
  return make_search_network(nopt);
}

WeightStepResult search_weight_step(SearchNetwork& net, torch::optim::SGD& sgd,
                                    const std::vector<torch::Tensor>& weights, const Batch& batch,
                                    double grad_clip, const GradReducer& reduce) {
  sgd.zero_grad();
  auto logits = net->forward(batch.x);
  auto loss = torch::nn::functional::cross_entropy(logits, batch.y);
  WeightStepResult r;
  r.loss = loss.item<double>();
  r.correct = logits.argmax(1).eq(batch.y).sum().item<int64_t>();
  // Alone, a non-finite loss updates nothing; in a data-parallel run every rank still joins the
  // gradient all-reduce (so none waits forever) and the caller stops all of them together.
  if (!std::isfinite(r.loss) && !reduce) return r;
  torch::autograd::backward({loss}, {}, c10::nullopt, false, weights);
  if (reduce) reduce_param_grads(weights, reduce);
  torch::nn::utils::clip_grad_norm_(weights, grad_clip);
  sgd.step();
  return r;
}

std::string latest_checkpoint(const std::string& run_dir) {
  const fs::path latest = fs::path(checkpoint_dir(run_dir)) / "latest";
  std::ifstream f(latest);
  std::string name;
  if (f && std::getline(f, name) && !name.empty()) {
    const auto p = fs::path(checkpoint_dir(run_dir)) / name;
    if (fs::exists(p)) return p.string();
  }
  return "";
}

SearchResult run_search(SearchConfig cfg, bool resume, const SearchCallbacks& cb) {
  bool writer = true;  // only rank 0 of a data-parallel run prints and writes
  auto info = [&](const std::string& s) {
    if (cb.info && writer) cb.info(s);
  };
  const auto t_start = Clock::now();
  if (cfg.out.empty()) throw UsageError("--out is required: the run directory to write");

  // ---- Resume: the stored configuration wins (it defines the network being resumed).
  std::string resume_from;
  if (resume) {
    resume_from = latest_checkpoint(cfg.out);
    if (resume_from.empty())
      throw CheckpointError("no checkpoint to resume in " + cfg.out + "/checkpoints (start a new search without --resume)");
    const std::string out = cfg.out;
    const int threads = cfg.threads;
    cfg = SearchConfig::preset_defaults("noisydarts", "paper");
    {
      const auto stored = read_checkpoint_config(resume_from, "search");
      try {
        cfg.merge_json(stored, resume_from);
      } catch (const ConfigError& e) {  // a config this build cannot read: an incompatible checkpoint
        throw CheckpointError(std::string(e.what()) + " (checkpoint of another noisydarts version?)");
      }
    }
    cfg.out = out;
    // The stored thread count is kept unless the caller overrides it: results are bitwise
    // reproducible only with the same number of threads (docs/reproducibility.md).
    if (threads >= 0) cfg.threads = threads;
  }
  cfg.validate();
  if (cfg.data_dir.empty()) cfg.data_dir = default_data_dir(cfg.dataset);
  // ---- Data parallelism (docs/distributed.md): rendezvous first, so that a rank failing later
  //      makes the others stop at their next collective instead of waiting forever.
  const auto dist = init_distributed_from_environment(cfg.dist_timeout_s);
  writer = !dist || dist->rank() == 0;
  torch::Device device = parse_device(cfg.device);
  if (dist && device.is_cuda() && !device.has_index()) device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(dist->local_rank()));

  const int threads = cfg.threads > 0 ? cfg.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
  keep_freed_memory();

  // ---- Data: everything is validated before the run directory is touched.
  SearchData sd = load_search_data(cfg, cb.progress ? std::function<void(const std::string&)>(info) : nullptr);
  const Dataset& train = sd.train;
  const auto& w_idx = sd.w_idx;
  const auto& a_idx = sd.a_idx;

  // ---- Run directory.
  std::error_code ec;
  if (!resume && !latest_checkpoint(cfg.out).empty())
    throw UsageError("run directory " + cfg.out + " already holds a search: pass --resume to continue it or choose another --out");
  if (writer) {
    fs::create_directories(checkpoint_dir(cfg.out), ec);
    if (ec) throw IoError("cannot create run directory " + cfg.out + ": " + ec.message());
    // A resumed run's config.json is rewritten only once its checkpoint has loaded, so a refused
    // checkpoint leaves the run directory untouched.
    if (!resume) write_text((fs::path(cfg.out) / "config.json").string(), cfg.to_json().dump(2) + "\n");
  }

  // ---- Network and optimisers.
  torch::manual_seed(cfg.seed);
  SearchNetwork net = build_search_network(cfg, sd);
  net->to(device);
  auto weights = net->weight_parameters();
  torch::optim::SGD sgd(weights, torch::optim::SGDOptions(cfg.lr).momentum(cfg.momentum).weight_decay(cfg.weight_decay));
  Architect architect(net, ArchitectOptions{cfg.arch_lr, cfg.arch_beta1, cfg.arch_beta2, cfg.arch_weight_decay});

  BatchStream::Options so;
  so.batch_size = cfg.batch_size;
  so.shuffle = true;
  so.augment = cfg.augment;
  so.workers = cfg.workers;
  so.prefetch = 2;
  so.seed = cfg.seed * 2 + 1;
  // Each rank reads its slice of every global batch of batch_size * world images.
  so.rank = dist ? dist->rank() : 0;
  so.world = dist ? dist->world() : 1;
  BatchStream train_stream(train, w_idx, so);
  so.seed = cfg.seed * 2 + 2;
  BatchStream valid_stream(train, a_idx, so);  // persistent: never reset between epochs
  BatchStream::Options eo = eval_stream_options(cfg);
  eo.rank = so.rank;
  eo.world = so.world;
  BatchStream eval_stream(train, a_idx, eo);

  int64_t start_epoch = 0, start_step = 0;
  EpochAccum acc;
  std::vector<json> history;
  const int64_t steps_per_epoch = cfg.max_steps > 0 ? std::min(cfg.max_steps, train_stream.batches_per_pass())
                                                    : train_stream.batches_per_pass();

  if (resume) {
    torch::serialize::InputArchive a;
    open_checkpoint(resume_from, "search", a);
    try {
      torch::serialize::InputArchive m, ws, as;
      a.read("model", m);
      net->load(m);
      a.read("weight_optimizer", ws);
      load_optimizer_state(ws, sgd, weights);
      a.read("arch_optimizer", as);
      load_optimizer_state(as, architect.optimizer(), net->arch_parameters());
      start_epoch = read_int(a, "epoch");
      start_step = read_int(a, "step");
      // A checkpoint of another world size: the same number of images consumed in the pass.
      c10::IValue wv;
      const int64_t stored_world = a.try_read("world_size", wv) && wv.isInt() ? wv.toInt() : 1;
      const int64_t world = so.world;
      auto rescale = [&](int64_t batch, const BatchStream& st) {
        return std::min(batch * stored_world / world, std::max<int64_t>(0, st.batches_per_pass() - 1));
      };
      train_stream.seek({read_int(a, "train_pass"), rescale(read_int(a, "train_batch"), train_stream)});
      valid_stream.seek({read_int(a, "valid_pass"), rescale(read_int(a, "valid_batch"), valid_stream)});
      start_step = std::min(start_step * stored_world / world, steps_per_epoch);
      torch::Tensor rng;
      a.read("rng_cpu", rng);
      set_cpu_rng_state(rng);
      acc = EpochAccum::from_json(json::parse(read_string(a, "epoch_accum")));
      for (auto& j : json::parse(read_string(a, "metrics"))) history.push_back(j);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw CheckpointError("checkpoint " + resume_from + " does not match this search network: " + std::string(e.what()).substr(0, 200));
    }
    if (writer) write_text((fs::path(cfg.out) / "config.json").string(), cfg.to_json().dump(2) + "\n");
    info("resuming " + cfg.out + " from " + fs::path(resume_from).filename().string() + " (epoch " +
         std::to_string(start_epoch + 1) + ", step " + std::to_string(start_step) + ")");
  }

  GradReducer reduce;
  if (dist) {
    // Identical start on every rank (weights, alphas, BN statistics); gradients of the weights
    // and of the alphas are averaged every step, so the ranks stay identical.
    dist->broadcast_module(*net);
    reduce = dist->mean_reducer();
    architect.set_grad_reducer(reduce);
  }

  int64_t n_params = 0;
  for (auto& p : weights) n_params += p.numel();
  {
    std::ostringstream o;
    o << "search: " << cfg.preset << " preset, " << cfg.dataset << " (" << w_idx.size() << " weight / "
      << a_idx.size() << " architecture images), " << cfg.layers << " cells x " << cfg.channels
      << " channels, " << cfg.primitives.size() << " ops, " << n_params << " weights, noise "
      << to_string(cfg.noise.type);
    if (cfg.noise.enabled())
      o << " " << to_string(cfg.noise.mixture) << " lambda " << cfg.noise.lambda << " mu " << cfg.noise.mean;
    o << ", " << cfg.epochs << " epochs x " << steps_per_epoch << " steps, " << threads << " threads, " << device.str();
    if (dist) o << ", " << dist->world() << " ranks (global batch " << cfg.batch_size * dist->world() << ")";
    info(o.str());
  }

  // ---- Checkpointing.
  auto save_checkpoint = [&](int64_t epoch, int64_t step) {
    if (!writer) return;
    torch::serialize::OutputArchive a;
    write_int(a, "format_version", kCheckpointFormatVersion);
    write_string(a, "kind", "search");
    write_string(a, "config", cfg.to_json().dump());
    torch::serialize::OutputArchive m, ws, as;
    net->save(m);
    a.write("model", m);
    save_optimizer_state(ws, sgd, weights);
    a.write("weight_optimizer", ws);
    save_optimizer_state(as, architect.optimizer(), net->arch_parameters());
    a.write("arch_optimizer", as);
    write_int(a, "epoch", epoch);
    write_int(a, "step", step);
    write_int(a, "world_size", so.world);
    write_int(a, "train_pass", train_stream.position().pass);
    write_int(a, "train_batch", train_stream.position().batch);
    write_int(a, "valid_pass", valid_stream.position().pass);
    write_int(a, "valid_batch", valid_stream.position().batch);
    a.write("rng_cpu", get_cpu_rng_state());
    write_string(a, "epoch_accum", acc.to_json().dump());
    write_string(a, "metrics", json(history).dump());
    char name[64];
    std::snprintf(name, sizeof name, "search-e%04lld-s%06lld.pt", static_cast<long long>(epoch),
                  static_cast<long long>(step));
    const auto dir = fs::path(checkpoint_dir(cfg.out));
    save_archive_atomic(a, (dir / name).string());
    write_text((dir / "latest").string(), std::string(name) + "\n");
    // Keep the newest `keep_checkpoints` (names sort chronologically).
    std::vector<std::string> all;
    for (auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".pt" && e.path().filename().string().rfind("search-", 0) == 0)
        all.push_back(e.path().string());
    std::sort(all.begin(), all.end());
    for (size_t i = 0; i + cfg.keep_checkpoints < all.size(); ++i) fs::remove(all[i], ec);
  };

  const bool second_order = cfg.order == "second";
  // A run that stopped early (DARTS-ES) is finished: a resume only rewrites its results.
  int64_t stopped_at = -1;
  Genotype early_genotype;
  if (!history.empty() && history.back().contains("early_stop")) {
    stopped_at = history.back()["epoch"].get<int64_t>();
    early_genotype = genotype_from_text(history.back()["early_stop"]["genotype"].get<std::string>());
    start_epoch = cfg.epochs;
  }

  Progress progress(cb.progress && writer);
  auto last_ckpt = Clock::now();
  SearchResult result;
  const double total_steps = static_cast<double>(cfg.epochs * steps_per_epoch);
  double run_compute_seconds = 0;
  for (const auto& h : history) run_compute_seconds += h.value("seconds", 0.0);

  for (int64_t epoch = start_epoch; epoch < cfg.epochs; ++epoch) {
    const double lr = cosine_lr(cfg.lr, cfg.lr_min, epoch, cfg.epochs);
    for (auto& g : sgd.param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
    const double decay = noise_decay_factor(cfg.noise, static_cast<double>(epoch), static_cast<double>(cfg.epochs));
    net->set_noise_decay(decay);
    net->train();
    const int64_t first_step = (epoch == start_epoch) ? start_step : 0;
    if (first_step == 0) acc = EpochAccum{};
    auto t_epoch = Clock::now();
    const double seconds_before = acc.seconds;

    for (int64_t step = first_step; step < steps_per_epoch; ++step) {
      Batch vb = valid_stream.next();
      vb.x = vb.x.to(device);
      vb.y = vb.y.to(device);
      Batch tb = train_stream.next();
      tb.x = tb.x.to(device);
      tb.y = tb.y.to(device);
      // 1. Architecture step on the architecture half (noise on, training mode). Second order
      //    unrolls the coming weight step on the same training batch.
      const auto ar = second_order ? architect.step_unrolled(vb, tb, sgd, cfg.unrolled_xi < 0 ? lr : cfg.unrolled_xi)
                                   : architect.step(vb);
      // 2. Weight step on the weight half.
      const auto wr = search_weight_step(net, sgd, weights, tb, cfg.grad_clip, reduce);
      // Losses and counts of this step over all ranks (identical on every rank, so the epoch
      // sums in the checkpoint and the divergence decision agree everywhere).
      std::vector<torch::Tensor> st{torch::tensor({ar.loss * vb.y.size(0), static_cast<double>(ar.correct),
                                                   static_cast<double>(vb.y.size(0)), wr.loss * tb.y.size(0),
                                                   static_cast<double>(wr.correct), static_cast<double>(tb.y.size(0))},
                                                  torch::kDouble)};
      if (dist) dist->allreduce_sum(st);
      const auto stv = st[0];
      const double arch_loss_sum = stv[0].item<double>(), train_loss_sum = stv[3].item<double>();
      const int64_t arch_correct = static_cast<int64_t>(stv[1].item<double>()), arch_b = static_cast<int64_t>(stv[2].item<double>());
      const int64_t train_correct = static_cast<int64_t>(stv[4].item<double>()), b = static_cast<int64_t>(stv[5].item<double>());
      const double loss_v = train_loss_sum / b, arch_loss_v = arch_loss_sum / arch_b;
      if (!std::isfinite(loss_v) || !std::isfinite(arch_loss_v)) {
        progress.finish();
        const auto last = latest_checkpoint(cfg.out);
        throw DivergedError("loss became " + std::string(std::isnan(loss_v) || std::isnan(arch_loss_v) ? "NaN" : "Inf") +
                            " at epoch " + std::to_string(epoch + 1) + " step " + std::to_string(step + 1) +
                            "; last good checkpoint: " + (last.empty() ? "none" : last) +
                            " (lower --lr or --arch-lr)");
      }

      acc.train_loss += train_loss_sum;
      acc.train_correct += train_correct;
      acc.train_seen += b;
      acc.arch_loss += arch_loss_sum;
      acc.arch_correct += arch_correct;
      acc.arch_seen += arch_b;

      const double ep_sec = seconds_before + seconds_since(t_epoch);
      const double done = static_cast<double>(epoch * steps_per_epoch + step + 1);
      const double steps_this_process = static_cast<double>(step + 1 - first_step);
      const double sec_per_step = (ep_sec - seconds_before) / std::max(1.0, steps_this_process);
      char line[256];
      std::snprintf(line, sizeof line,
                    "epoch %lld/%lld step %lld/%lld  loss %.4f  acc %.1f%%  arch loss %.4f  %.0f img/s  ETA %s",
                    static_cast<long long>(epoch + 1), static_cast<long long>(cfg.epochs),
                    static_cast<long long>(step + 1), static_cast<long long>(steps_per_epoch),
                    acc.train_loss / acc.train_seen, 100.0 * acc.train_correct / acc.train_seen,
                    acc.arch_loss / acc.arch_seen,
                    2.0 * b / std::max(1e-9, sec_per_step),
                    format_duration(sec_per_step * (total_steps - done)).c_str());
      progress.update(line);

      if (cfg.checkpoint_every_min > 0 && step + 1 < steps_per_epoch &&
          seconds_since(last_ckpt) >= cfg.checkpoint_every_min * 60.0) {
        acc.seconds = seconds_before + seconds_since(t_epoch);
        save_checkpoint(epoch, step + 1);
        last_ckpt = Clock::now();
      }
    }
    progress.finish();

    // ---- Epoch end: eval-mode accuracy on the architecture half, metrics, checkpoint.
    double valid_loss = -1, valid_acc = -1;
    if (cfg.eval_valid) {
      torch::NoGradGuard ng;
      net->eval();
      eval_stream.seek({0, 0});
      double l = 0;
      int64_t c = 0, n = 0;
      for (int64_t i = 0; i < eval_stream.batches_per_pass(); ++i) {
        Batch eb = eval_stream.next();
        auto lg = net->forward(eb.x.to(device));
        auto y = eb.y.to(device);
        l += torch::nn::functional::cross_entropy(lg, y).item<double>() * y.size(0);
        c += lg.argmax(1).eq(y).sum().item<int64_t>();
        n += y.size(0);
      }
      net->train();
      if (dist) {  // each rank evaluated its slice of the architecture half
        std::vector<torch::Tensor> t{torch::tensor({l, static_cast<double>(c), static_cast<double>(n)}, torch::kDouble)};
        dist->allreduce_sum(t);
        l = t[0][0].item<double>();
        c = static_cast<int64_t>(t[0][1].item<double>());
        n = static_cast<int64_t>(t[0][2].item<double>());
      }
      valid_loss = l / n;
      valid_acc = 100.0 * c / n;
    }
    const double epoch_seconds = seconds_before + seconds_since(t_epoch);
    run_compute_seconds += epoch_seconds;
    const Genotype g = net->genotype();
    json m{{"epoch", epoch + 1},
           {"lr", lr},
           {"noise_decay", decay},
           {"noise_scale", cfg.noise.enabled() ? cfg.noise.lambda * decay : 0.0},
           {"train_loss", acc.train_loss / acc.train_seen},
           {"train_acc", 100.0 * acc.train_correct / acc.train_seen},
           {"arch_loss", acc.arch_loss / acc.arch_seen},
           {"arch_acc", 100.0 * acc.arch_correct / acc.arch_seen},
           {"valid_loss", valid_loss},
           {"valid_acc", valid_acc},
           {"seconds", epoch_seconds},
           {"images_per_sec", (acc.train_seen + acc.arch_seen) / std::max(1e-9, epoch_seconds)},
           {"genotype", genotype_to_text(g)},
           {"primitives", cfg.primitives}};
    if (g.space == "darts") {
      m["skip_normal"] = count_op(g.normal, "skip_connect");
      m["skip_reduce"] = count_op(g.reduce, "skip_connect");
    } else {
      m["skips"] = count_skips(g);
    }
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < net->arch_names().size(); ++i) m[net->arch_names()[i]] = weight_table(net->arch_weights(i, /*as_double=*/true));
    }
    if (cfg.hessian_every > 0 && (epoch + 1) % cfg.hessian_every == 0) {
      const auto t_h = Clock::now();
      // Every rank computes it on the same (unsharded) batch and weights: the same number. A
      // single process's eval stream is that unsharded stream already.
      std::unique_ptr<BatchStream> unsharded;
      if (dist) unsharded = std::make_unique<BatchStream>(train, a_idx, eval_stream_options(cfg));
      const auto eig = hessian_dominant_eigenvalue(net, curvature_batch(dist ? *unsharded : eval_stream, device),
                                                   EigenOptions{static_cast<int>(cfg.hessian_iters), 1e-3, cfg.seed});
      m["hessian_eigenvalue"] = eig.eigenvalue;
      m["hessian_iterations"] = eig.iterations;
      m["hessian_seconds"] = seconds_since(t_h);
      if (cfg.early_stop_ratio > 0) {
        // DARTS-ES (RobustDARTS): stop when lambda(e - window) / lambda(e) < ratio and keep the
        // architecture of epoch e - window.
        for (const auto& h : history) {
          if (h["epoch"].get<int64_t>() != epoch + 1 - cfg.early_stop_window || !h.contains("hessian_eigenvalue")) continue;
          const double then = h["hessian_eigenvalue"].get<double>(), now = eig.eigenvalue;
          if (now > 0 && then / now < cfg.early_stop_ratio) {
            stopped_at = epoch + 1;
            early_genotype = genotype_from_text(h["genotype"].get<std::string>());
            m["early_stop"] = {{"ratio", then / now},
                               {"genotype_epoch", h["epoch"]},
                               {"genotype", h["genotype"]}};
          }
        }
      }
    }
    history.push_back(m);
    std::string lines;
    for (const auto& h : history) lines += h.dump() + "\n";
    if (writer) write_text((fs::path(cfg.out) / "metrics.jsonl").string(), lines);
    {
      std::ostringstream o;
      o.setf(std::ios::fixed);
      o.precision(2);
      o << "epoch " << epoch + 1 << "/" << cfg.epochs << "  train loss " << m["train_loss"].get<double>()
        << " acc " << m["train_acc"].get<double>() << "%  arch loss " << m["arch_loss"].get<double>();
      if (cfg.eval_valid) o << "  valid acc " << valid_acc << "%";
      if (m.contains("hessian_eigenvalue")) o << "  hessian eig " << m["hessian_eigenvalue"].get<double>();
      if (g.space == "darts") o << "  skips normal/reduce " << m["skip_normal"] << "/" << m["skip_reduce"];
      else o << "  skips " << m["skips"];
      o << "  "
        << format_duration(epoch_seconds);
      info(o.str());
    }
    acc = EpochAccum{};
    save_checkpoint(epoch + 1, 0);
    last_ckpt = Clock::now();
    result.valid_acc = valid_acc;
    result.epochs_done = epoch + 1;
    if (stopped_at > 0) {
      info("early stop (DARTS-ES): eigenvalue ratio " + std::to_string(m["early_stop"]["ratio"].get<double>()) +
           " < " + std::to_string(cfg.early_stop_ratio) + "; keeping the genotype of epoch " +
           std::to_string(m["early_stop"]["genotype_epoch"].get<int64_t>()));
      break;
    }
  }

  // ---- Results.
  const Genotype g = stopped_at > 0 ? early_genotype : net->genotype();
  result.genotype = g;
  result.stopped_early_at = stopped_at;
  result.seconds = seconds_since(t_start);
  if (!writer) return result;  // rank 0 writes the results
  const fs::path out(cfg.out);
  write_text((out / "genotype.json").string(), genotype_to_json(g).dump(2) + "\n");
  write_text((out / "genotype.txt").string(), genotype_to_text(g) + "\n");
  const std::vector<std::string> diagrams = write_genotype_diagrams(g, out.string());
  if (!history.empty() && result.valid_acc < 0) result.valid_acc = history.back().value("valid_acc", -1.0);
  std::ostringstream s;
  s << "NoisyDARTS search finished\n"
    << "  run directory     " << cfg.out << "\n"
    << "  preset            " << cfg.preset << " (scale " << cfg.scale << "), noise " << to_string(cfg.noise.type);
  if (cfg.noise.enabled())
    s << " " << to_string(cfg.noise.mixture) << " lambda " << cfg.noise.lambda << " mu " << cfg.noise.mean
      << " decay " << to_string(cfg.noise.decay);
  s << "\n  dataset           " << cfg.dataset << ", " << cfg.epochs << " epochs";
  if (stopped_at > 0) s << " (stopped early after epoch " << stopped_at << " by --early-stop)";
  s << ", " << cfg.order << "-order architecture step\n"
    << "  search space      " << cfg.space << "\n"
    << "  genotype          " << genotype_to_text(g) << "\n";
  if (g.space == "darts")
    s << "  skip connections  normal " << count_op(g.normal, "skip_connect") << "/" << g.normal.size()
      << ", reduce " << count_op(g.reduce, "skip_connect") << "/" << g.reduce.size() << "\n";
  else
    s << "  skip connections  " << count_skips(g) << "/" << (g.space == "nb201" ? g.normal.size() : g.layers.size()) << "\n";
  if (result.valid_acc >= 0) {
    char b[64];
    std::snprintf(b, sizeof b, "%.2f%%", result.valid_acc);
    s << "  supernet valid acc " << b << " (eval mode, architecture half)\n";
  }
  {
    // The derived architecture's evaluation network at its recipe size (DARTS: C 36, L 20;
    // nb201: C 16, N 5) on this dataset's input shape: what `noisydarts profile --genotype
    // DIR/genotype.json --dataset D` prints.
    const auto size = default_eval_size(g, EvalStyle::kCifar);
    const auto prof = profile_genotype(g, size.first, size.second, shape_of(train));
    char b[200];
    std::snprintf(b, sizeof b, "%.3f M params, %.1f M multiply-adds (%s, %s input)", prof.params / 1e6, prof.macs / 1e6,
                  eval_size_text(g, size).c_str(), cfg.dataset.c_str());
    s << "  profile           " << b << "\n";
  }
  s << "  search time       " << format_duration(run_compute_seconds) << " compute, "
    << format_duration(result.seconds) << " this process\n"
    << "  files             config.json metrics.jsonl genotype.json genotype.txt";
  for (auto& d : diagrams) s << " " << fs::path(d).filename().string();
  s << " checkpoints/\n";
  try { write_report(cfg.out); } catch (const std::exception& e) { info(std::string("warning: report.html not written: ") + e.what()); }
  write_text((out / "summary.txt").string(), s.str());
  info(s.str());
  return result;
}

AnalyzeResult analyze_checkpoint(const std::string& path, const AnalyzeOptions& opt) {
  const auto t0 = Clock::now();
  std::string file = path;
  if (fs::is_directory(path)) {
    file = latest_checkpoint(path);
    if (file.empty()) throw CheckpointError("run directory " + path + " holds no checkpoint (checkpoints/latest missing)");
  }
  SearchConfig cfg = SearchConfig::preset_defaults("noisydarts", "paper");
  cfg.merge_json(read_checkpoint_config(file, "search"), file);
  if (opt.threads >= 0) cfg.threads = opt.threads;
  if (cfg.data_dir.empty()) cfg.data_dir = default_data_dir(cfg.dataset);
  at::set_num_threads(cfg.threads > 0 ? cfg.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  keep_freed_memory();
  const torch::Device device = parse_device(opt.device.empty() ? cfg.device : opt.device);

  SearchData sd = load_search_data(cfg);
  SearchNetwork net = build_search_network(cfg, sd);
  AnalyzeResult r;
  r.checkpoint = file;
  {
    torch::serialize::InputArchive a;
    open_checkpoint(file, "search", a);
    try {
      torch::serialize::InputArchive m;
      a.read("model", m);
      net->load(m);
      r.epoch = read_int(a, "epoch");
      r.step = read_int(a, "step");
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw CheckpointError("checkpoint " + file + " does not match its search network: " + std::string(e.what()).substr(0, 200));
    }
  }
  net->to(device);
  net->train();
  BatchStream eval_stream(sd.train, sd.a_idx, eval_stream_options(cfg));
  const Batch b = curvature_batch(eval_stream, device);
  r.batch_size = b.y.size(0);
  r.eigen = hessian_dominant_eigenvalue(net, b, EigenOptions{opt.iters > 0 ? opt.iters : static_cast<int>(cfg.hessian_iters), opt.tol, cfg.seed});
  r.genotype = net->genotype();
  r.seconds = seconds_since(t0);
  return r;
}

}  // namespace noisydarts
