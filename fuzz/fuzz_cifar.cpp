// libFuzzer target: the CIFAR binary parser (load_cifar_bin's validation, on bytes in memory).
// Input: 1 byte choosing CIFAR-10 (even: 1 label byte, 10 classes) or CIFAR-100 (odd: 2 label
// bytes, 100 classes), then the file. Any exception other than noisydarts::DataError, any
// sanitizer report or a wrong result is a bug.
#include <cstdint>
#include <cstdlib>

#include "noisydarts/data.h"
#include "noisydarts/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool c100 = data[0] & 1;
  const int64_t classes = c100 ? 100 : 10, label_bytes = c100 ? 2 : 1;
  try {
    const noisydarts::Dataset d =
        noisydarts::parse_cifar_bin(data + 1, size - 1, classes, label_bytes, "fuzz.bin");
    const int64_t n = d.images.size(0);
    if (n < 1 || static_cast<size_t>(n * (3072 + label_bytes)) != size - 1) std::abort();
    if (d.labels.max().item<int64_t>() >= classes || d.labels.min().item<int64_t>() < 0) std::abort();
  } catch (const noisydarts::DataError&) {
  }
  return 0;
}
