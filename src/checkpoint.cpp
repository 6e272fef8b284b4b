#include "noisydarts/checkpoint.h"

#include <sstream>

#include "noisydarts/error.h"

namespace noisydarts {

void save_archive_atomic(torch::serialize::OutputArchive& archive, const std::string& path) {
  std::ostringstream ss;
  archive.save_to(ss);
  write_file_atomic(path, ss.str());
}

void write_int(torch::serialize::OutputArchive& a, const std::string& key, int64_t v) {
  a.write(key, c10::IValue(v));
}
void write_double(torch::serialize::OutputArchive& a, const std::string& key, double v) {
  a.write(key, c10::IValue(v));
}
void write_string(torch::serialize::OutputArchive& a, const std::string& key, const std::string& v) {
  a.write(key, c10::IValue(v));
}
int64_t read_int(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(key, v);
  return v.toInt();
}
double read_double(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(key, v);
  return v.toDouble();
}
std::string read_string(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue v;
  a.read(key, v);
  return v.toStringRef();
}

void load_checkpoint_archive(const std::string& path, torch::serialize::InputArchive& archive) {
  // Validated by us first (LibTorch's reader can crash on crafted archives), then loaded from the
  // same bytes, so the file is read once and cannot change in between.
  const std::string bytes = read_checkpoint_file(path);
  try {
    archive.load_from(bytes.data(), bytes.size());
  } catch (const std::exception& e) {
    throw CheckpointError("cannot read checkpoint " + path + ": not a noisydarts checkpoint or damaged");
  }
}

void open_checkpoint(const std::string& path, const std::string& kind,
                     torch::serialize::InputArchive& archive) {
  load_checkpoint_archive(path, archive);
  int64_t version = -1;
  std::string k;
  try {
    version = read_int(archive, "format_version");
    k = read_string(archive, "kind");
  } catch (const std::exception&) {
    throw CheckpointError("checkpoint " + path + " has no noisydarts header (format_version/kind)");
  }
  if (version != kCheckpointFormatVersion)
    throw CheckpointError("checkpoint " + path + " has format version " + std::to_string(version) +
                          ", this build reads version " + std::to_string(kCheckpointFormatVersion));
  if (k != kind)
    throw CheckpointError("checkpoint " + path + " is a '" + k + "' checkpoint, expected '" + kind + "'");
}

namespace {
std::string key(const char* name, size_t i) { return std::string(name) + "_" + std::to_string(i); }
void check_count(torch::serialize::InputArchive& a, size_t n) {
  if (read_int(a, "num_params") != static_cast<int64_t>(n))
    throw CheckpointError("optimizer state holds " + std::to_string(read_int(a, "num_params")) +
                          " parameters, the network has " + std::to_string(n));
}
}  // namespace

void save_optimizer_state(torch::serialize::OutputArchive& a, torch::optim::SGD& opt,
                          const std::vector<torch::Tensor>& params) {
  write_int(a, "num_params", static_cast<int64_t>(params.size()));
  auto& state = opt.state();
  for (size_t i = 0; i < params.size(); ++i) {
    auto it = state.find(c10::guts::to_string(params[i].unsafeGetTensorImpl()));
    if (it == state.end()) continue;
    auto& s = static_cast<torch::optim::SGDParamState&>(*it->second);
    if (s.momentum_buffer().defined()) a.write(key("momentum", i), s.momentum_buffer(), true);
  }
}

void load_optimizer_state(torch::serialize::InputArchive& a, torch::optim::SGD& opt,
                          const std::vector<torch::Tensor>& params) {
  check_count(a, params.size());
  auto& state = opt.state();
  state.clear();
  for (size_t i = 0; i < params.size(); ++i) {
    torch::Tensor m;
    if (!a.try_read(key("momentum", i), m, true)) continue;
    auto s = std::make_unique<torch::optim::SGDParamState>();
    s->momentum_buffer(m.to(params[i].device()));
    state[c10::guts::to_string(params[i].unsafeGetTensorImpl())] = std::move(s);
  }
}

void save_optimizer_state(torch::serialize::OutputArchive& a, torch::optim::Adam& opt,
                          const std::vector<torch::Tensor>& params) {
  write_int(a, "num_params", static_cast<int64_t>(params.size()));
  auto& state = opt.state();
  for (size_t i = 0; i < params.size(); ++i) {
    auto it = state.find(c10::guts::to_string(params[i].unsafeGetTensorImpl()));
    if (it == state.end()) continue;
    auto& s = static_cast<torch::optim::AdamParamState&>(*it->second);
    write_int(a, key("step", i), s.step());
    a.write(key("exp_avg", i), s.exp_avg(), true);
    a.write(key("exp_avg_sq", i), s.exp_avg_sq(), true);
    if (s.max_exp_avg_sq().defined()) a.write(key("max_exp_avg_sq", i), s.max_exp_avg_sq(), true);
  }
}

void load_optimizer_state(torch::serialize::InputArchive& a, torch::optim::Adam& opt,
                          const std::vector<torch::Tensor>& params) {
  check_count(a, params.size());
  auto& state = opt.state();
  state.clear();
  for (size_t i = 0; i < params.size(); ++i) {
    torch::Tensor avg, sq, mx;
    if (!a.try_read(key("exp_avg", i), avg, true)) continue;
    if (!a.try_read(key("exp_avg_sq", i), sq, true))
      throw CheckpointError("Adam state of parameter " + std::to_string(i) + " is incomplete");
    auto s = std::make_unique<torch::optim::AdamParamState>();
    s->step(read_int(a, key("step", i)));
    s->exp_avg(avg.to(params[i].device()));
    s->exp_avg_sq(sq.to(params[i].device()));
    if (a.try_read(key("max_exp_avg_sq", i), mx, true)) s->max_exp_avg_sq(mx.to(params[i].device()));
    state[c10::guts::to_string(params[i].unsafeGetTensorImpl())] = std::move(s);
  }
}

std::vector<torch::Tensor> sgd_momentum_buffers(torch::optim::SGD& opt, const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> out(params.size());
  auto& state = opt.state();
  for (size_t i = 0; i < params.size(); ++i) {
    auto it = state.find(c10::guts::to_string(params[i].unsafeGetTensorImpl()));
    if (it != state.end()) out[i] = static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
  }
  return out;
}

torch::Tensor get_cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

nlohmann::json read_checkpoint_config(const std::string& path, const std::string& kind) {
  torch::serialize::InputArchive a;
  open_checkpoint(path, kind, a);
  try {
    return nlohmann::json::parse(read_string(a, "config"));
  } catch (const std::exception& e) {
    throw CheckpointError("checkpoint " + path + " has no readable config: " + e.what());
  }
}

}  // namespace noisydarts
