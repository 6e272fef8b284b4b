#include "noisydarts/train.h"

#include <malloc.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <set>
#include <sstream>
#include <thread>

#include "noisydarts/architect.h"
#include "noisydarts/checkpoint.h"
#include "noisydarts/optim.h"
#include "noisydarts/distributed.h"
#include "noisydarts/engine.h"
#include "noisydarts/config.h"
#include "noisydarts/error.h"
#include "noisydarts/runtime.h"
#include "noisydarts/interop.h"

namespace noisydarts {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

// ------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------

namespace {

// Calls f(key, field) for every field, in the order of config.json.
template <class Self, class F>
void visit_fields(Self& c, F&& f) {
  f("preset", c.preset);
  f("out", c.out);
  f("genotype", c.genotype);
  f("dataset", c.dataset);
  f("data_dir", c.data_dir);
  f("subset", c.subset);
  f("image_size", c.image_size);
  f("valid_portion", c.valid_portion);
  f("batch_size", c.batch_size);
  f("crop_padding", c.crop_padding);
  f("flip", c.flip);
  f("cutout", c.cutout);
  f("workers", c.workers);
  f("channels", c.channels);
  f("layers", c.layers);
  f("network", c.network);
  f("auxiliary", c.auxiliary);
  f("auxiliary_weight", c.auxiliary_weight);
  f("drop_path_prob", c.drop_path_prob);
  f("init_from", c.init_from);
  f("epochs", c.epochs);
  f("lr", c.lr);
  f("lr_min", c.lr_min);
  f("momentum", c.momentum);
  f("weight_decay", c.weight_decay);
  f("grad_clip", c.grad_clip);
  f("seed", c.seed);
  f("threads", c.threads);
  f("device", c.device);
  f("max_steps", c.max_steps);
  f("dist_timeout_s", c.dist_timeout_s);
  f("checkpoint_every_min", c.checkpoint_every_min);
  f("keep_checkpoints", c.keep_checkpoints);
}

// Evaluation batch: large enough to be efficient, small enough that activations stay below the
// mmap threshold above.
constexpr int64_t kEvalBatch = 64;

}  // namespace

TrainConfig TrainConfig::preset_defaults(const std::string& preset) {
  TrainConfig c;  // the field defaults are the paper recipe's values (SPEC 3)
  if (preset == "paper") {
    c.preset = "paper";
    c.dataset = "cifar10";
    return c;
  }
  if (preset != "default") throw UsageError("--preset must be default or paper, got '" + preset + "'");
  // ~10 minutes on this 2-core machine with Fashion-MNIST (measured, docs/train.md): a small
  // network on a subset; the rest of the recipe as in the paper. One compute thread: with the
  // other core busy, 2 OpenMP threads trained at half the speed of one (23 vs 46 images/s).
  c.preset = "default";
  c.dataset = "fashion-mnist";
  c.subset = 6000;
  c.channels = 16;
  c.layers = 8;
  c.batch_size = 64;
  c.epochs = 6;
  c.threads = 1;
  c.lr = 0.05;
  c.cutout = 8;
  c.crop_padding = 2;
  return c;
}

json TrainConfig::to_json() const {
  json j = json::object();
  visit_fields(*this, [&](const char* key, const auto& v) { j[key] = v; });
  return j;
}

void TrainConfig::merge_json(const json& j, const std::string& where) {
  if (!j.is_object()) throw ConfigError(where + ": a training configuration must be a JSON object");
  std::set<std::string> known;
  visit_fields(*this, [&](const char* key, auto& field) {
    known.insert(key);
    if (!j.contains(key)) return;
    read_config_value(j.at(key), field, key, where);
  });
  for (const auto& item : j.items())
    if (!known.count(item.key())) throw ConfigError(where + ": unknown key '" + item.key() + "'");
}

void TrainConfig::validate() const {
  auto check = [](bool ok, const std::string& what) {
    if (!ok) throw UsageError(what);
  };
  // Upper bounds far above any real network (paper: 20 x 36); absurd values crashed or ran out
  // of memory after the run directory was created.
  check(channels >= 2 && channels <= 1024 && channels % 2 == 0, "--channels must be even and in [2, 1024], got " + std::to_string(channels));
  check(layers >= 1 && layers <= 100, "--layers must be in [1, 100], got " + std::to_string(layers));
  check(epochs >= 1, "--epochs must be >= 1, got " + std::to_string(epochs));
  check(batch_size >= 1, "--batch-size must be >= 1, got " + std::to_string(batch_size));
  check(valid_portion >= 0 && valid_portion < 1, "--valid-portion must be in [0, 1), got " + std::to_string(valid_portion));
  check(subset >= 0, "--subset must be >= 0");
  check(image_size >= kMinImageSize && image_size <= kMaxImageSize,
        "--image-size must be in [" + std::to_string(kMinImageSize) + ", " + std::to_string(kMaxImageSize) +
            "], got " + std::to_string(image_size));
  check(crop_padding >= 0 && cutout >= 0, "--crop-padding and --cutout must be >= 0");
  check(workers >= 1, "--workers must be >= 1");
  check_threads(threads);
  check(max_steps >= 0, "--max-steps must be >= 0");
  check(dist_timeout_s > 0, "--dist-timeout must be > 0 seconds");
  check(checkpoint_every_min >= 0, "--checkpoint-every must be >= 0 minutes");
  check(keep_checkpoints >= 1, "--keep-checkpoints must be >= 1");
  check(lr > 0 && lr_min >= 0 && lr_min <= lr, "--lr must be > 0 and 0 <= --lr-min <= --lr");
  check(momentum >= 0 && momentum < 1, "--momentum must be in [0, 1)");
  check(weight_decay >= 0, "--weight-decay must be >= 0");
  check(grad_clip > 0, "--grad-clip must be > 0");
  check(auxiliary_weight >= 0, "--auxiliary-weight must be >= 0");
  check(drop_path_prob >= 0 && drop_path_prob < 1, "--drop-path must be in [0, 1), got " + std::to_string(drop_path_prob));
  check(network == "cifar" || network == "imagenet", "--network must be cifar or imagenet, got '" + network + "'");
}

Genotype TrainConfig::finalize() {
  validate();
  const Genotype g = resolve_genotype(genotype);
  genotype = genotype_to_text(g);  // config.json holds the resolved cell
  if (data_dir.empty()) data_dir = default_data_dir(dataset);
  // Only networks of DARTS cells have an auxiliary head (SPEC 3); recorded in config.json.
  if (g.space != "darts") auxiliary = false;
  return g;
}

// ------------------------------------------------------------------------------------------
// Evaluation
// ------------------------------------------------------------------------------------------

EvalResult evaluate(EvalNetwork& net, BatchStream& stream, torch::Device device, Precision precision) {
  torch::InferenceMode inference;  // no autograd records, no version counters (docs/bench.md)
  PrecisionScope scope(precision, device);
  const bool was_training = net->is_training();
  net->eval();
  EvalResult r;
  int64_t c1 = 0, c5 = 0;
  double loss = 0;
  for (int64_t b = 0; b < stream.batches_per_pass(); ++b) {
    Batch batch = stream.next();
    auto x = batch.x.to(device);
    auto y = batch.y.to(device);
    auto logits = net->forward(x).logits.to(torch::kFloat);
    loss += torch::nn::functional::cross_entropy(logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum)).item<double>();
    const int64_t k = std::min<int64_t>(5, logits.size(1));
    auto top = std::get<1>(logits.topk(k, 1));
    auto hit = top.eq(y.unsqueeze(1));
    c1 += hit.narrow(1, 0, 1).sum().item<int64_t>();
    c5 += hit.sum().item<int64_t>();
    r.images += y.size(0);
  }
  net->train(was_training);
  if (r.images > 0) {
    r.top1 = 100.0 * c1 / r.images;
    r.top5 = 100.0 * c5 / r.images;
    r.loss = loss / r.images;
  }
  return r;
}

namespace {

EvalNetwork build_network(const TrainConfig& cfg, const Genotype& g, int64_t in_channels, int64_t classes) {
  EvalNetworkOptions o(cfg.channels, classes, cfg.layers, g);
  o.in_channels(in_channels).auxiliary(cfg.auxiliary).style(parse_eval_style(cfg.network));
  return EvalNetwork(o);
}

BatchStream::Options eval_stream_options(const TrainConfig& cfg, int64_t batch_size) {
  BatchStream::Options o;
  o.batch_size = batch_size;
  o.shuffle = false;
  o.augment = AugmentOptions{};
  o.workers = cfg.workers;
  o.prefetch = 2;
  o.seed = cfg.seed;
  return o;
}

std::vector<int64_t> all_indices(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
  return v;
}

}  // namespace

EvalNetwork load_trained_network(const std::string& checkpoint, TrainConfig* cfg_out) {
  if (!fs::exists(checkpoint)) throw CheckpointError("cannot read checkpoint " + checkpoint + ": no such file");
  TrainConfig cfg = TrainConfig::preset_defaults("paper");
  merge_stored_config(cfg, read_checkpoint_config(checkpoint, "train"), checkpoint);
  torch::serialize::InputArchive a;
  open_checkpoint(checkpoint, "train", a);
  int64_t in_channels = 0, classes = 0;
  try {
    in_channels = read_int(a, "in_channels");
    classes = read_int(a, "num_classes");
  } catch (const std::exception&) {
    throw CheckpointError("checkpoint " + checkpoint + " lacks in_channels/num_classes");
  }
  EvalNetwork net = build_network(cfg, resolve_genotype(cfg.genotype), in_channels, classes);
  try {
    torch::serialize::InputArchive m;
    a.read("model", m);
    net->load(m);
  } catch (const std::exception& e) {
    throw CheckpointError("checkpoint " + checkpoint + " does not match its own network configuration: " +
                          std::string(e.what()).substr(0, 200));
  }
  net->eval();
  if (cfg_out) *cfg_out = cfg;
  return net;
}

EvalResult evaluate_checkpoint(const std::string& checkpoint, const std::string& data_dir,
                               int64_t batch_size, int threads, Precision precision) {
  if (batch_size < 1) throw UsageError("--batch-size must be >= 1");
  check_threads(threads);
  keep_freed_memory();
  at::set_num_threads(resolve_threads(threads));
  TrainConfig cfg;
  EvalNetwork net = load_trained_network(checkpoint, &cfg);
  const std::string dir = !data_dir.empty() ? data_dir : !cfg.data_dir.empty() ? cfg.data_dir : default_data_dir(cfg.dataset);
  LoadOptions lo;
  lo.seed = cfg.seed;
  lo.image_size = cfg.image_size;
  lo.threads = at::get_num_threads();
  DatasetPair data = load_dataset(cfg.dataset, dir, lo);
  // Normalise with the training statistics, as during training.
  data.test.mean = data.train.mean;
  data.test.std = data.train.std;
  const torch::Device device = parse_device(cfg.device);
  net->to(device);
  BatchStream test(data.test, all_indices(data.test.size()), eval_stream_options(cfg, batch_size));
  return evaluate(net, test, device, precision);
}

// ------------------------------------------------------------------------------------------
// Training
// ------------------------------------------------------------------------------------------

namespace {

/// The best epoch so far (model selection on the validation split) as `best_epoch` and
/// `best_valid_top1`.
struct BestState : Stateful {
  int64_t epoch = 0;
  double valid_top1 = -1;
  void save(torch::serialize::OutputArchive& a) const override {
    write_int(a, "best_epoch", epoch);
    write_double(a, "best_valid_top1", valid_top1);
  }
  void load(torch::serialize::InputArchive& a) override {
    epoch = read_int(a, "best_epoch");
    valid_top1 = read_double(a, "best_valid_top1");
  }
};

/// The SGD state of a train checkpoint under `optimizer`. Checkpoints of earlier versions hold
/// LibTorch's own Optimizer::save form (no `num_params`), read with its loader.
struct TrainOptimizerState : Stateful {
  torch::optim::SGD& sgd;
  std::vector<torch::Tensor> params;
  TrainOptimizerState(torch::optim::SGD& s, std::vector<torch::Tensor> p) : sgd(s), params(std::move(p)) {}
  void save(torch::serialize::OutputArchive& a) const override {
    torch::serialize::OutputArchive o;
    save_optimizer_state(o, sgd, params);
    a.write("optimizer", o);
  }
  void load(torch::serialize::InputArchive& a) override {
    torch::serialize::InputArchive o;
    a.read("optimizer", o);
    c10::IValue n;
    if (o.try_read("num_params", n)) load_optimizer_state(o, sgd, params);
    else sgd.load(o);
  }
};

/// Running sums of one training epoch (in the checkpoint, so a mid-epoch resume reports the same).
struct TrainAccum {
  double loss_sum = 0, seconds = 0;
  int64_t correct = 0, seen = 0;
  NLOHMANN_DEFINE_TYPE_INTRUSIVE(TrainAccum, loss_sum, correct, seen, seconds)
};

/// Training a genotype's network (SPEC 3): set-up in the constructor, one SGD iteration in
/// step(), the epoch end (validation, selection, checkpoints) and the final test as named pieces.
class Trainer {
 public:
  Trainer(TrainConfig cfg, bool resume, const TrainCallbacks& cb);
  TrainResult run();

 private:
  void read_resumed_config();
  void load_data();
  void build();
  void init_from_file();
  void resume_from_checkpoint();
  void step(int64_t epoch, int64_t step);
  void end_epoch(int64_t epoch, double lr, double drop_prob);
  void save_checkpoint(int64_t epoch, int64_t step);
  [[noreturn]] void stop(int64_t epoch, int64_t step);
  TrainResult finish();
  void info(const std::string& s) const {
    if (cb_.info && writer_) cb_.info(s);
  }

  TrainConfig cfg_;
  const bool resume_;
  const TrainCallbacks& cb_;
  const Clock::time_point t_start_ = Clock::now();
  bool writer_ = true;
  std::unique_ptr<RunDirectory> dir_;
  std::vector<std::string> candidates_;
  Genotype genotype_;
  std::shared_ptr<Distributed> dist_;
  torch::Device device_{torch::kCPU};
  int threads_ = 1;

  DatasetPair data_;
  Dataset train_;
  std::vector<int64_t> t_idx_, v_idx_;
  int64_t in_channels_ = 0, classes_ = 0;
  EvalNetwork net_{nullptr};
  ModelProfile profile_;
  std::vector<torch::Tensor> params_;
  std::unique_ptr<torch::optim::SGD> sgd_;
  std::unique_ptr<BatchStream> train_stream_, valid_stream_;
  int64_t steps_per_epoch_ = 0;

  LoopPosition pos_;
  BestState best_;
  TrainAccum acc_;
  MetricsLog history_;
  std::unique_ptr<Checkpoint> ckpt_;

  Progress progress_{false};
  Clock::time_point t_epoch_ = Clock::now(), last_ckpt_ = Clock::now();
  int64_t first_step_ = 0;
  double seconds_before_ = 0;  // compute seconds of the current epoch before this process
};

Trainer::Trainer(TrainConfig cfg, bool resume, const TrainCallbacks& cb) : cfg_(std::move(cfg)), resume_(resume), cb_(cb) {
  keep_freed_memory();
  if (cfg_.out.empty()) throw UsageError("--out is required: the run directory to write");
  writer_ = dist_env_from_environment().rank == 0;
  dir_ = std::make_unique<RunDirectory>(cfg_.out, "train", writer_);
  if (resume_) read_resumed_config();
  const bool auxiliary = cfg_.auxiliary;
  genotype_ = cfg_.finalize();
  if (auxiliary && !cfg_.auxiliary) info("auxiliary head: off (a " + genotype_.space + " network has none)");
  // Data parallelism (docs/distributed.md): torchrun environment, rank 0 writes.
  dist_ = init_distributed_from_environment(cfg_.dist_timeout_s);
  device_ = rank_device(cfg_.device, dist_.get());
  threads_ = resolve_threads(cfg_.threads);
  at::set_num_threads(threads_);
  load_data();
  build();
}

/// Resume: the stored configuration defines the run being continued; the run directory, the
/// data workers and, when >= 0, the thread count come from the caller (the stored thread count
/// is kept otherwise: bitwise reproducibility needs the same one).
void Trainer::read_resumed_config() {
  const auto stored = dir_->open_for_resume("train", {dir_->file("checkpoint.pt")},
                                            "no checkpoint to resume in " + cfg_.out + " (start a new run without --resume)",
                                            candidates_);
  const std::string out = cfg_.out;
  const int threads = cfg_.threads, workers = cfg_.workers;
  cfg_ = TrainConfig::preset_defaults("paper");
  merge_stored_config(cfg_, stored.config, stored.file);
  cfg_.out = out;
  if (threads >= 0) cfg_.threads = threads;
  cfg_.workers = workers;
}

/// Data, validated before the run directory is touched. The validation split comes from the
/// training set; the test set is touched once, at the end.
void Trainer::load_data() {
  LoadOptions lo;
  lo.seed = cfg_.seed;
  lo.image_size = cfg_.image_size;
  lo.threads = threads_;
  if (cb_.progress) lo.progress = [this](const std::string& s) { info(s); };
  data_ = load_dataset(cfg_.dataset, cfg_.data_dir, lo);
  train_ = subset(data_.train, cfg_.subset, cfg_.seed);
  data_.test.mean = train_.mean;
  data_.test.std = train_.std;
  std::tie(t_idx_, v_idx_) = split_indices(train_.size(), 1.0 - cfg_.valid_portion, cfg_.seed);
  if (cfg_.valid_portion == 0.0) {
    t_idx_.insert(t_idx_.end(), v_idx_.begin(), v_idx_.end());
    v_idx_.clear();
  }
  if (t_idx_.size() < 2) throw UsageError("--subset/--valid-portion leave fewer than 2 training images");
  if (cfg_.valid_portion > 0 && v_idx_.empty()) throw UsageError("--valid-portion leaves no validation images");
  in_channels_ = train_.images.size(1);
  classes_ = train_.num_classes;
}

void Trainer::init_from_file() {
  StateDict sd = load_state_dict_file(cfg_.init_from);
  bool file_has_aux = false;
  for (const auto& kv : sd) file_has_aux |= kv.first.rfind("auxiliary_head.", 0) == 0;
  std::vector<std::string> ignore;
  if (file_has_aux && !cfg_.auxiliary) {
    for (const auto& kv : sd)
      if (kv.first.rfind("auxiliary_head.", 0) == 0) ignore.push_back(kv.first);
  } else if (!file_has_aux && cfg_.auxiliary) {
    // A file without an auxiliary head (trained with auxiliary=False): keep our fresh head.
    for (const auto& kv : module_state_dict(*net_))
      if (kv.first.rfind("auxiliary_head.", 0) == 0) sd.push_back(kv);
    info("init-from: " + cfg_.init_from + " has no auxiliary head; the head starts from scratch");
  }
  load_module_state(*net_, sd, cfg_.init_from, ignore);
  info("initialised the weights from " + cfg_.init_from);
}

void Trainer::build() {
  torch::manual_seed(cfg_.seed);
  net_ = build_network(cfg_, genotype_, in_channels_, classes_);
  profile_ = profile_network(net_, in_channels_, train_.images.size(2), train_.images.size(3));
  if (!cfg_.init_from.empty() && !resume_) init_from_file();
  net_->to(device_);
  params_ = net_->parameters();
  sgd_ = std::make_unique<torch::optim::SGD>(
      params_, torch::optim::SGDOptions(cfg_.lr).momentum(cfg_.momentum).weight_decay(cfg_.weight_decay));

  BatchStream::Options so;
  so.batch_size = cfg_.batch_size;
  so.shuffle = true;
  so.drop_last = false;
  so.augment.crop_padding = cfg_.crop_padding;
  so.augment.flip = cfg_.flip;
  so.augment.cutout = cfg_.cutout;
  so.augment.normalize = true;
  so.workers = cfg_.workers;
  so.prefetch = 2;
  so.seed = cfg_.seed * 2 + 1;
  so.rank = dist_ ? dist_->rank() : 0;  // each rank reads its slice of every global batch
  so.world = dist_ ? dist_->world() : 1;
  train_stream_ = std::make_unique<BatchStream>(train_, t_idx_, so);
  if (!v_idx_.empty()) valid_stream_ = std::make_unique<BatchStream>(train_, v_idx_, eval_stream_options(cfg_, kEvalBatch));
  steps_per_epoch_ = cfg_.max_steps > 0 ? std::min(cfg_.max_steps, train_stream_->batches_per_pass())
                                        : train_stream_->batches_per_pass();

  // Run directory: created and locked; a new run never overwrites one.
  if (!resume_) {
    if (dir_->exists()) dir_->lock();
    if (fs::exists(dir_->file("checkpoint.pt")) || !dir_->latest_checkpoint().empty())
      throw UsageError("run directory " + cfg_.out + " already holds a training run: pass --resume to continue it or choose another --out");
    dir_->create_and_lock();
    // A resumed run's config.json is rewritten only once its checkpoint has loaded.
    dir_->write("config.json", cfg_.to_json().dump(2) + "\n");
  }

  pos_.world = so.world;
  pos_.steps_per_epoch = steps_per_epoch_;
  ckpt_ = std::make_unique<Checkpoint>("train", [this] { return cfg_.to_json(); });
  ckpt_->add_int("in_channels", [this] { return in_channels_; })
      .add_int("num_classes", [this] { return classes_; })
      .add(std::make_unique<ModuleState>(*net_, "model"))
      .add(std::make_unique<TrainOptimizerState>(*sgd_, params_))
      .add(pos_)
      .add(best_)
      .add(std::make_unique<StreamState>(*train_stream_, "train", so.world))
      .add(std::make_unique<RngState>())
      .add(std::make_unique<JsonState>("epoch_accum", [this] { return json(acc_); },
                                       [this](const json& j) { acc_ = j.get<TrainAccum>(); }, /*optional=*/true))
      .add(history_.state());
  if (resume_) resume_from_checkpoint();
  {
    std::ostringstream o;
    o << "train: " << cfg_.preset << " preset, " << cfg_.dataset << " (" << t_idx_.size() << " train / " << v_idx_.size()
      << " validation / " << data_.test.size() << " test images), " << cfg_.layers << " cells x " << cfg_.channels
      << " channels, " << profile_.params << " parameters, " << profile_.macs << " MACs/image, " << cfg_.epochs
      << " epochs x " << steps_per_epoch_ << " steps, " << threads_ << " threads, " << device_.str();
    info(o.str());
  }
  if (dist_) dist_->broadcast_module(*net_);  // identical start on every rank
}

void Trainer::resume_from_checkpoint() {
  const std::string from = load_newest(candidates_, [&](const std::string& p) { ckpt_->load(p); },
                                       [this](const std::string& s) { info(s); }, "");
  dir_->write("config.json", cfg_.to_json().dump(2) + "\n");
  info("resuming " + cfg_.out + " from " + fs::path(from).filename().string() + " (epoch " + std::to_string(pos_.epoch + 1) +
       ", step " + std::to_string(pos_.step) + ")");
}

TrainResult Trainer::run() {
  progress_ = Progress(cb_.progress && writer_);
  last_ckpt_ = Clock::now();
  for (int64_t epoch = pos_.epoch; epoch < cfg_.epochs; ++epoch) {
    const double lr = cosine_lr(cfg_.lr, cfg_.lr_min, epoch, cfg_.epochs);
    for (auto& g : sgd_->param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
    const double drop_prob = cfg_.drop_path_prob * static_cast<double>(epoch) / static_cast<double>(cfg_.epochs);
    net_->set_drop_path_prob(drop_prob);
    net_->train();
    first_step_ = epoch == pos_.epoch ? pos_.step : 0;
    if (first_step_ == 0) acc_ = TrainAccum{};
    t_epoch_ = Clock::now();
    seconds_before_ = acc_.seconds;
    for (int64_t s = first_step_; s < steps_per_epoch_; ++s) step(epoch, s);
    progress_.finish();
    end_epoch(epoch, lr, drop_prob);
    // A single process stops at the epoch end it just checkpointed; data-parallel ranks decide
    // together at the next step's all-reduce (a local flag could differ between ranks here).
    if (!dist_ && stop_requested() && epoch + 1 < cfg_.epochs) stop(epoch + 1, 0);
  }
  return finish();
}

/// One training iteration (SPEC 3): forward with the auxiliary head, loss, backward (gradients
/// averaged over ranks), clip, SGD step.
void Trainer::step(int64_t epoch, int64_t step) {
  Batch b = train_stream_->next();
  auto x = b.x.to(device_);
  auto y = b.y.to(device_);
  // Gradients start undefined (not zeroed): the first accumulation then takes the backward's
  // tensor as it is, with no zero fill and no add (every weight gets a gradient each step).
  for (auto& p : params_) p.mutable_grad().reset();
  auto outp = net_->forward(x);
  auto loss = torch::nn::functional::cross_entropy(outp.logits, y);
  if (outp.aux_logits.defined())
    loss = loss + cfg_.auxiliary_weight * torch::nn::functional::cross_entropy(outp.aux_logits, y);
  double lv = loss.item<double>();
  int64_t b_correct = outp.logits.argmax(1).eq(y).sum().item<int64_t>(), b_seen = y.size(0);
  bool stop_now = stop_requested();
  if (dist_) {
    // Every rank joins the backward and the all-reduces (none waits forever); the step's loss,
    // counts and stop requests over all ranks decide together whether to stop.
    loss.backward();
    reduce_param_grads(params_, dist_->mean_reducer());
    std::vector<torch::Tensor> st{torch::tensor({lv * b_seen, static_cast<double>(b_correct), static_cast<double>(b_seen),
                                                 stop_now ? 1.0 : 0.0}, torch::kDouble)};
    dist_->allreduce_sum(st);
    b_seen = static_cast<int64_t>(st[0][2].item<double>());
    b_correct = static_cast<int64_t>(st[0][1].item<double>());
    lv = st[0][0].item<double>() / b_seen;
    stop_now = st[0][3].item<double>() > 0;
  }
  if (!std::isfinite(lv)) {
    progress_.finish();
    const std::string last = dir_->latest_checkpoint();
    throw DivergedError("loss became " + std::string(std::isnan(lv) ? "NaN" : "Inf") + " at epoch " +
                        std::to_string(epoch + 1) + " step " + std::to_string(step + 1) + "; last good checkpoint: " +
                        (last.empty() ? std::string("none") : last) + " (lower --lr)");
  }
  if (!dist_) loss.backward();
  clip_and_sgd_step(*sgd_, params_, cfg_.grad_clip);  // clip_grad_norm_ + SGD::step (optim.h)
  acc_.loss_sum += lv * b_seen;
  acc_.correct += b_correct;
  acc_.seen += b_seen;

  const double per_step = seconds_since(t_epoch_) / static_cast<double>(step + 1 - first_step_);
  char body[128];
  std::snprintf(body, sizeof body, "loss %.4f  acc %.1f%%  %.0f img/s", acc_.loss_sum / acc_.seen,
                100.0 * acc_.correct / acc_.seen, b_seen / std::max(1e-9, per_step));
  progress_.update(progress_line(epoch + 1, cfg_.epochs, step + 1, steps_per_epoch_, body,
                                 per_step * static_cast<double>((cfg_.epochs - epoch) * steps_per_epoch_ - step - 1)));
  if (stop_now) stop(epoch, step + 1);
  if (cfg_.checkpoint_every_min > 0 && step + 1 < steps_per_epoch_ &&
      seconds_since(last_ckpt_) >= cfg_.checkpoint_every_min * 60.0)
    save_checkpoint(epoch, step + 1);
}

/// Epoch end: validation (rank 0), model selection, metrics, checkpoint.pt and best.pt.
void Trainer::end_epoch(int64_t epoch, double lr, double drop_prob) {
  const double train_seconds = seconds_before_ + seconds_since(t_epoch_);
  json m = {{"epoch", epoch + 1}, {"lr", lr}, {"drop_path_prob", drop_prob},
            {"train_loss", acc_.loss_sum / acc_.seen}, {"train_top1", 100.0 * acc_.correct / acc_.seen},
            {"train_seconds", train_seconds}};
  if (!writer_) {  // rank 0 validates, selects and writes
    pos_.epoch = epoch + 1;
    pos_.step = 0;
    return;
  }
  bool improved = true;  // no validation split: the last epoch is the selected model
  if (valid_stream_) {
    const EvalResult v = evaluate(net_, *valid_stream_, device_);
    m["valid_loss"] = v.loss;
    m["valid_top1"] = v.top1;
    m["valid_top5"] = v.top5;
    improved = v.top1 > best_.valid_top1;
  }
  m["seconds"] = seconds_before_ + seconds_since(t_epoch_);
  if (improved) {
    best_.valid_top1 = valid_stream_ ? m["valid_top1"].get<double>() : -1.0;
    best_.epoch = epoch + 1;
  }
  history_.epochs.push_back(m);
  dir_->write("metrics.jsonl", history_.jsonl());
  acc_ = TrainAccum{};
  save_checkpoint(epoch + 1, 0);
  const std::string latest = dir_->latest_checkpoint();
  dir_->publish(latest, "checkpoint.pt");
  if (improved) dir_->publish(latest, "best.pt");
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(2);
  o << "epoch " << epoch + 1 << "/" << cfg_.epochs << "  lr " << std::setprecision(4) << lr << std::setprecision(2)
    << "  train loss " << m["train_loss"].get<double>() << " top1 " << m["train_top1"].get<double>() << "%";
  if (valid_stream_) o << "  valid top1 " << m["valid_top1"].get<double>() << "%" << (improved ? " (best)" : "");
  o << "  " << format_duration(m["seconds"].get<double>());
  info(o.str());
  if (cb_.on_epoch) cb_.on_epoch(m);
}

void Trainer::save_checkpoint(int64_t epoch, int64_t step) {
  acc_.seconds = step == 0 ? 0.0 : seconds_before_ + seconds_since(t_epoch_);
  pos_.epoch = epoch;
  pos_.step = step;
  dir_->save_checkpoint(*ckpt_, epoch, step, cfg_.keep_checkpoints);
  last_ckpt_ = Clock::now();
}

void Trainer::stop(int64_t epoch, int64_t step) {
  progress_.finish();
  if (step > 0) save_checkpoint(epoch, step);
  throw StoppedError(stop_message("train", cfg_.out, epoch, step));
}

/// The selected model on the test set, once; result.json and summary.txt.
TrainResult Trainer::finish() {
  TrainResult result;
  if (!writer_) return result;
  result.genotype = genotype_;
  result.profile = profile_;
  result.epochs_done = cfg_.epochs;
  result.best_epoch = best_.epoch;
  result.best_valid_top1 = best_.valid_top1;
  const std::string best_path = dir_->file("best.pt");
  {
    torch::serialize::InputArchive a, m;
    open_checkpoint(best_path, "train", a);
    a.read("model", m);
    net_->load(m);
  }
  BatchStream test_stream(data_.test, all_indices(data_.test.size()), eval_stream_options(cfg_, kEvalBatch));
  result.test = evaluate(net_, test_stream, device_);
  result.seconds = seconds_since(t_start_);
  const double total_seconds = history_.sum("seconds");

  json r = {{"genotype", genotype_to_json(genotype_)},
            {"params", profile_.params},
            {"macs", profile_.macs},
            {"epochs", cfg_.epochs},
            {"best_epoch", best_.epoch},
            {"best_valid_top1", best_.valid_top1},
            {"test_top1", result.test.top1},
            {"test_top5", result.test.top5},
            {"test_loss", result.test.loss},
            {"test_images", result.test.images},
            {"train_seconds", total_seconds}};
  dir_->write("result.json", r.dump(2) + "\n");
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(2);
  s << "noisydarts training finished\n"
    << "  run directory   " << cfg_.out << "\n"
    << "  genotype        " << genotype_to_text(genotype_) << "\n"
    << "  network         " << cfg_.network << ", " << cfg_.layers << " cells x " << cfg_.channels << " channels, "
    << profile_.params << " parameters (auxiliary head excluded), " << profile_.macs << " MACs/image\n"
    << "  data            " << cfg_.dataset << ": " << t_idx_.size() << " train, " << v_idx_.size() << " validation, "
    << result.test.images << " test images\n"
    << "  selected model  epoch " << best_.epoch << "/" << cfg_.epochs;
  if (best_.valid_top1 >= 0) s << " (validation top-1 " << best_.valid_top1 << "%)";
  else s << " (no validation split: last epoch)";
  s << "\n  test            top-1 " << result.test.top1 << "%  top-5 " << result.test.top5 << "%  loss "
    << std::setprecision(4) << result.test.loss << "\n"
    << "  training time   " << format_duration(total_seconds) << "\n"
    << "  files           config.json metrics.jsonl checkpoint.pt best.pt checkpoints/ result.json summary.txt\n";
  dir_->write("summary.txt", s.str());
  info(s.str());
  return result;
}

}  // namespace

TrainResult run_train(TrainConfig cfg, bool resume, const TrainCallbacks& cb) {
  Trainer trainer(std::move(cfg), resume, cb);
  return trainer.run();
}

}  // namespace noisydarts
