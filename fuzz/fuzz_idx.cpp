// libFuzzer target: the IDX image + label parser (load_idx's validation, on bytes in memory).
// Input: a 2-byte big-endian length L, then L bytes of image file, then the label file.
// Any exception other than noisydarts::Error, any sanitizer report or a wrong result is a bug.
#include <cstdint>
#include <cstdlib>

#include "noisydarts/data.h"
#include "noisydarts/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  size_t split = (size_t{data[0]} << 8) | data[1];
  data += 2;
  size -= 2;
  if (split > size) split = size;
  try {
    const noisydarts::Dataset d = noisydarts::parse_idx(data, split, data + split, size - split);
    // Accepted: the result must agree with the header it came from.
    const int64_t n = d.images.size(0);
    if (d.images.dim() != 4 || d.labels.size(0) != n || n < 1) std::abort();
    if (static_cast<size_t>(16 + d.images.numel()) != split) std::abort();
    if (d.num_classes < 1 || d.num_classes > 256) std::abort();
    if (d.labels.max().item<int64_t>() >= d.num_classes || d.labels.min().item<int64_t>() < 0) std::abort();
  } catch (const noisydarts::DataError&) {
    // the documented outcome for bad input
  }
  return 0;
}
