// libFuzzer target: our checkpoint archive check (validate_checkpoint_bytes, src/archive_check.cpp),
// then, for the inputs it accepts, LibTorch's own reader (InputArchive::load_from on the same
// bytes) and the header reads of open_checkpoint (format_version, kind).
// Input: the file's bytes. Seeds: real archives written by LibTorch (fuzz/make_checkpoint_seeds.cpp,
// run by scripts/fuzz.sh).
// A refusal must be a noisydarts::CheckpointError; LibTorch may throw std::exception (c10::Error)
// for accepted archives whose pickle it cannot read; any other exception, any crash or sanitizer
// report in our code, is a finding (LibTorch itself is not instrumented, so only its crashes and
// hangs show).
#include <cstdint>
#include <cstdlib>
#include <string>

#include <torch/torch.h>

#include "noisydarts/checkpoint.h"
#include "noisydarts/error.h"

namespace nd = noisydarts;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const char* bytes = reinterpret_cast<const char*>(data);
  try {
    nd::validate_checkpoint_bytes(bytes, size, "fuzz-input");
  } catch (const nd::CheckpointError& e) {
    const std::string m = e.what();
    if (m.rfind("checkpoint fuzz-input is damaged or not a noisydarts checkpoint: ", 0) != 0 ||
        m.find('\n') != std::string::npos)
      std::abort();  // the message must be the documented one line
    return 0;
  }
  try {
    torch::serialize::InputArchive a;
    a.load_from(bytes, size);
    (void)nd::read_int(a, "format_version");
    (void)nd::read_string(a, "kind");
  } catch (const std::exception&) {
  }
  return 0;
}
