#include "noisydarts/search.h"
#include "noisydarts/fused_ops.h"
#include "noisydarts/optim.h"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "noisydarts/architect.h"
#include "noisydarts/hessian.h"
#include "noisydarts/checkpoint.h"
#include "noisydarts/method.h"
#include "noisydarts/data.h"
#include "noisydarts/distributed.h"
#include "noisydarts/engine.h"
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

/// Running sums of one epoch; part of the checkpoint so a mid-epoch resume reports the same.
struct EpochAccum {
  double train_loss = 0, arch_loss = 0;
  int64_t train_correct = 0, arch_correct = 0, train_seen = 0, arch_seen = 0;
  double seconds = 0;  // compute time spent in this epoch before the last checkpoint
  NLOHMANN_DEFINE_TYPE_INTRUSIVE(EpochAccum, train_loss, arch_loss, train_correct, arch_correct, train_seen, arch_seen,
                                 seconds)
};

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

}  // namespace

SearchNetwork build_search_network(const SearchConfig& cfg, const DataShape& shape) {
  SearchNetworkOptions nopt(cfg.channels, shape.classes, cfg.layers);
  nopt.in_channels(shape.channels).steps(cfg.steps).multiplier(cfg.multiplier)
      .primitives(cfg.primitives).noise(cfg.noise).alpha_init_std(cfg.alpha_init_std)
      .space(genotype_space(cfg.space)).se_ratio(cfg.se_ratio).swish(cfg.swish).image_size(shape.height);
  if (const EdgeOps* normal = space_edge_ops(cfg.space, false)) nopt.edge_ops_normal(*normal).edge_ops_reduce(*space_edge_ops(cfg.space, true));
  auto method = make_search_method(cfg);
  method->shape_network(nopt);
  auto net = make_search_network(nopt);
  net->set_method(std::move(method));
  return net;
}

WeightStepResult search_weight_step(SearchNetwork& net, torch::optim::SGD& sgd,
                                    const std::vector<torch::Tensor>& weights, const Batch& batch,
                                    double grad_clip, const GradReducer& reduce) {
  // Gradients start undefined each step (not zeroed): a weight outside this step's graph (an op
  // gdas did not sample) is then skipped by SGD in every step alike, whether or not it had a
  // gradient before, so a resumed run (gradients are not checkpointed) steps the same weights.
  for (const auto& w : weights) w.mutable_grad().reset();
  // The step differentiates into the weights only: with the architecture frozen its forward
  // records no paths into the alphas (and keeps nothing for their gradient, fused_ops.h).
  WeightsFrozen frozen_arch(net->arch_parameters());
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
  clip_and_sgd_step(sgd, weights, grad_clip);  // clip_grad_norm_ + SGD::step (optim.h)
  return r;
}

std::string latest_checkpoint(const std::string& run_dir) {
  return RunDirectory(run_dir, "search", false).latest_checkpoint();
}

namespace {

/// The summary's margins line into `s`; returns the closing `warning:` line when a kept op's
/// margin is below the threshold ("" otherwise).
std::string margins_lines(const json& margins, std::ostringstream& s) {
  if (margins.is_null()) return "";
  const double threshold = margins["threshold"].get<double>();
  double op_min = std::numeric_limits<double>::infinity(), edge_min = op_min;
  std::string op_at, edge_at;
  int below = 0, kept = 0;
  for (const char* part : {"normal", "reduce", "layers"}) {
    if (!margins.contains(part)) continue;
    int i = 0;
    for (const auto& e : margins[part]) {
      ++i;
      ++kept;
      const std::string where = std::string(part == std::string("layers") ? "layer " : std::string(part) + " edge ") + std::to_string(i);
      const double op = e["op_margin"].get<double>();
      below += op < threshold;
      if (op < op_min) op_min = op, op_at = where;
      if (e.contains("edge_margin") && e["edge_margin"].get<double>() < edge_min) edge_min = e["edge_margin"].get<double>(), edge_at = where;
    }
  }
  char b[320];
  std::snprintf(b, sizeof b, "  margins           smallest op margin %.3g (%s)", op_min, op_at.c_str());
  s << b;
  if (!edge_at.empty()) {
    std::snprintf(b, sizeof b, ", smallest edge margin %.3g (%s)", edge_min, edge_at.c_str());
    s << b;
  }
  std::snprintf(b, sizeof b, "; undecided below 0.1/K = %.4f: %d of %d kept ops\n", threshold, below, kept);
  s << b;
  if (below == 0) return "";
  std::snprintf(b, sizeof b,
                "warning: %d of %d kept ops win by less than 0.1/K = %.4f (smallest %.3g, %s): another seed would likely "
                "change the cell; search longer or with a larger --arch-lr\n",
                below, kept, threshold, op_min, op_at.c_str());
  return b;
}

/// The search loop (SPEC 1.1-1.3): the set-up in the constructor, one iteration in step(), the
/// epoch-end work in small named pieces, the results in finish(). Every piece of state a restart
/// needs is a Stateful part of `ckpt_`.
class Searcher {
 public:
  Searcher(SearchConfig cfg, bool resume, const SearchCallbacks& cb);
  SearchResult run();

 private:
  // Set-up.
  void read_resumed_config(const std::string& out, int threads);
  void build();
  void resume_from_checkpoint();
  void print_start_line() const;
  // One iteration.
  void step(int64_t epoch, int64_t step, double lr);
  // Epoch boundaries.
  void begin_epoch(int64_t epoch, double& lr);
  void supernet_accuracy(json& m);
  json epoch_metrics(int64_t epoch, double lr, double epoch_seconds);
  void hessian_and_early_stop(int64_t epoch, json& m);
  void print_epoch_line(const json& m, double epoch_seconds) const;
  void save_checkpoint(int64_t epoch, int64_t step);
  [[noreturn]] void stop(int64_t epoch, int64_t step);
  SearchResult finish();

  void info(const std::string& s) const {
    if (cb_.info && writer_) cb_.info(s);
  }

  SearchConfig cfg_;
  const bool resume_;
  const SearchCallbacks& cb_;
  const Clock::time_point t_start_ = Clock::now();
  bool writer_ = true;  // only rank 0 of a data-parallel run prints and writes
  std::shared_ptr<Distributed> dist_;
  torch::Device device_{torch::kCPU};
  int threads_ = 1;
  std::unique_ptr<RunDirectory> dir_;
  std::vector<std::string> candidates_;  // resume: checkpoints newest first

  SearchData sd_;
  SearchNetwork net_{nullptr};
  std::vector<torch::Tensor> weights_;
  std::unique_ptr<torch::optim::SGD> sgd_;
  std::unique_ptr<Architect> architect_;
  SearchMethod* method_ = nullptr;  // the network's (method.h)
  std::unique_ptr<BatchStream> train_stream_, valid_stream_, eval_stream_;
  GradReducer reduce_;
  int64_t world_ = 1, steps_per_epoch_ = 0;

  // Run state (all of it in the checkpoint).
  LoopPosition pos_;
  EpochAccum acc_;
  MetricsLog history_;
  std::unique_ptr<Checkpoint> ckpt_;

  // This process' bookkeeping.
  Progress progress_{false};
  Clock::time_point last_ckpt_ = Clock::now(), t_epoch_ = Clock::now();
  double seconds_before_ = 0;  // compute seconds of the current epoch before this process
  int64_t first_step_ = 0;
  int64_t stopped_at_ = -1;
  Genotype early_genotype_;
  double valid_acc_ = -1;
};

Searcher::Searcher(SearchConfig cfg, bool resume, const SearchCallbacks& cb)
    : cfg_(std::move(cfg)), resume_(resume), cb_(cb) {
  if (cfg_.out.empty()) throw UsageError("--out is required: the run directory to write");
  // Data parallelism (docs/distributed.md) decides who writes; the rendezvous itself comes
  // after the configuration is known (its timeout is part of it).
  writer_ = dist_env_from_environment().rank == 0;
  dir_ = std::make_unique<RunDirectory>(cfg_.out, "search", writer_);
  if (resume_) read_resumed_config(cfg_.out, cfg_.threads);
  cfg_.finalize();
  // Rendezvous first, so that a rank failing later makes the others stop at their next
  // collective instead of waiting forever.
  dist_ = init_distributed_from_environment(cfg_.dist_timeout_s);
  device_ = rank_device(cfg_.device, dist_.get());
  threads_ = resolve_threads(cfg_.threads);
  at::set_num_threads(threads_);
  keep_freed_memory();
  build();
}

/// Resume: the configuration stored in the newest readable checkpoint wins (it defines the
/// network being resumed); only the run directory and, when >= 0, the thread count come from
/// the caller. The run directory is locked before anything in it is read.
void Searcher::read_resumed_config(const std::string& out, int threads) {
  const auto stored = dir_->open_for_resume(
      "search", {}, "no checkpoint to resume in " + out + "/checkpoints (start a new search without --resume)", candidates_);
  cfg_ = SearchConfig::preset_defaults("noisydarts", "paper");
  merge_stored_config(cfg_, stored.config, stored.file);
  cfg_.out = out;
  // The stored thread count is kept unless the caller overrides it: results are bitwise
  // reproducible only with the same number of threads (docs/reproducibility.md).
  if (threads >= 0) cfg_.threads = threads;
}

void Searcher::build() {
  // Data: everything is validated before the run directory is touched.
  sd_ = load_search_data(cfg_, cb_.progress ? std::function<void(const std::string&)>([this](const std::string& s) { info(s); }) : nullptr);

  // Run directory: created and locked; a new search never overwrites one.
  if (!resume_) {
    if (dir_->exists()) dir_->lock();  // a live run on the same --out is named before anything else
    if (!dir_->latest_checkpoint().empty())
      throw UsageError("run directory " + cfg_.out + " already holds a search: pass --resume to continue it or choose another --out");
    dir_->create_and_lock();
    // A resumed run's config.json is rewritten only once its checkpoint has loaded, so a refused
    // checkpoint leaves the run directory untouched.
    dir_->write("config.json", cfg_.to_json().dump(2) + "\n");
  }

  // Network and optimisers.
  torch::manual_seed(cfg_.seed);
  net_ = build_search_network(cfg_, sd_);
  net_->to(device_);
  weights_ = net_->weight_parameters();
  sgd_ = std::make_unique<torch::optim::SGD>(
      weights_, torch::optim::SGDOptions(cfg_.lr).momentum(cfg_.momentum).weight_decay(cfg_.weight_decay));
  architect_ = std::make_unique<Architect>(net_, ArchitectOptions{cfg_.arch_lr, cfg_.arch_beta1, cfg_.arch_beta2, cfg_.arch_weight_decay});
  method_ = net_->method();
  // The method's loss term sees the op alphas (not pc-darts' edge weights; S1: each edge's pair).
  architect_->set_penalty([this] { return method_->arch_penalty(net_->op_alphas()); });

  // Streams. Each rank reads its slice of every global batch of batch_size * world images.
  BatchStream::Options so;
  so.batch_size = cfg_.batch_size;
  so.shuffle = true;
  so.augment = cfg_.augment;
  so.workers = cfg_.workers;
  so.prefetch = 2;
  so.seed = cfg_.seed * 2 + 1;
  so.rank = dist_ ? dist_->rank() : 0;
  so.world = dist_ ? dist_->world() : 1;
  world_ = so.world;
  train_stream_ = std::make_unique<BatchStream>(sd_.train, sd_.w_idx, so);
  so.seed = cfg_.seed * 2 + 2;
  valid_stream_ = std::make_unique<BatchStream>(sd_.train, sd_.a_idx, so);  // persistent: never reset between epochs
  BatchStream::Options eo = eval_stream_options(cfg_);
  eo.rank = so.rank;
  eo.world = so.world;
  eval_stream_ = std::make_unique<BatchStream>(sd_.train, sd_.a_idx, eo);
  steps_per_epoch_ = cfg_.max_steps > 0 ? std::min(cfg_.max_steps, train_stream_->batches_per_pass())
                                        : train_stream_->batches_per_pass();

  // The checkpoint: the run's Stateful parts (docs/checkpoint.md).
  pos_.world = world_;
  pos_.steps_per_epoch = steps_per_epoch_;
  ckpt_ = std::make_unique<Checkpoint>("search", [this] { return cfg_.to_json(); });
  ckpt_->add(std::make_unique<ModuleState>(*net_, "model"))
      .add(std::make_unique<SgdState>(*sgd_, weights_, "weight_optimizer"))
      .add(std::make_unique<AdamState>(architect_->optimizer(), net_->arch_parameters(), "arch_optimizer"))
      .add(pos_)
      .add(std::make_unique<StreamState>(*train_stream_, "train", world_))
      .add(std::make_unique<StreamState>(*valid_stream_, "valid", world_))
      .add(std::make_unique<RngState>())
      .add(std::make_unique<JsonState>("epoch_accum", [this] { return json(acc_); },
                                       [this](const json& j) { acc_ = j.get<EpochAccum>(); }))
      .add(history_.state())
      .add(std::make_unique<JsonState>("method", [this] { return method_->state(); },
                                       [this](const json& j) { method_->load_state(j); }, /*optional=*/true));
  if (resume_) resume_from_checkpoint();

  if (dist_) {
    // Identical start on every rank (weights, alphas, BN statistics); gradients of the weights
    // and of the alphas are averaged every step, so the ranks stay identical.
    dist_->broadcast_module(*net_);
    reduce_ = dist_->mean_reducer();
    architect_->set_grad_reducer(reduce_);
  }
  print_start_line();
}

void Searcher::resume_from_checkpoint() {
  const std::string from = load_newest(candidates_, [&](const std::string& p) { ckpt_->load(p); },
                                       [this](const std::string& s) { info(s); }, "");
  dir_->write("config.json", cfg_.to_json().dump(2) + "\n");
  info("resuming " + cfg_.out + " from " + fs::path(from).filename().string() + " (epoch " +
       std::to_string(pos_.epoch + 1) + ", step " + std::to_string(pos_.step) + ")");
  // A run that stopped early (DARTS-ES) is finished: a resume only rewrites its results.
  if (!history_.epochs.empty() && history_.epochs.back().contains("early_stop")) {
    const json& last = history_.epochs.back();
    stopped_at_ = last["epoch"].get<int64_t>();
    early_genotype_ = genotype_from_text(last["early_stop"]["genotype"].get<std::string>());
    pos_.epoch = cfg_.epochs;
  }
}

void Searcher::print_start_line() const {
  int64_t n_params = 0;
  for (auto& p : weights_) n_params += p.numel();
  std::ostringstream o;
  o << "search: " << method_->name() << " (" << cfg_.preset << " preset), " << cfg_.dataset << " (" << sd_.w_idx.size() << " weight / "
    << sd_.a_idx.size() << " architecture images), " << cfg_.layers << " cells x " << cfg_.channels
    << " channels, " << cfg_.primitives.size() << " ops, " << n_params << " weights, noise "
    << to_string(cfg_.noise.type);
  if (cfg_.noise.enabled())
    o << " " << to_string(cfg_.noise.mixture) << " lambda " << cfg_.noise.lambda << " mu " << cfg_.noise.mean;
  o << ", " << cfg_.epochs << " epochs x " << steps_per_epoch_ << " steps, " << threads_ << " threads, " << device_.str();
  if (dist_) o << ", " << dist_->world() << " ranks (global batch " << cfg_.batch_size * dist_->world() << ")";
  info(o.str());
}

SearchResult Searcher::run() {
  progress_ = Progress(cb_.progress && writer_);
  last_ckpt_ = Clock::now();
  for (int64_t epoch = pos_.epoch; epoch < cfg_.epochs; ++epoch) {
    double lr = 0;
    begin_epoch(epoch, lr);
    for (int64_t s = first_step_; s < steps_per_epoch_; ++s) step(epoch, s, lr);
    progress_.finish();

    // Epoch end: metrics, checkpoint, early stop.
    const double epoch_seconds = seconds_before_ + seconds_since(t_epoch_);
    json m = epoch_metrics(epoch, lr, epoch_seconds);
    history_.epochs.push_back(m);
    dir_->write("metrics.jsonl", history_.jsonl());
    print_epoch_line(m, epoch_seconds);
    if (cb_.on_epoch && writer_) cb_.on_epoch(m);
    acc_ = EpochAccum{};
    save_checkpoint(epoch + 1, 0);
    if (stopped_at_ > 0) {
      info("early stop (DARTS-ES): eigenvalue ratio " + std::to_string(m["early_stop"]["ratio"].get<double>()) +
           " < " + std::to_string(cfg_.early_stop_ratio) + "; keeping the genotype of epoch " +
           std::to_string(m["early_stop"]["genotype_epoch"].get<int64_t>()));
      break;
    }
    // A single process stops at the epoch end it just checkpointed; data-parallel ranks decide
    // together at the next step's all-reduce (a local flag could differ between ranks here).
    if (!dist_ && stop_requested() && epoch + 1 < cfg_.epochs) stop(epoch + 1, 0);
  }
  return finish();
}

void Searcher::begin_epoch(int64_t epoch, double& lr) {
  lr = cosine_lr(cfg_.lr, cfg_.lr_min, epoch, cfg_.epochs);
  for (auto& g : sgd_->param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
  net_->set_noise_decay(noise_decay_factor(cfg_.noise, static_cast<double>(epoch), static_cast<double>(cfg_.epochs)));
  method_->begin_epoch(*net_, epoch, cfg_.epochs);
  net_->train();
  first_step_ = (epoch == pos_.epoch) ? pos_.step : 0;
  if (first_step_ == 0) acc_ = EpochAccum{};
  t_epoch_ = Clock::now();
  seconds_before_ = acc_.seconds;
}

/// One search iteration (SPEC 1.1), top to bottom.
void Searcher::step(int64_t epoch, int64_t step, double lr) {
  Batch vb = valid_stream_->next();
  vb.x = vb.x.to(device_);
  vb.y = vb.y.to(device_);
  Batch tb = train_stream_->next();
  tb.x = tb.x.to(device_);
  tb.y = tb.y.to(device_);
  // 1. Architecture step on the architecture half (noise on, training mode). Second order
  //    unrolls the coming weight step on the same training batch. During the method's warm-up
  //    the alphas are only evaluated.
  const auto ar = epoch < first_arch_epoch(cfg_) ? architect_->evaluate(vb)
                  : cfg_.order == "second"
                      ? architect_->step_unrolled(vb, tb, *sgd_, cfg_.unrolled_xi < 0 ? lr : cfg_.unrolled_xi)
                      : architect_->step(vb);
  // 2. Weight step on the weight half (with the op weights the method perturbs, if any).
  method_->before_weight_step(*net_, tb);
  const auto wr = search_weight_step(net_, *sgd_, weights_, tb, cfg_.grad_clip, reduce_);
  method_->after_weight_step();
  // 3. Losses, counts and stop requests of this step over all ranks (identical on every rank,
  //    so the epoch sums in the checkpoint, the divergence decision and the stop step agree).
  std::vector<torch::Tensor> st{torch::tensor({ar.loss * vb.y.size(0), static_cast<double>(ar.correct),
                                               static_cast<double>(vb.y.size(0)), wr.loss * tb.y.size(0),
                                               static_cast<double>(wr.correct), static_cast<double>(tb.y.size(0)),
                                               stop_requested() ? 1.0 : 0.0},
                                              torch::kDouble)};
  if (dist_) dist_->allreduce_sum(st);
  const auto stv = st[0];
  const double arch_loss_sum = stv[0].item<double>(), train_loss_sum = stv[3].item<double>();
  const int64_t arch_b = static_cast<int64_t>(stv[2].item<double>()), b = static_cast<int64_t>(stv[5].item<double>());
  const double loss_v = train_loss_sum / b, arch_loss_v = arch_loss_sum / arch_b;
  if (!std::isfinite(loss_v) || !std::isfinite(arch_loss_v)) {
    progress_.finish();
    const auto last = dir_->latest_checkpoint();
    throw DivergedError("loss became " + std::string(std::isnan(loss_v) || std::isnan(arch_loss_v) ? "NaN" : "Inf") +
                        " at epoch " + std::to_string(epoch + 1) + " step " + std::to_string(step + 1) +
                        "; last good checkpoint: " + (last.empty() ? "none" : last) + " (lower --lr or --arch-lr)");
  }
  acc_.train_loss += train_loss_sum;
  acc_.train_correct += static_cast<int64_t>(stv[4].item<double>());
  acc_.train_seen += b;
  acc_.arch_loss += arch_loss_sum;
  acc_.arch_correct += static_cast<int64_t>(stv[1].item<double>());
  acc_.arch_seen += arch_b;

  // 4. Progress, periodic checkpoint, stop.
  const double sec_per_step = seconds_since(t_epoch_) / std::max<double>(1.0, static_cast<double>(step + 1 - first_step_));
  const double done = static_cast<double>(epoch * steps_per_epoch_ + step + 1);
  char body[160];
  std::snprintf(body, sizeof body, "loss %.4f  acc %.1f%%  arch loss %.4f  %.0f img/s", acc_.train_loss / acc_.train_seen,
                100.0 * acc_.train_correct / acc_.train_seen, acc_.arch_loss / acc_.arch_seen, 2.0 * b / std::max(1e-9, sec_per_step));
  progress_.update(progress_line(epoch + 1, cfg_.epochs, step + 1, steps_per_epoch_, body,
                                 sec_per_step * (static_cast<double>(cfg_.epochs * steps_per_epoch_) - done)));
  if (stv[6].item<double>() > 0) stop(epoch, step + 1);
  if (cfg_.checkpoint_every_min > 0 && step + 1 < steps_per_epoch_ &&
      seconds_since(last_ckpt_) >= cfg_.checkpoint_every_min * 60.0)
    save_checkpoint(epoch, step + 1);
}

void Searcher::save_checkpoint(int64_t epoch, int64_t step) {
  acc_.seconds = step == 0 ? 0.0 : seconds_before_ + seconds_since(t_epoch_);
  pos_.epoch = epoch;
  pos_.step = step;
  dir_->save_checkpoint(*ckpt_, epoch, step, cfg_.keep_checkpoints);
  last_ckpt_ = Clock::now();
}

/// Graceful stop: checkpoint the finished step, say how to continue, exit 9 (every rank).
void Searcher::stop(int64_t epoch, int64_t step) {
  progress_.finish();
  if (step > 0) save_checkpoint(epoch, step);  // (an epoch end was just checkpointed)
  throw StoppedError(stop_message("search", cfg_.out, epoch, step));
}

void Searcher::supernet_accuracy(json& m) {
  double valid_loss = -1;
  valid_acc_ = -1;
  if (cfg_.eval_valid) {
    torch::InferenceMode inference;
    net_->eval();
    eval_stream_->seek({0, 0});
    double l = 0;
    int64_t c = 0, n = 0;
    for (int64_t i = 0; i < eval_stream_->batches_per_pass(); ++i) {
      Batch eb = eval_stream_->next();
      auto lg = net_->forward(eb.x.to(device_));
      auto y = eb.y.to(device_);
      l += torch::nn::functional::cross_entropy(lg, y).item<double>() * y.size(0);
      c += lg.argmax(1).eq(y).sum().item<int64_t>();
      n += y.size(0);
    }
    net_->train();
    if (dist_) {  // each rank evaluated its slice of the architecture half
      std::vector<torch::Tensor> t{torch::tensor({l, static_cast<double>(c), static_cast<double>(n)}, torch::kDouble)};
      dist_->allreduce_sum(t);
      l = t[0][0].item<double>();
      c = static_cast<int64_t>(t[0][1].item<double>());
      n = static_cast<int64_t>(t[0][2].item<double>());
    }
    valid_loss = l / n;
    valid_acc_ = 100.0 * c / n;
  }
  m["valid_loss"] = valid_loss;
  m["valid_acc"] = valid_acc_;
}

json Searcher::epoch_metrics(int64_t epoch, double lr, double epoch_seconds) {
  const double decay = noise_decay_factor(cfg_.noise, static_cast<double>(epoch), static_cast<double>(cfg_.epochs));
  json m{{"epoch", epoch + 1},
         {"method", method_->name()},
         {"lr", lr},
         {"noise_decay", decay},
         {"noise_scale", cfg_.noise.enabled() ? cfg_.noise.lambda * decay : 0.0},
         {"train_loss", acc_.train_loss / acc_.train_seen},
         {"train_acc", 100.0 * acc_.train_correct / acc_.train_seen},
         {"arch_loss", acc_.arch_loss / acc_.arch_seen},
         {"arch_acc", 100.0 * acc_.arch_correct / acc_.arch_seen}};
  supernet_accuracy(m);
  m["seconds"] = epoch_seconds;
  m["images_per_sec"] = (acc_.train_seen + acc_.arch_seen) / std::max(1e-9, epoch_seconds);
  const Genotype g = net_->genotype();
  m["genotype"] = genotype_to_text(g);
  m["primitives"] = cfg_.primitives;
  if (g.space == "darts") {
    m["skip_normal"] = count_op(g.normal, "skip_connect");
    m["skip_reduce"] = count_op(g.reduce, "skip_connect");
  } else {
    m["skips"] = count_skips(g);
  }
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < net_->arch_names().size(); ++i) m[net_->arch_names()[i]] = weight_table(net_->arch_weights(i, /*as_double=*/true));
  }
  m.update(method_->state());
  m.update(method_->epoch_log(*net_));
  hessian_and_early_stop(epoch, m);
  return m;
}

void Searcher::hessian_and_early_stop(int64_t epoch, json& m) {
  if (cfg_.hessian_every <= 0 || (epoch + 1) % cfg_.hessian_every != 0) return;
  const auto t_h = Clock::now();
  // Every rank computes it on the same (unsharded) batch and weights: the same number. A
  // single process's eval stream is that unsharded stream already.
  std::unique_ptr<BatchStream> unsharded;
  if (dist_) unsharded = std::make_unique<BatchStream>(sd_.train, sd_.a_idx, eval_stream_options(cfg_));
  const auto eig = hessian_dominant_eigenvalue(net_, curvature_batch(dist_ ? *unsharded : *eval_stream_, device_),
                                               EigenOptions{static_cast<int>(cfg_.hessian_iters), 1e-3, cfg_.seed});
  m["hessian_eigenvalue"] = eig.eigenvalue;
  m["hessian_iterations"] = eig.iterations;
  m["hessian_seconds"] = seconds_since(t_h);
  if (cfg_.early_stop_ratio <= 0) return;
  // DARTS-ES (RobustDARTS): stop when lambda(e - window) / lambda(e) < ratio and keep the
  // architecture of epoch e - window.
  for (const auto& h : history_.epochs) {
    if (h["epoch"].get<int64_t>() != epoch + 1 - cfg_.early_stop_window || !h.contains("hessian_eigenvalue")) continue;
    const double then = h["hessian_eigenvalue"].get<double>(), now = eig.eigenvalue;
    if (now > 0 && then / now < cfg_.early_stop_ratio) {
      stopped_at_ = epoch + 1;
      early_genotype_ = genotype_from_text(h["genotype"].get<std::string>());
      m["early_stop"] = {{"ratio", then / now}, {"genotype_epoch", h["epoch"]}, {"genotype", h["genotype"]}};
    }
  }
}

void Searcher::print_epoch_line(const json& m, double epoch_seconds) const {
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(2);
  o << "epoch " << m["epoch"].get<int64_t>() << "/" << cfg_.epochs << "  train loss " << m["train_loss"].get<double>()
    << " acc " << m["train_acc"].get<double>() << "%  arch loss " << m["arch_loss"].get<double>();
  if (cfg_.eval_valid) o << "  valid acc " << m["valid_acc"].get<double>() << "%";
  if (m.contains("hessian_eigenvalue")) o << "  hessian eig " << m["hessian_eigenvalue"].get<double>();
  if (m.contains("skip_normal")) o << "  skips normal/reduce " << m["skip_normal"] << "/" << m["skip_reduce"];
  else o << "  skips " << m["skips"];
  o << "  " << format_duration(epoch_seconds);
  info(o.str());
}

SearchResult Searcher::finish() {
  SearchResult result;
  const Genotype g = stopped_at_ > 0 ? early_genotype_ : net_->genotype();
  // The margins of the epoch the genotype was derived at (the last one, or DARTS-ES' pick).
  for (const auto& h : history_.epochs)
    if (stopped_at_ > 0 ? h["epoch"] == history_.epochs.back()["early_stop"]["genotype_epoch"] : &h == &history_.epochs.back())
      result.margins = genotype_margins(h, cfg_);
  result.genotype = g;
  result.stopped_early_at = stopped_at_;
  result.epochs_done = history_.epochs.empty() ? 0 : history_.epochs.back()["epoch"].get<int64_t>();
  result.valid_acc = history_.epochs.empty() ? -1.0 : history_.epochs.back().value("valid_acc", -1.0);
  result.seconds = seconds_since(t_start_);
  if (!writer_) return result;  // rank 0 writes the results
  json gj = genotype_to_json(g);
  if (!result.margins.is_null()) gj["margins"] = result.margins;
  dir_->write("genotype.json", gj.dump(2) + "\n");
  dir_->write("genotype.txt", genotype_to_text(g) + "\n");
  const std::vector<std::string> diagrams = write_genotype_diagrams(g, cfg_.out);
  std::ostringstream s;
  s << "NoisyDARTS search finished\n"
    << "  run directory     " << cfg_.out << "\n"
    << "  method            " << method_->name() << "\n"
    << "  preset            " << cfg_.preset << " (scale " << cfg_.scale << "), noise " << to_string(cfg_.noise.type);
  if (cfg_.noise.enabled())
    s << " " << to_string(cfg_.noise.mixture) << " lambda " << cfg_.noise.lambda << " mu " << cfg_.noise.mean
      << " decay " << to_string(cfg_.noise.decay);
  s << "\n  dataset           " << cfg_.dataset << ", " << cfg_.epochs << " epochs";
  if (stopped_at_ > 0) s << " (stopped early after epoch " << stopped_at_ << " by --early-stop)";
  s << ", " << cfg_.order << "-order architecture step\n"
    << "  search space      " << cfg_.space << "\n"
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
  const std::string undecided = margins_lines(result.margins, s);
  {
    // The derived architecture's evaluation network at its recipe size (DARTS: C 36, L 20;
    // nb201: C 16, N 5) on this dataset's input shape: what `noisydarts profile --genotype
    // DIR/genotype.json --dataset D` prints.
    const auto size = default_eval_size(g, EvalStyle::kCifar);
    const auto prof = profile_genotype(g, size.first, size.second, shape_of(sd_.train));
    char b[200];
    std::snprintf(b, sizeof b, "%.3f M params, %.1f M multiply-adds (%s, %s input)", prof.params / 1e6, prof.macs / 1e6,
                  eval_size_text(g, size).c_str(), cfg_.dataset.c_str());
    s << "  profile           " << b << "\n";
  }
  s << "  search time       " << format_duration(history_.sum("seconds")) << " compute, "
    << format_duration(result.seconds) << " this process\n"
    << "  files             config.json metrics.jsonl genotype.json genotype.txt";
  for (auto& d : diagrams) s << " " << fs::path(d).filename().string();
  bool report = false;
  try {
    write_report(cfg_.out);
    report = true;
  } catch (const std::exception& e) {
    info(std::string("warning: report.html not written: ") + e.what());
  }
  if (report) s << " report.html";
  s << " summary.txt checkpoints/\n"
    << "  next              noisydarts train --genotype " << cfg_.out << " --out " << cfg_.out << "-train\n"
    << undecided;
  dir_->write("summary.txt", s.str());
  info(s.str());
  return result;
}

}  // namespace

json genotype_margins(const json& m, const SearchConfig& cfg) {
  auto table = [&](const char* key) {
    std::vector<double> v;
    int64_t rows = 0, cols = 0;
    for (const auto& row : m.at(key)) {
      ++rows;
      cols = static_cast<int64_t>(row.size());
      for (const auto& x : row) v.push_back(x.get<double>());
    }
    return torch::tensor(v, torch::kDouble).reshape({rows, cols});
  };
  // K: the candidates of an edge (S1: its own two, not the union the table spans).
  const auto* edge_ops = space_edge_ops(cfg.space, false);
  const double k = static_cast<double>(edge_ops ? edge_ops->front().size() : cfg.primitives.size());
  json out{{"threshold", 0.1 / k}};
  if (m.contains("alphas_normal")) {
    for (const char* cell : {"normal", "reduce"}) {
      json rows = json::array();
      for (const auto& e : cell_margins(table(cell[0] == 'n' ? "alphas_normal" : "alphas_reduce"), cfg.primitives,
                                        static_cast<int>(cfg.steps)))
        rows.push_back({{"op_margin", e.op_margin}, {"edge_margin", e.edge_margin}});
      out[cell] = rows;
    }
  } else if (m.contains("alphas")) {
    const bool mbv2 = cfg.space == "mbv2";
    json rows = json::array();
    for (double x : row_margins(table("alphas"))) rows.push_back({{"op_margin", x}});
    out[mbv2 ? "layers" : "normal"] = rows;
    out["threshold"] = 0.1 / static_cast<double>(m.at("alphas").at(0).size());
  } else {
    return json();
  }
  return out;
}

SearchResult run_search(SearchConfig cfg, bool resume, const SearchCallbacks& cb) {
  Searcher searcher(std::move(cfg), resume, cb);
  return searcher.run();
}

SearchSnapshot open_search_checkpoint(const std::string& path, int threads, const std::string& device,
                                      int64_t batches) {
  SearchSnapshot snap;
  snap.file = path;
  if (fs::is_directory(path)) {
    snap.file = latest_checkpoint(path);
    if (snap.file.empty()) throw CheckpointError("run directory " + path + " holds no checkpoint (checkpoints/latest missing)");
  }
  const std::string& file = snap.file;
  SearchConfig& cfg = snap.cfg;
  cfg = SearchConfig::preset_defaults("noisydarts", "paper");
  cfg.merge_json(read_checkpoint_config(file, "search"), file);
  if (threads >= 0) cfg.threads = threads;
  if (cfg.data_dir.empty()) cfg.data_dir = default_data_dir(cfg.dataset);
  at::set_num_threads(resolve_threads(cfg.threads));
  keep_freed_memory();
  snap.device = parse_device(device.empty() ? cfg.device : device);

  SearchData sd = load_search_data(cfg);
  snap.net = build_search_network(cfg, sd);
  {
    torch::serialize::InputArchive a;
    open_checkpoint(file, "search", a);
    try {
      torch::serialize::InputArchive m;
      a.read("model", m);
      snap.net->load(m);
      snap.epoch = read_int(a, "epoch");
      snap.step = read_int(a, "step");
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw CheckpointError("checkpoint " + file + " does not match its search network: " + std::string(e.what()).substr(0, 200));
    }
  }
  snap.net->to(snap.device);
  snap.net->train();
  // The method's schedule of the epoch the checkpoint was written in (an epoch-end checkpoint:
  // the epoch just finished), as the search's own Hessian saw it (darts-minus' auxiliary skip).
  snap.net->method()->begin_epoch(*snap.net, snap.step == 0 ? std::max<int64_t>(snap.epoch - 1, 0) : snap.epoch, cfg.epochs);
  // The architecture half in fixed order without augmentation; batch 0 is curvature_batch's.
  BatchStream eval_stream(sd.train, sd.a_idx, eval_stream_options(cfg));
  eval_stream.seek({0, 0});
  const int64_t n = std::min<int64_t>(std::max<int64_t>(batches, 1), eval_stream.batches_per_pass());
  for (int64_t i = 0; i < n; ++i) {
    Batch b = eval_stream.next();
    b.x = b.x.to(snap.device);
    b.y = b.y.to(snap.device);
    snap.batches.push_back(std::move(b));
  }
  return snap;
}

AnalyzeResult analyze_checkpoint(const std::string& path, const AnalyzeOptions& opt) {
  const auto t0 = Clock::now();
  SearchSnapshot snap = open_search_checkpoint(path, opt.threads, opt.device, 1);
  AnalyzeResult r;
  r.checkpoint = snap.file;
  r.epoch = snap.epoch;
  r.step = snap.step;
  const Batch& b = snap.batches.front();
  r.batch_size = b.y.size(0);
  r.eigen = hessian_dominant_eigenvalue(snap.net, b, EigenOptions{opt.iters > 0 ? opt.iters : static_cast<int>(snap.cfg.hessian_iters), opt.tol, snap.cfg.seed});
  r.genotype = snap.net->genotype();
  r.seconds = seconds_since(t0);
  return r;
}

}  // namespace noisydarts
