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

void open_checkpoint(const std::string& path, const std::string& kind,
                     torch::serialize::InputArchive& archive) {
  try {
    archive.load_from(path);
  } catch (const std::exception& e) {
    throw CheckpointError("cannot read checkpoint " + path + ": not a noisydarts checkpoint or damaged");
  }
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
