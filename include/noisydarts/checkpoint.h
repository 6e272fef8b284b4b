#pragma once
/// Checkpoints: a versioned LibTorch archive holding everything needed to resume a search
/// (docs/checkpoint.md lists every key). Written to a temporary file, flushed and renamed.
#include <torch/torch.h>
#include <nlohmann/json.hpp>
#include <string>

namespace noisydarts {

constexpr int64_t kCheckpointFormatVersion = 1;

/// Writes `archive` to `path` atomically (temp file + fsync + rename). Throws IoError.
void save_archive_atomic(torch::serialize::OutputArchive& archive, const std::string& path);
/// Our own check of a checkpoint's ZIP container before LibTorch's archive reader sees it
/// (src/archive_check.cpp; docs/checkpoint.md lists what is checked): end records, central
/// directory and local headers inside the file and consistent, stored records only, CRC-32 of
/// every record, one top-level folder, no "..", `data.pkl` and a `version` LibTorch reads.
/// Throws CheckpointError "checkpoint <what> is damaged or not a noisydarts checkpoint: <reason>".
void validate_checkpoint_bytes(const char* data, size_t size, const std::string& what);
/// The same checks for any zip-format PyTorch file (`torch.save` output, docs/interop.md); a
/// failure throws CheckpointError(`message_prefix` + reason). `allow_unset_crc`: a stored CRC-32
/// of 0 is not checked (PyTorch can be told not to compute them).
void validate_pytorch_zip_bytes(const char* data, size_t size, const std::string& message_prefix,
                                bool allow_unset_crc);
/// Reads `path` whole and validates it (validate_checkpoint_bytes); returns the bytes. Throws
/// CheckpointError naming the file, also when it cannot be read.
std::string read_checkpoint_file(const std::string& path);
void validate_checkpoint_file(const std::string& path);
/// Reads, validates and loads `path` into `archive` (no header check). Throws CheckpointError.
void load_checkpoint_archive(const std::string& path, torch::serialize::InputArchive& archive);
/// Opens `path` as a checkpoint of `kind` ("search" | "train"); checks format version and kind.
/// Throws CheckpointError naming the file.
void open_checkpoint(const std::string& path, const std::string& kind,
                     torch::serialize::InputArchive& archive);

/// Small typed helpers over IValues stored in archives.
void write_int(torch::serialize::OutputArchive& a, const std::string& key, int64_t v);
void write_double(torch::serialize::OutputArchive& a, const std::string& key, double v);
void write_string(torch::serialize::OutputArchive& a, const std::string& key, const std::string& v);
int64_t read_int(torch::serialize::InputArchive& a, const std::string& key);
double read_double(torch::serialize::InputArchive& a, const std::string& key);
std::string read_string(torch::serialize::InputArchive& a, const std::string& key);

/// Optimizer state by parameter position. LibTorch 1.13's own Optimizer::save/load keys the
/// state by printed pointers that its loader cannot parse back (the state is silently lost on
/// resume), so we store it ourselves: tensors `momentum_<i>` (SGD) or `step_<i>`, `exp_avg_<i>`,
/// `exp_avg_sq_<i>`, `max_exp_avg_sq_<i>` (Adam), i = index in `params`.
void save_optimizer_state(torch::serialize::OutputArchive& a, torch::optim::SGD& opt,
                          const std::vector<torch::Tensor>& params);
void load_optimizer_state(torch::serialize::InputArchive& a, torch::optim::SGD& opt,
                          const std::vector<torch::Tensor>& params);
void save_optimizer_state(torch::serialize::OutputArchive& a, torch::optim::Adam& opt,
                          const std::vector<torch::Tensor>& params);
void load_optimizer_state(torch::serialize::InputArchive& a, torch::optim::Adam& opt,
                          const std::vector<torch::Tensor>& params);

/// The SGD momentum buffers of `params` (undefined where the optimiser holds none yet).
std::vector<torch::Tensor> sgd_momentum_buffers(torch::optim::SGD& opt, const std::vector<torch::Tensor>& params);

/// State of the default CPU generator (noise, drop-path, alpha init draw from it).
torch::Tensor get_cpu_rng_state();
void set_cpu_rng_state(const torch::Tensor& state);

/// The config JSON stored in a checkpoint (to rebuild the network before loading it).
nlohmann::json read_checkpoint_config(const std::string& path, const std::string& kind);

}  // namespace noisydarts
