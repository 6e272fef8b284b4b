#pragma once
/// PyTorch interoperability (SPEC 6): state dicts in PyTorch's own zip/pickle format, readable by
/// Python `torch.load` and written by Python `torch.save`, with the reference implementation's
/// key names and shapes. docs/interop.md.
#include <torch/torch.h>
#include <string>
#include <utility>
#include <vector>

#include "noisydarts/search_network.h"

namespace noisydarts {

/// An ordered list of (key, tensor): a PyTorch state dict.
using StateDict = std::vector<std::pair<std::string, torch::Tensor>>;

/// Parameters and buffers of `m` with their dotted names, in the order Python's
/// `Module.state_dict()` lists them (per module: parameters, then buffers; modules pre-order).
/// Undefined tensors (non-affine BatchNorm weights) are skipped, as in PyTorch.
StateDict module_state_dict(const torch::nn::Module& m);

/// Copies `sd` into `m` like `load_state_dict(strict=True)`: every key must exist with the same
/// shape and every parameter/buffer must be given (`num_batches_tracked` may be absent, as in
/// files from old PyTorch versions). Values are converted to the module's dtype and device.
/// `ignore` lists keys of `sd` to skip. Throws CheckpointError naming `source` and the first
/// mismatches.
void load_module_state(torch::nn::Module& m, const StateDict& sd, const std::string& source,
                       const std::vector<std::string>& ignore = {});

/// Writes `sd` atomically as a dict of CPU tensors that Python reads with `torch.load(path)`.
/// Throws IoError.
void save_state_dict(const StateDict& sd, const std::string& path);
/// Reads a state dict saved by Python `torch.save(model.state_dict(), path)` (zip format, the
/// default since PyTorch 1.6; OrderedDict or dict) or by save_state_dict(). Throws
/// CheckpointError naming the file when it is missing, not a zip-format PyTorch file, or holds
/// anything but a {str: tensor} mapping.
StateDict load_state_dict_file(const std::string& path);

/// Reads one tensor saved by Python `torch.save(tensor, path)`. Throws CheckpointError.
torch::Tensor load_tensor_file(const std::string& path);
/// Writes one tensor atomically so that Python `torch.load(path)` returns it. Throws IoError.
void save_tensor_file(const torch::Tensor& t, const std::string& path);

/// Exports the network of a noisydarts checkpoint (kind "search": the supernet weights plus
/// `alphas_normal`/`alphas_reduce` unless `with_alphas` is false; kind "train": the evaluation
/// network) to `out` with save_state_dict(). Returns the kind and the number of keys written.
std::pair<std::string, size_t> export_checkpoint(const std::string& checkpoint,
                                                 const std::string& out, bool with_alphas = true);

/// Rebuilds the search network stored in a "search" checkpoint (its configuration, dataset
/// shape and weights), in eval mode. Throws CheckpointError.
SearchNetwork load_search_network(const std::string& checkpoint);

}  // namespace noisydarts
