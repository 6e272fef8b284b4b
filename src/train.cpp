#include "noisydarts/train.h"

#include <malloc.h>
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
#include "noisydarts/distributed.h"
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
}

template <class T>
bool json_has_type(const json& v) {
  if constexpr (std::is_same_v<T, bool>) return v.is_boolean();
  else if constexpr (std::is_same_v<T, std::string>) return v.is_string();
  else if constexpr (std::is_integral_v<T>) return v.is_number_integer() && (std::is_signed_v<T> || v.get<int64_t>() >= 0);
  else return v.is_number();
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
    using T = std::decay_t<decltype(field)>;
    const json& v = j.at(key);
    if (!json_has_type<T>(v)) throw ConfigError(where + ": key '" + key + "' has the wrong type (" + v.dump() + ")");
    field = v.get<T>();
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
  check(lr > 0 && lr_min >= 0 && lr_min <= lr, "--lr must be > 0 and 0 <= --lr-min <= --lr");
  check(momentum >= 0 && momentum < 1, "--momentum must be in [0, 1)");
  check(weight_decay >= 0, "--weight-decay must be >= 0");
  check(grad_clip > 0, "--grad-clip must be > 0");
  check(auxiliary_weight >= 0, "--auxiliary-weight must be >= 0");
  check(drop_path_prob >= 0 && drop_path_prob < 1, "--drop-path must be in [0, 1), got " + std::to_string(drop_path_prob));
  check(network == "cifar" || network == "imagenet", "--network must be cifar or imagenet, got '" + network + "'");
}

// ------------------------------------------------------------------------------------------
// Evaluation
// ------------------------------------------------------------------------------------------

EvalResult evaluate(EvalNetwork& net, BatchStream& stream, torch::Device device) {
  torch::NoGradGuard no_grad;
  const bool was_training = net->is_training();
  net->eval();
  EvalResult r;
  int64_t c1 = 0, c5 = 0;
  double loss = 0;
  for (int64_t b = 0; b < stream.batches_per_pass(); ++b) {
    Batch batch = stream.next();
    auto x = batch.x.to(device);
    auto y = batch.y.to(device);
    auto logits = net->forward(x).logits;
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
  {
    const auto stored = read_checkpoint_config(checkpoint, "train");
    try {
      cfg.merge_json(stored, checkpoint);
    } catch (const ConfigError& e) {  // a config this build cannot read: an incompatible checkpoint
      throw CheckpointError(std::string(e.what()) + " (checkpoint of another noisydarts version?)");
    }
  }
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
                               int64_t batch_size, int threads) {
  if (batch_size < 1) throw UsageError("--batch-size must be >= 1");
  check_threads(threads);
  keep_freed_memory();
  at::set_num_threads(threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
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
  return evaluate(net, test, device);
}

// ------------------------------------------------------------------------------------------
// Training
// ------------------------------------------------------------------------------------------

TrainResult run_train(TrainConfig cfg, bool resume, const TrainCallbacks& cb) {
  bool writer = true;  // only rank 0 of a data-parallel run prints and writes
  auto info = [&](const std::string& s) {
    if (cb.info && writer) cb.info(s);
  };
  const auto t_start = Clock::now();
  keep_freed_memory();
  if (cfg.out.empty()) throw UsageError("--out is required: the run directory to write");
  const fs::path out(cfg.out);
  const std::string ckpt_path = (out / "checkpoint.pt").string();
  const std::string best_path = (out / "best.pt").string();

  // ---- Resume: the stored configuration defines the run being continued.
  if (resume) {
    if (!fs::exists(ckpt_path))
      throw CheckpointError("no checkpoint to resume in " + ckpt_path + " (start a new run without --resume)");
    const std::string o = cfg.out;
    const int threads = cfg.threads, workers = cfg.workers;
    cfg = TrainConfig::preset_defaults("paper");
    {
      const auto stored = read_checkpoint_config(ckpt_path, "train");
      try {
        cfg.merge_json(stored, ckpt_path);
      } catch (const ConfigError& e) {  // a config this build cannot read: an incompatible checkpoint
        throw CheckpointError(std::string(e.what()) + " (checkpoint of another noisydarts version?)");
      }
    }
    cfg.out = o;
    cfg.threads = threads;
    cfg.workers = workers;
  }
  cfg.validate();
  const Genotype genotype = resolve_genotype(cfg.genotype);
  cfg.genotype = genotype_to_text(genotype);  // config.json holds the resolved cell
  if (cfg.data_dir.empty()) cfg.data_dir = default_data_dir(cfg.dataset);
  // Data parallelism (docs/distributed.md): torchrun environment, rank 0 writes.
  const auto dist = init_distributed_from_environment(cfg.dist_timeout_s);
  writer = !dist || dist->rank() == 0;
  if (genotype.space != "darts" && cfg.auxiliary) {
    // Only networks of DARTS cells have an auxiliary head (SPEC 3); recorded in config.json.
    cfg.auxiliary = false;
    info("auxiliary head: off (a " + genotype.space + " network has none)");
  }
  torch::Device device = parse_device(cfg.device);
  if (dist && device.is_cuda() && !device.has_index()) device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(dist->local_rank()));
  const int threads = cfg.threads > 0 ? cfg.threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);

  // ---- Data, validated before the run directory is touched. The validation split comes from
  // the training set; the test set is touched once, at the end.
  LoadOptions lo;
  lo.seed = cfg.seed;
  lo.image_size = cfg.image_size;
  lo.threads = threads;
  if (cb.progress) lo.progress = info;
  DatasetPair data = load_dataset(cfg.dataset, cfg.data_dir, lo);
  Dataset train = subset(data.train, cfg.subset, cfg.seed);
  data.test.mean = train.mean;
  data.test.std = train.std;
  auto [t_idx, v_idx] = split_indices(train.size(), 1.0 - cfg.valid_portion, cfg.seed);
  if (cfg.valid_portion == 0.0) {
    t_idx.insert(t_idx.end(), v_idx.begin(), v_idx.end());
    v_idx.clear();
  }
  if (t_idx.size() < 2) throw UsageError("--subset/--valid-portion leave fewer than 2 training images");
  if (cfg.valid_portion > 0 && v_idx.empty()) throw UsageError("--valid-portion leaves no validation images");
  const int64_t in_channels = train.images.size(1), classes = train.num_classes;

  // ---- Network and optimiser.
  torch::manual_seed(cfg.seed);
  EvalNetwork net = build_network(cfg, genotype, in_channels, classes);
  const ModelProfile profile = profile_network(net, in_channels, train.images.size(2), train.images.size(3));
  if (!cfg.init_from.empty() && !resume) {
    StateDict sd = load_state_dict_file(cfg.init_from);
    bool file_has_aux = false;
    for (const auto& kv : sd) file_has_aux |= kv.first.rfind("auxiliary_head.", 0) == 0;
    std::vector<std::string> ignore;
    if (file_has_aux && !cfg.auxiliary) {
      for (const auto& kv : sd)
        if (kv.first.rfind("auxiliary_head.", 0) == 0) ignore.push_back(kv.first);
    } else if (!file_has_aux && cfg.auxiliary) {
      // A file without an auxiliary head (trained with auxiliary=False): keep our fresh head.
      for (const auto& kv : module_state_dict(*net))
        if (kv.first.rfind("auxiliary_head.", 0) == 0) sd.push_back(kv);
      info("init-from: " + cfg.init_from + " has no auxiliary head; the head starts from scratch");
    }
    load_module_state(*net, sd, cfg.init_from, ignore);
    info("initialised the weights from " + cfg.init_from);
  }
  net->to(device);
  auto params = net->parameters();
  torch::optim::SGD sgd(params, torch::optim::SGDOptions(cfg.lr).momentum(cfg.momentum).weight_decay(cfg.weight_decay));

  BatchStream::Options so;
  so.batch_size = cfg.batch_size;
  so.shuffle = true;
  so.drop_last = false;
  so.augment.crop_padding = cfg.crop_padding;
  so.augment.flip = cfg.flip;
  so.augment.cutout = cfg.cutout;
  so.augment.normalize = true;
  so.workers = cfg.workers;
  so.prefetch = 2;
  so.seed = cfg.seed * 2 + 1;
  so.rank = dist ? dist->rank() : 0;  // each rank reads its slice of every global batch
  so.world = dist ? dist->world() : 1;
  BatchStream train_stream(train, t_idx, so);
  std::unique_ptr<BatchStream> valid_stream;
  if (!v_idx.empty()) valid_stream = std::make_unique<BatchStream>(train, v_idx, eval_stream_options(cfg, kEvalBatch));
  const int64_t steps_per_epoch = cfg.max_steps > 0 ? std::min(cfg.max_steps, train_stream.batches_per_pass())
                                                    : train_stream.batches_per_pass();

  // ---- Run directory.
  std::error_code ec;
  if (!resume && fs::exists(ckpt_path))
    throw UsageError("run directory " + cfg.out + " already holds a training run: pass --resume to continue it or choose another --out");
  if (writer) {
    fs::create_directories(out, ec);
    if (ec) throw IoError("cannot create run directory " + cfg.out + ": " + ec.message());
    // A resumed run's config.json is rewritten only once its checkpoint has loaded.
    if (!resume) write_file_atomic((out / "config.json").string(), cfg.to_json().dump(2) + "\n");
  }

  int64_t start_epoch = 0, best_epoch = 0;
  double best_valid = -1;
  std::vector<json> history;
  if (resume) {
    torch::serialize::InputArchive a;
    open_checkpoint(ckpt_path, "train", a);
    try {
      torch::serialize::InputArchive m, os;
      a.read("model", m);
      net->load(m);
      a.read("optimizer", os);
      sgd.load(os);
      start_epoch = read_int(a, "epoch");
      best_epoch = read_int(a, "best_epoch");
      best_valid = read_double(a, "best_valid_top1");
      train_stream.seek({read_int(a, "train_pass"), read_int(a, "train_batch")});
      torch::Tensor rng;
      a.read("rng_cpu", rng);
      set_cpu_rng_state(rng);
      for (auto& j : json::parse(read_string(a, "metrics"))) history.push_back(j);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw CheckpointError("checkpoint " + ckpt_path + " does not match this network: " + std::string(e.what()).substr(0, 200));
    }
    if (writer) write_file_atomic((out / "config.json").string(), cfg.to_json().dump(2) + "\n");
    info("resuming " + cfg.out + " after epoch " + std::to_string(start_epoch));
  }
  {
    std::ostringstream o;
    o << "train: " << cfg.preset << " preset, " << cfg.dataset << " (" << t_idx.size() << " train / " << v_idx.size()
      << " validation / " << data.test.size() << " test images), " << cfg.layers << " cells x " << cfg.channels
      << " channels, " << profile.params << " parameters, " << profile.macs << " MACs/image, " << cfg.epochs
      << " epochs x " << steps_per_epoch << " steps, " << threads << " threads, " << device.str();
    info(o.str());
  }

  if (dist) dist->broadcast_module(*net);  // identical start on every rank

  auto save_checkpoint = [&](int64_t epoch, const std::string& path) {
    if (!writer) return;
    torch::serialize::OutputArchive a;
    write_int(a, "format_version", kCheckpointFormatVersion);
    write_string(a, "kind", "train");
    write_string(a, "config", cfg.to_json().dump());
    write_int(a, "in_channels", in_channels);
    write_int(a, "num_classes", classes);
    torch::serialize::OutputArchive m, os;
    net->save(m);
    a.write("model", m);
    sgd.save(os);
    a.write("optimizer", os);
    write_int(a, "epoch", epoch);
    write_int(a, "best_epoch", best_epoch);
    write_double(a, "best_valid_top1", best_valid);
    write_int(a, "train_pass", train_stream.position().pass);
    write_int(a, "train_batch", train_stream.position().batch);
    a.write("rng_cpu", get_cpu_rng_state());
    write_string(a, "metrics", json(history).dump());
    save_archive_atomic(a, path);
  };

  const bool tty = ::isatty(2) != 0;
  auto last_progress = Clock::now() - std::chrono::hours(1);
  for (int64_t epoch = start_epoch; epoch < cfg.epochs; ++epoch) {
    const double lr = cosine_lr(cfg.lr, cfg.lr_min, epoch, cfg.epochs);
    for (auto& g : sgd.param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
    const double drop_prob = cfg.drop_path_prob * static_cast<double>(epoch) / static_cast<double>(cfg.epochs);
    net->set_drop_path_prob(drop_prob);
    net->train();
    const auto t_epoch = Clock::now();
    double loss_sum = 0;
    int64_t correct = 0, seen = 0;
    for (int64_t step = 0; step < steps_per_epoch; ++step) {
      Batch b = train_stream.next();
      auto x = b.x.to(device);
      auto y = b.y.to(device);
      sgd.zero_grad();
      auto outp = net->forward(x);
      auto loss = torch::nn::functional::cross_entropy(outp.logits, y);
      if (outp.aux_logits.defined())
        loss = loss + cfg.auxiliary_weight * torch::nn::functional::cross_entropy(outp.aux_logits, y);
      double lv = loss.item<double>();
      int64_t b_correct = outp.logits.argmax(1).eq(y).sum().item<int64_t>(), b_seen = y.size(0);
      if (dist) {
        // Every rank joins the backward and the all-reduces (none waits forever); the step's
        // loss and counts over all ranks decide together whether to stop.
        loss.backward();
        reduce_param_grads(params, dist->mean_reducer());
        std::vector<torch::Tensor> st{torch::tensor({lv * b_seen, static_cast<double>(b_correct), static_cast<double>(b_seen)}, torch::kDouble)};
        dist->allreduce_sum(st);
        b_seen = static_cast<int64_t>(st[0][2].item<double>());
        b_correct = static_cast<int64_t>(st[0][1].item<double>());
        lv = st[0][0].item<double>() / b_seen;
      }
      if (!std::isfinite(lv))
        throw DivergedError("loss became " + std::string(std::isnan(lv) ? "NaN" : "Inf") + " at epoch " +
                            std::to_string(epoch + 1) + " step " + std::to_string(step + 1) + "; last good checkpoint: " +
                            (fs::exists(ckpt_path) ? ckpt_path : std::string("none")) + " (lower --lr)");
      if (!dist) loss.backward();
      torch::nn::utils::clip_grad_norm_(params, cfg.grad_clip);
      sgd.step();
      loss_sum += lv * b_seen;
      correct += b_correct;
      seen += b_seen;
      if (cb.progress && writer && seconds_since(last_progress) >= (tty ? 0.5 : 15.0)) {
        last_progress = Clock::now();
        const double per_step = seconds_since(t_epoch) / static_cast<double>(step + 1);
        const double left = per_step * static_cast<double>((cfg.epochs - epoch) * steps_per_epoch - step - 1);
        char line[256];
        std::snprintf(line, sizeof line, "epoch %lld/%lld step %lld/%lld  loss %.4f  acc %.1f%%  %.0f img/s  ETA %s",
                      static_cast<long long>(epoch + 1), static_cast<long long>(cfg.epochs),
                      static_cast<long long>(step + 1), static_cast<long long>(steps_per_epoch), loss_sum / seen,
                      100.0 * correct / seen, seen / std::max(1e-9, seconds_since(t_epoch)), format_duration(left).c_str());
        std::fprintf(stderr, tty ? "\r\033[K%s" : "%s\n", line);
        std::fflush(stderr);
      }
    }
    if (cb.progress && tty) std::fprintf(stderr, "\r\033[K");
    const double train_seconds = seconds_since(t_epoch);
    json m = {{"epoch", epoch + 1}, {"lr", lr}, {"drop_path_prob", drop_prob},
              {"train_loss", loss_sum / seen}, {"train_top1", 100.0 * correct / seen},
              {"train_seconds", train_seconds}};
    bool improved = false;
    if (!writer) continue;  // rank 0 validates, selects and writes
    if (valid_stream) {
      const EvalResult v = evaluate(net, *valid_stream, device);
      m["valid_loss"] = v.loss;
      m["valid_top1"] = v.top1;
      m["valid_top5"] = v.top5;
      improved = v.top1 > best_valid;
    } else {
      improved = true;  // no validation split: the last epoch is the selected model
    }
    m["seconds"] = seconds_since(t_epoch);
    if (improved) {
      best_valid = valid_stream ? m["valid_top1"].get<double>() : -1.0;
      best_epoch = epoch + 1;
    }
    history.push_back(m);
    std::string lines;
    for (const auto& h : history) lines += h.dump() + "\n";
    write_file_atomic((out / "metrics.jsonl").string(), lines);
    save_checkpoint(epoch + 1, ckpt_path);
    if (improved) save_checkpoint(epoch + 1, best_path);
    {
      std::ostringstream o;
      o.setf(std::ios::fixed);
      o.precision(2);
      o << "epoch " << epoch + 1 << "/" << cfg.epochs << "  lr " << std::setprecision(4) << lr << std::setprecision(2)
        << "  train loss " << m["train_loss"].get<double>() << " top1 " << m["train_top1"].get<double>() << "%";
      if (valid_stream) o << "  valid top1 " << m["valid_top1"].get<double>() << "%" << (improved ? " (best)" : "");
      o << "  " << format_duration(m["seconds"].get<double>());
      info(o.str());
    }
  }

  // ---- The selected model on the test set, once.
  TrainResult result;
  if (!writer) return result;
  result.genotype = genotype;
  result.profile = profile;
  result.epochs_done = cfg.epochs;
  result.best_epoch = best_epoch;
  result.best_valid_top1 = best_valid;
  {
    torch::serialize::InputArchive a, m;
    open_checkpoint(best_path, "train", a);
    a.read("model", m);
    net->load(m);
  }
  BatchStream test_stream(data.test, all_indices(data.test.size()), eval_stream_options(cfg, kEvalBatch));
  result.test = evaluate(net, test_stream, device);
  result.seconds = seconds_since(t_start);
  double total_seconds = 0;
  for (const auto& h : history) total_seconds += h.value("seconds", 0.0);

  json r = {{"genotype", genotype_to_json(genotype)},
            {"params", profile.params},
            {"macs", profile.macs},
            {"epochs", cfg.epochs},
            {"best_epoch", best_epoch},
            {"best_valid_top1", best_valid},
            {"test_top1", result.test.top1},
            {"test_top5", result.test.top5},
            {"test_loss", result.test.loss},
            {"test_images", result.test.images},
            {"train_seconds", total_seconds}};
  write_file_atomic((out / "result.json").string(), r.dump(2) + "\n");
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(2);
  s << "noisydarts training finished\n"
    << "  run directory   " << cfg.out << "\n"
    << "  genotype        " << genotype_to_text(genotype) << "\n"
    << "  network         " << cfg.network << ", " << cfg.layers << " cells x " << cfg.channels << " channels, "
    << profile.params << " parameters (auxiliary head excluded), " << profile.macs << " MACs/image\n"
    << "  data            " << cfg.dataset << ": " << t_idx.size() << " train, " << v_idx.size() << " validation, "
    << result.test.images << " test images\n"
    << "  selected model  epoch " << best_epoch << "/" << cfg.epochs;
  if (best_valid >= 0) s << " (validation top-1 " << best_valid << "%)";
  else s << " (no validation split: last epoch)";
  s << "\n  test            top-1 " << result.test.top1 << "%  top-5 " << result.test.top5 << "%  loss "
    << std::setprecision(4) << result.test.loss << "\n"
    << "  training time   " << format_duration(total_seconds) << "\n"
    << "  files           config.json metrics.jsonl checkpoint.pt best.pt result.json summary.txt\n";
  write_file_atomic((out / "summary.txt").string(), s.str());
  info(s.str());
  return result;
}

}  // namespace noisydarts
