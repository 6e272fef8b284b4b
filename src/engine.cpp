#include "noisydarts/engine.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "noisydarts/checkpoint.h"
#include "noisydarts/error.h"
#include "noisydarts/runtime.h"

namespace noisydarts {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

// ------------------------------------------------------------------------------------------
// Stop requests
// ------------------------------------------------------------------------------------------

namespace {
std::atomic<int> g_stop_signal{0};

void on_stop_signal(int sig) {
  if (g_stop_signal.exchange(sig) != 0) {
    // Second signal: stop at once.
    ::signal(sig, SIG_DFL);
    ::raise(sig);
  }
}
}  // namespace

void install_stop_handlers() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

void request_stop(int signal_number) { g_stop_signal.store(signal_number == 0 ? SIGTERM : signal_number); }
bool stop_requested() { return g_stop_signal.load() != 0; }
int stop_signal() { return g_stop_signal.load(); }
void clear_stop() { g_stop_signal.store(0); }

std::string signal_name(int s) {
  if (s == SIGTERM) return "SIGTERM";
  if (s == SIGINT) return "SIGINT";
  return "signal " + std::to_string(s);
}

std::string stop_message(const std::string& command, const std::string& out, int64_t epoch, int64_t step) {
  const int s = stop_signal() ? stop_signal() : SIGTERM;
  return "stopped by " + signal_name(s) + " after epoch " + std::to_string(epoch + (step > 0 ? 1 : 0)) +
         (step > 0 ? " step " + std::to_string(step) : std::string()) +
         ", checkpoint written; continue with: noisydarts " + command + " --resume " + out;
}

torch::Device rank_device(const std::string& device, const Distributed* dist) {
  torch::Device d = parse_device(device);
  if (dist && d.is_cuda() && !d.has_index()) d = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(dist->local_rank()));
  return d;
}

// ------------------------------------------------------------------------------------------
// Stateful parts
// ------------------------------------------------------------------------------------------

void ModuleState::save(torch::serialize::OutputArchive& a) const {
  torch::serialize::OutputArchive m;
  m_.save(m);
  a.write(key_, m);
}
void ModuleState::load(torch::serialize::InputArchive& a) {
  torch::serialize::InputArchive m;
  a.read(key_, m);
  m_.load(m);
}

template <class Optimizer>
void OptimizerState<Optimizer>::save(torch::serialize::OutputArchive& a) const {
  torch::serialize::OutputArchive o;
  save_optimizer_state(o, opt_, params_);
  a.write(key_, o);
}
template <class Optimizer>
void OptimizerState<Optimizer>::load(torch::serialize::InputArchive& a) {
  torch::serialize::InputArchive o;
  a.read(key_, o);
  load_optimizer_state(o, opt_, params_);
}
template class OptimizerState<torch::optim::SGD>;
template class OptimizerState<torch::optim::Adam>;

namespace {
int64_t stored_world_size(torch::serialize::InputArchive& a) {
  c10::IValue v;
  return a.try_read("world_size", v) && v.isInt() ? std::max<int64_t>(1, v.toInt()) : 1;
}
}  // namespace

void StreamState::save(torch::serialize::OutputArchive& a) const {
  write_int(a, name_ + "_pass", s_.position().pass);
  write_int(a, name_ + "_batch", s_.position().batch);
}
void StreamState::load(torch::serialize::InputArchive& a) {
  const int64_t stored = stored_world_size(a);
  const int64_t batch = read_int(a, name_ + "_batch") * stored / world_;
  s_.seek({read_int(a, name_ + "_pass"), std::min(batch, std::max<int64_t>(0, s_.batches_per_pass() - 1))});
}

void RngState::save(torch::serialize::OutputArchive& a) const { a.write("rng_cpu", get_cpu_rng_state()); }
void RngState::load(torch::serialize::InputArchive& a) {
  torch::Tensor rng;
  a.read("rng_cpu", rng);
  set_cpu_rng_state(rng);
}

void LoopPosition::save(torch::serialize::OutputArchive& a) const {
  write_int(a, "epoch", epoch);
  write_int(a, "step", step);
  write_int(a, "world_size", world);
}
void LoopPosition::load(torch::serialize::InputArchive& a) {
  epoch = read_int(a, "epoch");
  c10::IValue v;
  step = a.try_read("step", v) && v.isInt() ? v.toInt() * stored_world_size(a) / world : 0;
  if (steps_per_epoch > 0) step = std::min(step, steps_per_epoch);
}

void JsonState::save(torch::serialize::OutputArchive& a) const { write_string(a, key_, get_().dump()); }
void JsonState::load(torch::serialize::InputArchive& a) {
  c10::IValue v;
  if (optional_ && !a.try_read(key_, v)) return;
  set_(json::parse(read_string(a, key_)));
}

std::string MetricsLog::jsonl() const {
  std::string lines;
  for (const auto& e : epochs) lines += e.dump() + "\n";
  return lines;
}
double MetricsLog::sum(const std::string& key) const {
  double s = 0;
  for (const auto& e : epochs) s += e.value(key, 0.0);
  return s;
}
std::unique_ptr<Stateful> MetricsLog::state() {
  return std::make_unique<JsonState>(
      "metrics", [this] { return json(epochs); },
      [this](const json& j) {
        if (!j.is_array()) throw CheckpointError("metrics is not a list");
        epochs.assign(j.begin(), j.end());
      });
}

// ------------------------------------------------------------------------------------------
// Checkpoint
// ------------------------------------------------------------------------------------------

Checkpoint& Checkpoint::add(Stateful& part) {
  parts_.push_back(&part);
  return *this;
}
Checkpoint& Checkpoint::add(std::unique_ptr<Stateful> part) {
  parts_.push_back(part.get());
  owned_.push_back(std::move(part));
  return *this;
}
Checkpoint& Checkpoint::add_int(const std::string& key, std::function<int64_t()> get) {
  ints_.emplace_back(key, std::move(get));
  return *this;
}

void Checkpoint::save(const std::string& path) const {
  torch::serialize::OutputArchive a;
  write_int(a, "format_version", kCheckpointFormatVersion);
  write_string(a, "kind", kind_);
  write_string(a, "config", config_().dump());
  for (const auto& [k, get] : ints_) write_int(a, k, get());
  for (const auto* p : parts_) p->save(a);
  save_archive_atomic(a, path);
}

void Checkpoint::load(const std::string& path) {
  torch::serialize::InputArchive a;
  open_checkpoint(path, kind_, a);
  try {
    for (auto* p : parts_) p->load(a);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw CheckpointError("checkpoint " + path + " does not match this run: " + std::string(e.what()).substr(0, 200));
  }
}

// ------------------------------------------------------------------------------------------
// Run directory
// ------------------------------------------------------------------------------------------

RunDirectory::RunDirectory(std::string path, std::string prefix, bool writer)
    : path_(std::move(path)), prefix_(std::move(prefix)), writer_(writer) {}

RunDirectory::~RunDirectory() {
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the lock
}

std::string RunDirectory::file(const std::string& name) const { return (fs::path(path_) / name).string(); }
bool RunDirectory::exists() const { return fs::is_directory(path_); }

void RunDirectory::create_and_lock() {
  if (!writer_) return;
  std::error_code ec;
  fs::create_directories(fs::path(path_) / "checkpoints", ec);
  if (ec) throw IoError("cannot create run directory " + path_ + ": " + ec.message());
  lock();
}

void RunDirectory::lock() {
  if (!writer_ || lock_fd_ >= 0) return;
  const std::string lock_path = file(".lock");
  const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw IoError("cannot create the lock file " + lock_path + ": " + std::strerror(errno));
  struct flock fl;
  std::memset(&fl, 0, sizeof fl);
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  if (::fcntl(fd, F_SETLK, &fl) != 0) {
    const int err = errno;
    std::string holder = "another process";
    struct flock q;
    std::memset(&q, 0, sizeof q);
    q.l_type = F_WRLCK;
    q.l_whence = SEEK_SET;
    if (::fcntl(fd, F_GETLK, &q) == 0 && q.l_type != F_UNLCK) holder = "process " + std::to_string(q.l_pid);
    ::close(fd);
    if (err == EACCES || err == EAGAIN)
      throw UsageError("run directory " + path_ + " is in use by " + holder +
                       " (a running noisydarts); wait for it to finish or choose another --out");
    throw IoError("cannot lock " + lock_path + ": " + std::strerror(err));
  }
  // The holder's PID, for people looking at the directory (the lock itself is the fcntl lock).
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) == 0) {
    const ssize_t n = ::pwrite(fd, pid.data(), pid.size(), 0);
    (void)n;
  }
  lock_fd_ = fd;
}

void RunDirectory::write(const std::string& name, const std::string& content) const {
  if (writer_) write_file_atomic(file(name), content);
}

std::string RunDirectory::save_checkpoint(const Checkpoint& ckpt, int64_t epoch, int64_t step, int keep) const {
  if (!writer_) return "";
  char name[96];
  std::snprintf(name, sizeof name, "%s-e%04lld-s%06lld.pt", prefix_.c_str(), static_cast<long long>(epoch),
                static_cast<long long>(step));
  const fs::path dir = fs::path(path_) / "checkpoints";
  const std::string p = (dir / name).string();
  ckpt.save(p);
  write_file_atomic((dir / "latest").string(), std::string(name) + "\n");
  // Keep the newest `keep`.
  const std::vector<std::string> all = checkpoint_files();
  std::error_code ec;
  for (size_t i = 0; i + static_cast<size_t>(std::max(1, keep)) < all.size(); ++i) fs::remove(all[i], ec);
  return p;
}

std::vector<std::string> RunDirectory::checkpoint_files() const {
  std::vector<std::string> all;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(fs::path(path_) / "checkpoints", ec))
    if (e.path().extension() == ".pt" && e.path().filename().string().rfind(prefix_ + "-", 0) == 0)
      all.push_back(e.path().string());
  std::sort(all.begin(), all.end());
  return all;
}

std::string RunDirectory::latest_checkpoint() const {
  const fs::path dir = fs::path(path_) / "checkpoints";
  std::ifstream f(dir / "latest");
  std::string name;
  if (f && std::getline(f, name) && !name.empty() && name.find('/') == std::string::npos) {
    const auto p = dir / name;
    if (fs::exists(p)) return p.string();
  }
  return "";
}

RunDirectory::StoredConfig RunDirectory::open_for_resume(const std::string& kind, const std::vector<std::string>& extra,
                                   const std::string& none_message, std::vector<std::string>& candidates) {
  if (!exists()) throw CheckpointError(none_message);
  lock();
  candidates = resume_candidates(extra);
  StoredConfig stored;
  stored.file = load_newest(candidates, [&](const std::string& p) { stored.config = read_checkpoint_config(p, kind); },
                            nullptr, none_message);
  return stored;
}

void RunDirectory::publish(const std::string& checkpoint, const std::string& name) const {
  if (!writer_) return;
  const std::string target = file(name), tmp = target + ".tmp-link";
  std::error_code ec;
  fs::remove(tmp, ec);
  if (::link(checkpoint.c_str(), tmp.c_str()) == 0) {
    if (::rename(tmp.c_str(), target.c_str()) == 0) return;
    fs::remove(tmp, ec);
    throw IoError("cannot write " + target + ": " + std::strerror(errno));
  }
  std::ifstream in(checkpoint, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in) throw IoError("cannot read " + checkpoint + " to copy it to " + target);
  write_file_atomic(target, bytes);
}

std::vector<std::string> RunDirectory::resume_candidates(const std::vector<std::string>& extra) const {
  std::vector<std::string> out;
  const std::string latest = latest_checkpoint();
  if (!latest.empty()) out.push_back(latest);
  const std::vector<std::string> all = checkpoint_files();
  for (auto it = all.rbegin(); it != all.rend(); ++it)
    if (*it != latest) out.push_back(*it);
  for (auto& x : extra)
    if (fs::is_regular_file(x)) out.push_back(x);
  return out;
}

std::string load_newest(const std::vector<std::string>& candidates, const std::function<void(const std::string&)>& load,
                        const std::function<void(const std::string&)>& info, const std::string& none_message) {
  if (candidates.empty()) throw CheckpointError(none_message);
  std::string first_error;
  std::vector<std::string> skipped;
  for (const auto& c : candidates) {
    try {
      load(c);
      if (!skipped.empty() && info) {
        std::string names;
        for (auto& s : skipped) names += (names.empty() ? "" : ", ") + fs::path(s).filename().string();
        info("warning: newest checkpoint " + names + " unreadable (" + first_error + "); resuming from " +
             fs::path(c).filename().string() + " instead");
      }
      return c;
    } catch (const CheckpointError& e) {
      if (first_error.empty()) first_error = e.what();
      skipped.push_back(c);
    }
  }
  if (candidates.size() == 1) throw CheckpointError(first_error);
  throw CheckpointError(first_error + " (and no older checkpoint of the run loads either)");
}

// ------------------------------------------------------------------------------------------
// Progress
// ------------------------------------------------------------------------------------------

Progress::Progress(bool enabled)
    : enabled_(enabled), tty_(::isatty(2) != 0), last_(Clock::now() - std::chrono::hours(1)) {}

void Progress::update(const std::string& line, bool force) {
  if (!enabled_) return;
  const double interval = tty_ ? 0.5 : 15.0;
  if (!force && seconds_since(last_) < interval) return;
  last_ = Clock::now();
  if (tty_) std::fprintf(stderr, "\r\033[K%s", line.c_str());
  else std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  shown_ = true;
}

void Progress::finish() {
  if (enabled_ && tty_ && shown_) std::fprintf(stderr, "\r\033[K");
  shown_ = false;
}

std::string progress_line(int64_t epoch, int64_t epochs, int64_t step, int64_t steps, const std::string& body,
                          double seconds_left) {
  char head[96];
  std::snprintf(head, sizeof head, "epoch %lld/%lld step %lld/%lld  ", static_cast<long long>(epoch),
                static_cast<long long>(epochs), static_cast<long long>(step), static_cast<long long>(steps));
  return head + body + "  ETA " + format_duration(seconds_left);
}

}  // namespace noisydarts
