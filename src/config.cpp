#include "noisydarts/config.h"

#include <fstream>
#include <limits>
#include <sstream>
#include <thread>

#include "noisydarts/error.h"
#include "noisydarts/method.h"
#include "noisydarts/ops.h"
#include "noisydarts/runtime.h"
#include "noisydarts/spaces.h"

namespace noisydarts {
using nlohmann::json;

SearchConfig SearchConfig::preset_defaults(const std::string& preset, const std::string& scale) {
  SearchConfig c;
  c.preset = preset;
  c.scale = scale;
  // DARTS' recipe (quark0/darts train_search.py), the base of every method's preset; each
  // method's own changes from its authors' search script (docs/methods.md).
  c.primitives = darts_primitives();
  c.noise.type = NoiseType::kNone;
  c.noise.skip_drop_path = 0.0;
  c.batch_size = 64;
  c.lr = 0.025;
  if (preset == "noisydarts") {
    c.primitives = noisydarts_primitives();
    c.noise = NoiseOptions{};  // gaussian additive relative, lambda 0.2, mu 0
    c.noise.skip_drop_path = 0.3;
    c.batch_size = 128;
    c.lr = 0.05;
  } else if (preset == "darts" || preset == "darts-minus" || preset == "beta-darts") {
  } else if (preset == "fair-darts") {
    c.primitives = noisydarts_primitives();  // no `none`: sigmoid weights need no zero op
    c.batch_size = 128;
    c.lr = 0.005;
    c.arch_lr = 3e-3;
    c.arch_beta1 = 0.9;
    c.alpha_init_std = 0;  // alphas start at 0: every sigmoid at 0.5
  } else if (preset == "pc-darts") {
    c.batch_size = 256;
    c.lr = 0.1;
    c.lr_min = 0.0;
    c.arch_lr = 6e-4;
    c.arch_warmup = 0.3;  // alpha updates from epoch 15 of 50
  } else if (preset == "sdarts-rs" || preset == "sdarts-adv") {
    c.primitives = noisydarts_primitives();  // SmoothDARTS' DARTS space has no `none`
  } else if (preset == "gdas") {
    c.batch_size = 256;
    c.weight_decay = 5e-4;
  } else if (preset == "drnas") {
    c.primitives = noisydarts_primitives();
    c.lr = 0.1;
    c.lr_min = 0.0;
    c.arch_lr = 6e-4;
  } else if (preset == "rdarts-l2") {
    c.weight_decay = 81e-4;  // 27x DARTS' 3e-4: the rung of RobustDARTS' L2 ladder commonly reported
  } else {
    throw UsageError("--preset/--method must be one of " + join_names(method_names()) + ", got '" + preset + "'");
  }
  c.augment.crop_padding = 4;
  c.augment.flip = true;
  if (scale == "small") {
    // Sized so that `noisydarts search` completes on Fashion-MNIST in about 7 minutes on 2
    // cores and ends in a decided cell (docs/search.md has the measurements): 5 cells of 8
    // channels, 1000 images (500 per half), 10 epochs of 16 steps of batch 32 = 160
    // architecture steps. A compressed schedule: the architecture learning rate is 100x the
    // paper's 3e-4 (Adam), so that 160 steps decide the cell (at 3e-4 every kept op won by less
    // than 0.1/K). The weight optimiser stays the preset's.
    c.channels = 8;
    c.layers = 5;
    c.epochs = 10;
    c.subset = 1000;
    c.batch_size = 32;
    c.arch_lr = 3e-2;
  } else if (scale != "paper") {
    throw UsageError("--scale must be small or paper, got '" + scale + "'");
  }
  return c;
}

json SearchConfig::to_json() const {
  const MethodSettings& ms = method_settings;
  return json{{"preset", preset},
              {"method", method},
              {"scale", scale},
              {"out", out},
              {"dataset", dataset},
              {"data_dir", data_dir},
              {"subset", subset},
              {"image_size", image_size},
              {"train_portion", train_portion},
              {"batch_size", batch_size},
              {"augment",
               {{"crop_padding", augment.crop_padding},
                {"flip", augment.flip},
                {"cutout", augment.cutout},
                {"normalize", augment.normalize}}},
              {"workers", workers},
              {"space", space},
              {"se_ratio", se_ratio},
              {"swish", swish},
              {"channels", channels},
              {"layers", layers},
              {"steps", steps},
              {"multiplier", multiplier},
              {"primitives", primitives},
              {"alpha_init_std", alpha_init_std},
              {"noise", noise_to_json(noise)},
              {"epochs", epochs},
              {"lr", lr},
              {"lr_min", lr_min},
              {"momentum", momentum},
              {"weight_decay", weight_decay},
              {"grad_clip", grad_clip},
              {"arch_lr", arch_lr},
              {"arch_beta1", arch_beta1},
              {"arch_beta2", arch_beta2},
              {"arch_weight_decay", arch_weight_decay},
              {"order", order},
              {"unrolled_xi", unrolled_xi},
              {"arch_warmup", arch_warmup},
              {"method_settings",
               {{"fair_darts", {{"zero_one_weight", ms.fair_darts.zero_one_weight}, {"threshold", ms.fair_darts.threshold}}},
                {"pc_darts", {{"k", ms.pc_darts.k}, {"edge_norm", ms.pc_darts.edge_norm}}},
                {"sdarts",
                 {{"epsilon_start", ms.sdarts.epsilon_start},
                  {"epsilon_end", ms.sdarts.epsilon_end},
                  {"attack_steps", ms.sdarts.attack_steps}}},
                {"darts_minus", {{"beta_start", ms.darts_minus.beta_start}, {"beta_end", ms.darts_minus.beta_end}}},
                {"beta_darts", {{"lambda_start", ms.beta_darts.lambda_start}, {"lambda_end", ms.beta_darts.lambda_end}}},
                {"gdas", {{"tau_start", ms.gdas.tau_start}, {"tau_end", ms.gdas.tau_end}}},
                {"drnas", {{"reg", ms.drnas.reg}, {"reg_weight", ms.drnas.reg_weight}}}}},
              {"hessian_every", hessian_every},
              {"hessian_iters", hessian_iters},
              {"early_stop_ratio", early_stop_ratio},
              {"early_stop_window", early_stop_window},
              {"seed", seed},
              {"threads", threads},
              {"device", device},
              {"eval_valid", eval_valid},
              {"checkpoint_every_min", checkpoint_every_min},
              {"keep_checkpoints", keep_checkpoints},
              {"max_steps", max_steps},
              {"dist_timeout_s", dist_timeout_s}};
}

template <class T>
void read_config_value(const json& v, T& field, const std::string& key, const std::string& where) {
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) throw ConfigError(where + ": key '" + key + "' must be true or false, got " + v.dump());
    field = v.get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    if (!v.is_number_integer()) throw ConfigError(where + ": key '" + key + "' must be an integer, got " + v.dump());
    const bool neg = v.is_number_integer() && !v.is_number_unsigned() && v.get<int64_t>() < 0;
    bool fits;
    if (neg) fits = std::is_signed_v<T> && v.get<int64_t>() >= static_cast<int64_t>(std::numeric_limits<T>::min());
    else fits = v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
    if (!fits)
      throw ConfigError(where + ": key '" + key + "' must be an integer in [" + std::to_string(std::numeric_limits<T>::min()) +
                        ", " + std::to_string(std::numeric_limits<T>::max()) + "], got " + v.dump());
    field = v.get<T>();
  } else if constexpr (std::is_floating_point_v<T>) {
    if (!v.is_number()) throw ConfigError(where + ": key '" + key + "' must be a number, got " + v.dump());
    field = v.get<T>();
  } else {
    try {
      field = v.get<T>();
    } catch (const json::exception&) {
      throw ConfigError(where + ": key '" + key + "' has the wrong type, got " + v.dump());
    }
  }
}
template void read_config_value(const json&, bool&, const std::string&, const std::string&);
template void read_config_value(const json&, int&, const std::string&, const std::string&);
template void read_config_value(const json&, int64_t&, const std::string&, const std::string&);
template void read_config_value(const json&, uint64_t&, const std::string&, const std::string&);
template void read_config_value(const json&, double&, const std::string&, const std::string&);
template void read_config_value(const json&, std::string&, const std::string&, const std::string&);

namespace {
// Merges `src` into `dst` key by key; every key of src must exist in dst with a compatible type.
void merge_into(json& dst, const json& src, const std::string& prefix, const std::string& where) {
  if (!src.is_object()) throw ConfigError(where + ": expected a JSON object" + (prefix.empty() ? "" : " at '" + prefix + "'"));
  for (auto it = src.begin(); it != src.end(); ++it) {
    const std::string key = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (!dst.contains(it.key())) throw ConfigError(where + ": unknown key '" + key + "'");
    json& d = dst[it.key()];
    const json& s = it.value();
    if (d.is_object()) {
      merge_into(d, s, key, where);
      continue;
    }
    const bool ok = (d.is_number() && s.is_number()) || (d.is_boolean() && s.is_boolean()) ||
                    (d.is_string() && s.is_string()) || (d.is_array() && s.is_array());
    if (!ok) throw ConfigError(where + ": key '" + key + "' has the wrong type (expected like " + d.dump() + ")");
    if (d.is_number_integer() && !s.is_number_integer())
      throw ConfigError(where + ": key '" + key + "' must be an integer, got " + s.dump());
    d = s;
  }
}
}  // namespace

void SearchConfig::merge_json(const json& j, const std::string& where) {
  json cur = to_json();
  merge_into(cur, j, "", where);
  try {
    read_config_value(cur["preset"], preset, "preset", where);
    read_config_value(cur["method"], method, "method", where);
    // A config written before --method existed (no `method` key) ran its preset's method.
    if (j.is_object() && j.contains("preset") && !j.contains("method")) method = preset;
    read_config_value(cur["scale"], scale, "scale", where);
    read_config_value(cur["out"], out, "out", where);
    read_config_value(cur["dataset"], dataset, "dataset", where);
    read_config_value(cur["data_dir"], data_dir, "data_dir", where);
    read_config_value(cur["subset"], subset, "subset", where);
    read_config_value(cur["image_size"], image_size, "image_size", where);
    read_config_value(cur["train_portion"], train_portion, "train_portion", where);
    read_config_value(cur["batch_size"], batch_size, "batch_size", where);
    read_config_value(cur["augment"]["crop_padding"], augment.crop_padding, "augment.crop_padding", where);
    read_config_value(cur["augment"]["flip"], augment.flip, "augment.flip", where);
    read_config_value(cur["augment"]["cutout"], augment.cutout, "augment.cutout", where);
    read_config_value(cur["augment"]["normalize"], augment.normalize, "augment.normalize", where);
    read_config_value(cur["workers"], workers, "workers", where);
    read_config_value(cur["space"], space, "space", where);
    read_config_value(cur["se_ratio"], se_ratio, "se_ratio", where);
    read_config_value(cur["swish"], swish, "swish", where);
    read_config_value(cur["channels"], channels, "channels", where);
    read_config_value(cur["layers"], layers, "layers", where);
    read_config_value(cur["steps"], steps, "steps", where);
    read_config_value(cur["multiplier"], multiplier, "multiplier", where);
    primitives = cur["primitives"].get<std::vector<std::string>>();
    read_config_value(cur["alpha_init_std"], alpha_init_std, "alpha_init_std", where);
    noise = noise_from_json(cur["noise"]);
    read_config_value(cur["epochs"], epochs, "epochs", where);
    read_config_value(cur["lr"], lr, "lr", where);
    read_config_value(cur["lr_min"], lr_min, "lr_min", where);
    read_config_value(cur["momentum"], momentum, "momentum", where);
    read_config_value(cur["weight_decay"], weight_decay, "weight_decay", where);
    read_config_value(cur["grad_clip"], grad_clip, "grad_clip", where);
    read_config_value(cur["arch_lr"], arch_lr, "arch_lr", where);
    read_config_value(cur["arch_beta1"], arch_beta1, "arch_beta1", where);
    read_config_value(cur["arch_beta2"], arch_beta2, "arch_beta2", where);
    read_config_value(cur["arch_weight_decay"], arch_weight_decay, "arch_weight_decay", where);
    read_config_value(cur["order"], order, "order", where);
    read_config_value(cur["unrolled_xi"], unrolled_xi, "unrolled_xi", where);
    read_config_value(cur["arch_warmup"], arch_warmup, "arch_warmup", where);
    {
      MethodSettings& ms = method_settings;
      const json& m = cur["method_settings"];
      auto rd = [&](const char* method, const char* key, auto& field) {
        read_config_value(m[method][key], field, std::string("method_settings.") + method + "." + key, where);
      };
      rd("fair_darts", "zero_one_weight", ms.fair_darts.zero_one_weight);
      rd("fair_darts", "threshold", ms.fair_darts.threshold);
      rd("pc_darts", "k", ms.pc_darts.k);
      rd("pc_darts", "edge_norm", ms.pc_darts.edge_norm);
      rd("sdarts", "epsilon_start", ms.sdarts.epsilon_start);
      rd("sdarts", "epsilon_end", ms.sdarts.epsilon_end);
      rd("sdarts", "attack_steps", ms.sdarts.attack_steps);
      rd("darts_minus", "beta_start", ms.darts_minus.beta_start);
      rd("darts_minus", "beta_end", ms.darts_minus.beta_end);
      rd("beta_darts", "lambda_start", ms.beta_darts.lambda_start);
      rd("beta_darts", "lambda_end", ms.beta_darts.lambda_end);
      rd("gdas", "tau_start", ms.gdas.tau_start);
      rd("gdas", "tau_end", ms.gdas.tau_end);
      rd("drnas", "reg", ms.drnas.reg);
      rd("drnas", "reg_weight", ms.drnas.reg_weight);
    }
    read_config_value(cur["hessian_every"], hessian_every, "hessian_every", where);
    read_config_value(cur["hessian_iters"], hessian_iters, "hessian_iters", where);
    read_config_value(cur["early_stop_ratio"], early_stop_ratio, "early_stop_ratio", where);
    read_config_value(cur["early_stop_window"], early_stop_window, "early_stop_window", where);
    read_config_value(cur["seed"], seed, "seed", where);
    read_config_value(cur["threads"], threads, "threads", where);
    read_config_value(cur["device"], device, "device", where);
    read_config_value(cur["eval_valid"], eval_valid, "eval_valid", where);
    read_config_value(cur["checkpoint_every_min"], checkpoint_every_min, "checkpoint_every_min", where);
    read_config_value(cur["keep_checkpoints"], keep_checkpoints, "keep_checkpoints", where);
    read_config_value(cur["max_steps"], max_steps, "max_steps", where);
    read_config_value(cur["dist_timeout_s"], dist_timeout_s, "dist_timeout_s", where);
  } catch (const json::exception& e) {
    throw ConfigError(where + ": " + e.what());
  }
}

void SearchConfig::finish_layering() {
  if (method.empty()) method = preset;  // --preset P alone runs method P
  apply_space(preset_defaults(preset, scale).primitives);
  if (noise.mixture == NoiseMixture::kMultiplicative) noise.scale = NoiseScale::kAbsolute;
}

void SearchConfig::finalize() {
  if (method.empty()) method = preset;
  validate();
  if (data_dir.empty()) data_dir = default_data_dir(dataset);
}

void SearchConfig::apply_space(const std::vector<std::string>& preset_primitives) {
  check_search_space(space);
  const auto fixed = space_primitives(space);
  if (!fixed.empty() && primitives == preset_primitives) primitives = fixed;
}

void SearchConfig::validate() const {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw UsageError(msg);
  };
  need(epochs >= 1, "--epochs must be >= 1, got " + std::to_string(epochs));
  need(batch_size >= 2, "--batch-size must be >= 2, got " + std::to_string(batch_size));
  // Upper bounds: far above any real search (paper: 8 x 16); absurd values ran out of memory
  // after the run directory was created, or crashed (--layers 100000: SIGSEGV).
  need(channels >= 2 && channels <= 1024 && channels % 2 == 0, "--channels must be even and in [2, 1024], got " + std::to_string(channels));
  need(layers >= 1 && layers <= 100, "--layers must be in [1, 100], got " + std::to_string(layers));
  need(steps >= 1 && multiplier >= 1 && multiplier <= steps, "steps/multiplier must satisfy 1 <= multiplier <= steps");
  need(subset >= 0, "--subset must be >= 0, got " + std::to_string(subset));
  need(image_size >= kMinImageSize && image_size <= kMaxImageSize,
       "--image-size must be in [" + std::to_string(kMinImageSize) + ", " + std::to_string(kMaxImageSize) +
           "], got " + std::to_string(image_size));
  need(train_portion > 0 && train_portion < 1, "--train-portion must be in (0, 1), got " + std::to_string(train_portion));
  need(lr > 0 && lr_min >= 0 && lr_min <= lr, "--lr must be > 0 and --lr-min in [0, lr]");
  need(momentum >= 0 && momentum < 1, "--momentum must be in [0, 1)");
  need(weight_decay >= 0 && arch_weight_decay >= 0, "weight decays must be >= 0");
  need(grad_clip > 0, "--grad-clip must be > 0");
  need(arch_lr >= 0, "--arch-lr must be >= 0");
  need(arch_beta1 >= 0 && arch_beta1 < 1 && arch_beta2 >= 0 && arch_beta2 < 1, "Adam betas must be in [0, 1)");
  need(order == "first" || order == "second", "--order must be first or second, got '" + order + "'");
  need(hessian_every >= 0, "--hessian-every must be >= 0 epochs (0 = off), got " + std::to_string(hessian_every));
  need(hessian_iters >= 1 && hessian_iters <= 10000, "--hessian-iters must be in [1, 10000], got " + std::to_string(hessian_iters));
  need(early_stop_ratio >= 0 && early_stop_ratio < 1, "--early-stop must be in [0, 1) (0 = off)");
  need(early_stop_window >= 1, "--early-stop-window must be >= 1 epoch");
  need(early_stop_ratio == 0 || (hessian_every > 0 && early_stop_window % hessian_every == 0),
       "--early-stop needs --hessian-every K with K dividing --early-stop-window");
  check_threads(threads);
  need(workers >= 1 && workers <= 64, "--workers must be in [1, 64]");
  need(keep_checkpoints >= 1, "--keep-checkpoints must be >= 1");
  need(checkpoint_every_min >= 0, "--checkpoint-every must be >= 0 minutes");
  need(max_steps >= 0, "--max-steps must be >= 0");
  need(dist_timeout_s > 0, "--dist-timeout must be > 0 seconds");
  need(augment.crop_padding >= 0 && augment.cutout >= 0, "augmentation sizes must be >= 0");
  need(!primitives.empty(), "the op list (primitives) is empty");
  check_search_space(space);
  const auto fixed = space_primitives(space);
  if (!fixed.empty()) {
    std::string list;
    for (const auto& p : fixed) list += (list.empty() ? "" : ",") + p;
    need(primitives == fixed, "--space " + space + " has the fixed op set " + list + "; do not pass --ops with it");
  }
  need(se_ratio >= 0 && se_ratio < 1, "--se-ratio must be in [0, 1), got " + std::to_string(se_ratio));
  need(space == "mbv2" || (se_ratio == 0 && !swish), "--se-ratio and --swish apply to --space mbv2 only");
  for (const auto& p : primitives) need(space == "mbv2" || is_known_op(p), "unknown op '" + p + "' in primitives");
  need(std::find(primitives.begin(), primitives.end(), "none") == primitives.end() || primitives.size() >= 2,
       "primitives must contain an op other than none");
  need(alpha_init_std >= 0, "alpha_init_std must be >= 0");
  need(arch_warmup >= 0 && arch_warmup < 1, "--arch-warmup must be in [0, 1) (a share of the epochs), got " + std::to_string(arch_warmup));
  check_method_config(*this);
  noise.validate();
  for (const auto& p : noise.ops) need(is_known_op(p), "unknown op '" + p + "' in --noise-ops");
}

json read_json_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw ConfigError("cannot open config file " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return json::parse(ss.str());
  } catch (const json::exception& e) {
    throw ConfigError("malformed JSON in " + path + ": " + e.what());
  }
}

}  // namespace noisydarts
