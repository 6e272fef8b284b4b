#pragma once
/// Data parallelism on LibTorch's c10d engine (Gloo on CPU). Launched the torchrun way: every
/// process reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from its environment
/// (`torchrun --no-python`, Slurm/mpirun wrappers, or `noisydarts launch`). docs/distributed.md.
#include <torch/torch.h>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "noisydarts/architect.h"

namespace noisydarts {

/// The launcher's environment. world == 1 means a plain single process.
struct DistEnv {
  int rank = 0, world = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool distributed() const { return world > 1; }
};

/// Reads the torchrun variables; absent WORLD_SIZE (or 1) gives a single process. Inconsistent
/// values throw UsageError naming the variable.
DistEnv dist_env_from_environment();

/// One process group (c10d TCPStore rendezvous at MASTER_ADDR:MASTER_PORT + ProcessGroupGloo).
/// Every collective waits at most `timeout`; a failed or timed-out collective (another rank died
/// or stopped) throws DistributedError naming this rank, so no process hangs forever.
class Distributed {
 public:
  Distributed(const DistEnv& env, std::chrono::milliseconds timeout);
  ~Distributed();
  int rank() const { return env_.rank; }
  int world() const { return env_.world; }
  int local_rank() const { return env_.local_rank; }

  /// In place: every tensor becomes the mean over the ranks (one flat all-reduce per dtype).
  void allreduce_mean(std::vector<torch::Tensor>& ts);
  /// In place: every tensor becomes the sum over the ranks.
  void allreduce_sum(std::vector<torch::Tensor>& ts);
  /// In place: every tensor takes rank `root`'s value.
  void broadcast(std::vector<torch::Tensor>& ts, int root = 0);
  /// Rank 0's parameters and buffers (weights, alphas, BatchNorm statistics) to every rank.
  void broadcast_module(torch::nn::Module& m);
  void barrier();
  /// A GradReducer (architect.h) that averages gradients across the ranks.
  GradReducer mean_reducer();

 private:
  void run(const std::string& what, const std::function<void()>& f);
  DistEnv env_;
  std::chrono::milliseconds timeout_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Creates the process group when the environment asks for more than one process, else null.
std::shared_ptr<Distributed> init_distributed_from_environment(double timeout_seconds);

}  // namespace noisydarts
