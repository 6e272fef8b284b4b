// Writes the seed corpus of fuzz_checkpoint into the directory given as argv[1]: archives of the
// checkpoint layout written by LibTorch's OutputArchive::save_to (a header-only one, one with
// tensors and a nested module archive like `model`), small enough for libFuzzer's -max_len.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include <torch/torch.h>

#include "noisydarts/checkpoint.h"

namespace nd = noisydarts;

namespace {
void save(torch::serialize::OutputArchive& a, const std::string& path) {
  std::ostringstream ss;
  a.save_to(ss);
  std::ofstream(path, std::ios::binary) << ss.str();
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: make_checkpoint_seeds DIR\n";
    return 2;
  }
  const std::string dir = argv[1];
  {
    torch::serialize::OutputArchive a;
    nd::write_int(a, "format_version", nd::kCheckpointFormatVersion);
    nd::write_string(a, "kind", "search");
    save(a, dir + "/header.pt");
  }
  {
    torch::serialize::OutputArchive a, m;
    nd::write_int(a, "format_version", nd::kCheckpointFormatVersion);
    nd::write_string(a, "kind", "train");
    nd::write_string(a, "config", "{\"epochs\": 1}");
    m.write("weight", torch::arange(6, torch::kFloat).reshape({2, 3}));
    m.write("running_mean", torch::zeros({2}), /*is_buffer=*/true);
    a.write("model", m);
    a.write("rng_cpu", torch::arange(16, torch::kLong).to(torch::kUInt8), true);
    nd::write_int(a, "epoch", 1);
    save(a, dir + "/model.pt");
  }
  return 0;
}
