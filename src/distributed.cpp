// Compiled with USE_C10D_GLOO (CMakeLists.txt): Debian's libtorch ships ProcessGroupGloo.
#include "noisydarts/distributed.h"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <glog/logging.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <map>

#include "noisydarts/error.h"

namespace noisydarts {

namespace {

int env_int(const char* name, int fallback, int lo, int hi) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < lo || x > hi)
    throw UsageError(std::string("environment variable ") + name + "='" + v + "' must be an integer in [" +
                     std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return static_cast<int>(x);
}

std::string first_line(const std::string& s) {
  const auto nl = s.find('\n');
  std::string l = nl == std::string::npos ? s : s.substr(0, nl);
  return l.size() > 240 ? l.substr(0, 240) + "..." : l;
}

}  // namespace

DistEnv dist_env_from_environment() {
  DistEnv e;
  e.world = env_int("WORLD_SIZE", 1, 1, 65536);
  e.rank = env_int("RANK", 0, 0, 65535);
  e.local_rank = env_int("LOCAL_RANK", e.rank, 0, 65535);
  e.master_port = env_int("MASTER_PORT", 29500, 1, 65535);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) e.master_addr = a;
  if (e.rank >= e.world)
    throw UsageError("environment variable RANK=" + std::to_string(e.rank) + " must be below WORLD_SIZE=" +
                     std::to_string(e.world));
  return e;
}

struct Distributed::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

Distributed::Distributed(const DistEnv& env, std::chrono::milliseconds timeout)
    : env_(env), timeout_(timeout), impl_(std::make_unique<Impl>()) {
  // One deadline for the whole rendezvous. LibTorch would otherwise wait the full timeout twice
  // when a peer never comes: once in TCPStore's wait for workers, again in Gloo's address
  // exchange. So the store does not wait for workers; the ranks meet at our own barrier on the
  // store (an `add` counter; the last to arrive sets a key the others wait for) with the time
  // left, and only then build the process group, whose rendezvous then finds every peer there.
  // The process group keeps the full timeout for its collectives.
  // c10d also logs its socket errors through glog (two extra stderr lines for a client that
  // cannot connect); our DistributedError carries the reason in the one documented line.
  FLAGS_minloglevel = std::max<int>(FLAGS_minloglevel, google::GLOG_FATAL);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const auto left = [&] {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (ms.count() <= 0) throw std::runtime_error("timed out waiting for the other ranks");
    return ms;
  };
  run("rendezvous at " + env.master_addr + ":" + std::to_string(env.master_port), [&] {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(env.master_port);
    so.isServer = env.rank == 0;
    so.numWorkers = static_cast<std::size_t>(env.world);
    so.waitWorkers = false;
    so.timeout = timeout;  // a client retries connecting until then
    auto store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    impl_->store = store;
    const std::string arrived = "noisydarts/rendezvous/arrived", all = "noisydarts/rendezvous/all";
    if (store->add(arrived, 1) == env.world) store->set(all, std::vector<uint8_t>{1});
    store->wait({all}, left());
    store->setTimeout(timeout);
    auto o = c10d::ProcessGroupGloo::Options::create(timeout);
    o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(
        env.master_addr == "localhost" ? "127.0.0.1" : env.master_addr));
    impl_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, env.rank, env.world, o);
  });
}

Distributed::~Distributed() = default;

void Distributed::run(const std::string& what, const std::function<void()>& f) {
  try {
    f();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw DistributedError("rank " + std::to_string(env_.rank) + " of " + std::to_string(env_.world) + ": " + what +
                           " failed (another rank died or stopped, or " + std::to_string(timeout_.count() / 1000) +
                           " s timeout): " + first_line(e.what()));
  }
}

namespace {
// Groups tensors by dtype, flattens each group into one buffer, applies `op`, copies back.
void flat_apply(std::vector<torch::Tensor>& ts, const std::function<void(torch::Tensor&)>& op) {
  std::map<int, std::vector<size_t>> groups;
  for (size_t i = 0; i < ts.size(); ++i) groups[static_cast<int>(ts[i].scalar_type())].push_back(i);
  for (auto& [dtype, idx] : groups) {
    std::vector<torch::Tensor> parts;
    for (size_t i : idx) parts.push_back(ts[i].detach().reshape(-1));
    auto flat = torch::cat(parts).contiguous();
    op(flat);
    int64_t off = 0;
    torch::NoGradGuard ng;
    for (size_t i : idx) {
      const int64_t n = ts[i].numel();
      ts[i].detach().copy_(flat.narrow(0, off, n).view(ts[i].sizes()));
      off += n;
    }
  }
}
}  // namespace

void Distributed::allreduce_sum(std::vector<torch::Tensor>& ts) {
  run("all-reduce", [&] {
    flat_apply(ts, [&](torch::Tensor& flat) {
      std::vector<torch::Tensor> v{flat};
      impl_->pg->allreduce(v)->wait(timeout_);
    });
  });
}

void Distributed::allreduce_mean(std::vector<torch::Tensor>& ts) {
  allreduce_sum(ts);
  for (auto& t : ts) t.div_(env_.world);
}

void Distributed::broadcast(std::vector<torch::Tensor>& ts, int root) {
  run("broadcast", [&] {
    flat_apply(ts, [&](torch::Tensor& flat) {
      std::vector<torch::Tensor> v{flat};
      c10d::BroadcastOptions o;
      o.rootRank = root;
      impl_->pg->broadcast(v, o)->wait(timeout_);
    });
  });
}

void Distributed::broadcast_module(torch::nn::Module& m) {
  std::vector<torch::Tensor> ts;
  for (auto& p : m.parameters()) ts.push_back(p);
  for (auto& b : m.buffers()) ts.push_back(b);
  broadcast(ts, 0);
}

void Distributed::barrier() {
  run("barrier", [&] { impl_->pg->barrier()->wait(timeout_); });
}

GradReducer Distributed::mean_reducer() {
  return [this](std::vector<torch::Tensor>& g) { allreduce_mean(g); };
}

std::shared_ptr<Distributed> init_distributed_from_environment(double timeout_seconds) {
  const DistEnv env = dist_env_from_environment();
  if (!env.distributed()) return nullptr;
  return std::make_shared<Distributed>(env, std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
}

}  // namespace noisydarts
