// Datasets (IDX, CIFAR binary, synthetic), the deterministic search split, augmentation and the
// prefetching batch stream (SPEC 4).
//
// Conventions of this file:
//  * Every random choice uses std::mt19937_64 plus our own portable helpers (uniform_below,
//    uniform01, gaussian): the standard distributions are implementation-defined, and results
//    must not change between standard libraries.
//  * Data files are validated completely: missing, empty, wrong magic, implausible header,
//    truncated, *trailing bytes after the declared data* (rejected, because header and size
//    disagree) and inconsistent image/label counts each throw one DataError line that names the
//    file and says what to do.
#include "noisydarts/data.h"

#include "noisydarts/error.h"
#include "noisydarts/splitmix.h"

#include <sys/stat.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <utility>

namespace noisydarts {
namespace {

// ------------------------------------------------------------------------------------------
// Portable randomness
// ------------------------------------------------------------------------------------------

/// Order-sensitive hash of two 64-bit values (seed derivation).
uint64_t mix(uint64_t a, uint64_t b) { return splitmix64(splitmix64(a) ^ (b + 0x632be59bd9b4e019ULL)); }

// Domain tags, so that streams derived from one user seed never coincide.
constexpr uint64_t kTagPermutation = 0x7065726d75746174ULL;  // "permutat"
constexpr uint64_t kTagSample = 0x73616d706c652121ULL;       // "sample!!"
constexpr uint64_t kTagSynthetic = 0x73796e7468657469ULL;    // "syntheti"
constexpr uint64_t kTagTemplates = 0x74656d706c617465ULL;    // "template"

/// Uniform integer in [0, n), n > 0, by rejection (no modulo bias, portable).
uint64_t uniform_below(std::mt19937_64& g, uint64_t n) {
  const uint64_t limit = std::numeric_limits<uint64_t>::max() -
                         std::numeric_limits<uint64_t>::max() % n;  // a multiple of n
  uint64_t x;
  do x = g(); while (x >= limit);
  return x % n;
}

/// Uniform double in [0, 1).
double uniform01(std::mt19937_64& g) { return static_cast<double>(g() >> 11) * 0x1.0p-53; }

/// Standard normal variate (Box-Muller, one value per call for simplicity).
double gaussian(std::mt19937_64& g) {
  const double u1 = 1.0 - uniform01(g);  // (0, 1]
  const double u2 = uniform01(g);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

/// A permutation of [0, n) (Fisher-Yates) determined by `seed`.
std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(static_cast<size_t>(std::max<int64_t>(n, 0)));
  std::iota(p.begin(), p.end(), int64_t{0});
  std::mt19937_64 g(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(uniform_below(g, static_cast<uint64_t>(i) + 1));
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(j)]);
  }
  return p;
}

// ------------------------------------------------------------------------------------------
// Files
// ------------------------------------------------------------------------------------------

constexpr const char* kIdxHint =
    " (install Debian package dataset-fashion-mnist or pass --data-dir)";
constexpr const char* kMnistHint =
    " (put the MNIST IDX files (train-images-idx3-ubyte[.gz] ...) there or pass --data-dir)";
constexpr const char* kCifarHint =
    " (extract the CIFAR binary version there or pass --data-dir)";
constexpr const char* kRedownload = "; re-download it or pass --data-dir with a good copy";

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

/// A data file opened for sequential reading; gzip (magic 1f 8b) is decompressed on the fly.
class InFile {
 public:
  InFile(const std::string& path, const char* hint) : path_(path) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
      const int e = errno;
      throw DataError("cannot open " + path + ": " + std::strerror(e) + hint);
    }
    if (S_ISDIR(st.st_mode))
      throw DataError("cannot read " + path + ": it is a directory, not a data file" + hint);
    if (st.st_size == 0) throw DataError("cannot read " + path + ": the file is empty" + kRedownload);
    size_ = static_cast<uint64_t>(st.st_size);
    f_ = std::fopen(path.c_str(), "rb");
    if (!f_) {
      const int e = errno;
      throw DataError("cannot open " + path + ": " + std::strerror(e) + hint);
    }
    unsigned char magic[2] = {0, 0};
    gz_ = std::fread(magic, 1, 2, f_) == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
    if (gz_) {
      std::fclose(f_);
      f_ = nullptr;
      g_ = gzopen(path.c_str(), "rb");
      if (!g_) {
        const int e = errno;
        throw DataError("cannot open " + path + ": " + std::strerror(e) + hint);
      }
      gzbuffer(g_, 1 << 18);
    } else {
      std::rewind(f_);
    }
  }
  /// A file's bytes already in memory (raw IDX/CIFAR data, not gzip); `name` is used in
  /// messages in place of a path. The bytes must outlive the object.
  InFile(const std::string& name, const uint8_t* data, size_t size) : path_(name), size_(size) {
    if (size == 0) throw DataError("cannot read " + name + ": the file is empty" + kRedownload);
    mem_ = data;
  }
  ~InFile() {
    if (f_) std::fclose(f_);
    if (g_) gzclose(g_);
  }
  InFile(const InFile&) = delete;
  InFile& operator=(const InFile&) = delete;

  const std::string& path() const { return path_; }
  bool gzip() const { return gz_; }
  /// Size on disk (for raw files, the exact data size).
  uint64_t disk_size() const { return size_; }

  /// Reads up to n bytes; fewer only at the end of the data. Throws DataError on read errors.
  size_t read(void* dst, size_t n) {
    auto* p = static_cast<unsigned char*>(dst);
    size_t total = 0;
    while (total < n) {
      const size_t want = std::min<size_t>(n - total, size_t{1} << 30);
      if (mem_) {
        const size_t r = std::min<size_t>(want, static_cast<size_t>(size_ - mem_pos_));
        if (r > 0) std::memcpy(p + total, mem_ + mem_pos_, r);
        mem_pos_ += r;
        total += r;
        if (r < want) break;
      } else if (gz_) {
        const int r = gzread(g_, p + total, static_cast<unsigned>(want));
        if (r < 0) {
          int err = 0;
          const char* msg = gzerror(g_, &err);
          std::string why = msg ? msg : "unknown error";
          if (why.rfind(path_ + ": ", 0) == 0) why.erase(0, path_.size() + 2);  // zlib adds it
          throw DataError(path_ + ": corrupt gzip data (" + why + ")" + kRedownload);
        }
        if (r == 0) break;  // end of data (a gzip stream cut short also ends here)
        total += static_cast<size_t>(r);
      } else {
        const size_t r = std::fread(p + total, 1, want, f_);
        total += r;
        if (r < want) {
          if (std::ferror(f_)) {
            const int e = errno;
            throw DataError("cannot read " + path_ + ": " + std::strerror(e) + kRedownload);
          }
          break;
        }
      }
    }
    return total;
  }

  /// Reads exactly `bytes` of payload described by `what` (for messages); rejects short data
  /// and any bytes after it. Memory grows with the data actually present, so a lying header in
  /// a small gzip file cannot make us allocate gigabytes up front.
  std::vector<uint8_t> read_payload(uint64_t header_bytes, uint64_t bytes, const std::string& what) {
    if (!gz_ && disk_size() != header_bytes + bytes) {
      // Raw file: the size on disk tells everything before we allocate.
      if (disk_size() < header_bytes + bytes)
        throw DataError(path_ + ": truncated: its header declares " + what + " (" +
                        std::to_string(bytes) + " bytes of data) but only " +
                        std::to_string(disk_size() - header_bytes) + " bytes follow" + kRedownload);
      throw DataError(path_ + ": unexpected bytes after the " + what + " its header declares (" +
                      std::to_string(disk_size() - header_bytes - bytes) + " extra)" + kRedownload);
    }
    std::vector<uint8_t> buf;
    if (!gz_) buf.reserve(bytes);
    constexpr uint64_t kChunk = uint64_t{16} << 20;
    uint64_t got = 0;
    while (got < bytes) {
      const uint64_t want = std::min(kChunk, bytes - got);
      buf.resize(static_cast<size_t>(got + want));
      const size_t r = read(buf.data() + got, static_cast<size_t>(want));
      got += r;
      if (r < want) break;
    }
    if (got < bytes)
      throw DataError(path_ + ": truncated: its header declares " + what + " (" +
                      std::to_string(bytes) + " bytes of data) but only " + std::to_string(got) +
                      " bytes follow" + kRedownload);
    unsigned char extra = 0;
    if (read(&extra, 1) != 0)
      throw DataError(path_ + ": unexpected bytes after the " + what + " its header declares" +
                      kRedownload);
    return buf;
  }

 private:
  std::string path_;
  FILE* f_ = nullptr;
  gzFile g_ = nullptr;
  bool gz_ = false;
  uint64_t size_ = 0;
  const uint8_t* mem_ = nullptr;  // memory mode: the data, size_ bytes
  uint64_t mem_pos_ = 0;
};

uint32_t read_be32(InFile& in, const char* field) {
  unsigned char b[4];
  if (in.read(b, 4) != 4)
    throw DataError(in.path() + ": truncated: the file ends inside its IDX header (" + field + ")" +
                    kRedownload);
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
}

void check_magic(InFile& in, uint32_t expected, const char* kind) {
  const uint32_t magic = read_be32(in, "magic number");
  if (magic != expected)
    throw DataError(in.path() + ": not an IDX " + kind + " file (magic number " +
                    std::to_string(magic) + ", expected " + std::to_string(expected) +
                    "); check the file name or --data-dir");
}

/// A tensor that owns `buf` without copying it.
torch::Tensor tensor_from(std::vector<uint8_t>&& buf, at::IntArrayRef sizes) {
  auto* owner = new std::vector<uint8_t>(std::move(buf));
  return torch::from_blob(owner->data(), sizes, [owner](void*) { delete owner; },
                          torch::TensorOptions().dtype(torch::kUInt8));
}

constexpr uint32_t kMaxCount = 10'000'000;
constexpr uint32_t kMaxSide = 4096;

/// Parses an IDX image file and (opened only once the image header is valid) its label file.
Dataset load_idx_impl(InFile& im, const std::function<std::unique_ptr<InFile>()>& open_labels) {
  const std::string& images_path = im.path();
  check_magic(im, 2051, "image (unsigned byte, 3 dimensions)");
  const uint32_t n = read_be32(im, "image count");
  const uint32_t rows = read_be32(im, "rows");
  const uint32_t cols = read_be32(im, "columns");
  if (n == 0 || n > kMaxCount || rows == 0 || rows > kMaxSide || cols == 0 || cols > kMaxSide)
    throw DataError(images_path + ": implausible IDX header " + std::to_string(n) + " images of " +
                    std::to_string(rows) + "x" + std::to_string(cols) +
                    " (expected 1.." + std::to_string(kMaxCount) + " images of at most " +
                    std::to_string(kMaxSide) + "x" + std::to_string(kMaxSide) + "); corrupt file" +
                    kRedownload);

  const std::unique_ptr<InFile> lbp = open_labels();
  InFile& lb = *lbp;
  const std::string& labels_path = lb.path();
  check_magic(lb, 2049, "label (unsigned byte, 1 dimension)");
  const uint32_t m = read_be32(lb, "label count");
  if (m != n)
    throw DataError(images_path + " has " + std::to_string(n) + " images but " + labels_path +
                    " has " + std::to_string(m) + " labels; use matching image and label files");

  const uint64_t pixels = uint64_t{n} * rows * cols;
  auto img = im.read_payload(16, pixels,
                             std::to_string(n) + " images of " + std::to_string(rows) + "x" +
                                 std::to_string(cols));
  auto lab = lb.read_payload(8, n, std::to_string(n) + " labels");

  Dataset d;
  d.images = tensor_from(std::move(img), {int64_t{n}, 1, int64_t{rows}, int64_t{cols}});
  d.labels = torch::empty({int64_t{n}}, torch::kLong);
  auto* y = d.labels.data_ptr<int64_t>();
  int64_t max_label = 0;
  for (uint32_t i = 0; i < n; ++i) {
    y[i] = lab[i];
    max_label = std::max<int64_t>(max_label, lab[i]);
  }
  d.num_classes = max_label + 1;
  compute_normalization(d);
  return d;
}

Dataset load_idx_files(const std::string& images_path, const std::string& labels_path,
                       const char* hint) {
  InFile im(images_path, hint);
  return load_idx_impl(im, [&] { return std::make_unique<InFile>(labels_path, hint); });
}

/// `dir/base.gz` if present, else `dir/base`, else (MNIST's alternative spelling) the same
/// with ".idx" instead of "-idx"; the .gz name when none exists (so the error names it).
std::string find_idx(const std::string& dir, const std::string& base) {
  std::vector<std::string> names = {base + ".gz", base};
  std::string alt = base;
  const auto k = alt.find("-idx");
  if (k != std::string::npos) {
    alt[k] = '.';
    names.push_back(alt + ".gz");
    names.push_back(alt);
  }
  for (const auto& nme : names)
    if (file_exists(dir + "/" + nme)) return dir + "/" + nme;
  return dir + "/" + names.front();
}

std::string join(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

/// First of `dir`, `dir/sub` that holds `probe`; `dir` when neither does.
std::string find_dir(const std::string& dir, const std::string& sub, const std::string& probe) {
  if (file_exists(join(dir, probe))) return dir;
  if (file_exists(join(join(dir, sub), probe))) return join(dir, sub);
  return dir;
}

void check_images(const Dataset& d, const char* who) {
  if (!d.images.defined() || d.images.dim() != 4 || d.images.scalar_type() != torch::kUInt8)
    throw UsageError(std::string(who) + ": dataset images must be a uint8 [N, C, H, W] tensor");
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Shapes and loading
// ------------------------------------------------------------------------------------------

DataShape dataset_shape(const std::string& name) {
  if (name == "fashion-mnist" || name == "mnist" || name == "synthetic") return {1, 28, 28, 10};
  if (name == "cifar10") return {3, 32, 32, 10};
  if (name == "cifar100") return {3, 32, 32, 100};
  if (name == "imagenet") return {3, 224, 224, 1000};
  if (name == "folder")
    throw UsageError("the shape of dataset folder depends on its files: give its directory and image size");
  throw UsageError("--dataset: unknown dataset '" + name +
                   "' (choose fashion-mnist, mnist, cifar10, cifar100, folder, synthetic or imagenet)");
}

std::string default_data_dir(const std::string& name) {
  if (name == "fashion-mnist") return "/usr/share/datasets/fashion-mnist";
  if (name == "mnist") return "/usr/share/datasets/mnist";
  return "";
}

Dataset load_idx(const std::string& images_path, const std::string& labels_path) {
  return load_idx_files(images_path, labels_path, kIdxHint);
}

Dataset parse_idx(const uint8_t* images, size_t images_size, const uint8_t* labels,
                  size_t labels_size, const std::string& images_name,
                  const std::string& labels_name) {
  InFile im(images_name, images, images_size);
  return load_idx_impl(im, [&] { return std::make_unique<InFile>(labels_name, labels, labels_size); });
}

namespace {

constexpr int64_t kCifarPixels = 3 * 32 * 32;

void check_cifar_args(int64_t num_classes, int64_t label_bytes) {
  if (num_classes < 1 || num_classes > 256 || label_bytes < 1 || label_bytes > 16)
    throw UsageError("load_cifar_bin: num_classes must be in 1..256 and label_bytes in 1..16");
}

/// Validates one CIFAR binary file's bytes (non-empty, whole records, labels < num_classes);
/// returns its record count. `name` is used in messages.
int64_t check_cifar_records(const uint8_t* data, size_t size, const std::string& name,
                            int64_t num_classes, int64_t label_bytes) {
  const int64_t record = label_bytes + kCifarPixels;
  if (size == 0) throw DataError("cannot read " + name + ": the file is empty" + kRedownload);
  if (size % static_cast<size_t>(record) != 0)
    throw DataError(name + ": size " + std::to_string(size) +
                    " bytes is not a multiple of the CIFAR record size " +
                    std::to_string(record) + " (" + std::to_string(label_bytes) +
                    " label bytes + 3072 pixels): truncated or not this CIFAR variant" +
                    kRedownload);
  const int64_t recs = static_cast<int64_t>(size) / record;
  for (int64_t r = 0; r < recs; ++r) {
    const int64_t label = data[static_cast<size_t>(r * record + label_bytes - 1)];
    if (label >= num_classes)
      throw DataError(name + ": record " + std::to_string(r) + " has label " +
                      std::to_string(label) + ", expected < " + std::to_string(num_classes) +
                      " (wrong CIFAR variant or corrupt file?)" + kRedownload);
  }
  return recs;
}

/// A dataset from validated CIFAR buffers (check_cifar_records passed on each).
Dataset cifar_from_buffers(const std::vector<std::pair<const uint8_t*, size_t>>& bufs,
                           int64_t num_classes, int64_t label_bytes) {
  const int64_t record = label_bytes + kCifarPixels;
  int64_t total = 0;
  for (const auto& b : bufs) total += static_cast<int64_t>(b.second) / record;
  Dataset d;
  d.images = torch::empty({total, 3, 32, 32}, torch::kUInt8);
  d.labels = torch::empty({total}, torch::kLong);
  auto* x = d.images.data_ptr<uint8_t>();
  auto* y = d.labels.data_ptr<int64_t>();
  int64_t i = 0;
  for (const auto& b : bufs) {
    const int64_t recs = static_cast<int64_t>(b.second) / record;
    for (int64_t r = 0; r < recs; ++r, ++i) {
      const uint8_t* rec = b.first + r * record;
      y[i] = rec[label_bytes - 1];
      std::memcpy(x + i * kCifarPixels, rec + label_bytes, kCifarPixels);
    }
  }
  d.num_classes = num_classes;
  compute_normalization(d);
  return d;
}

}  // namespace

Dataset load_cifar_bin(const std::vector<std::string>& files, int64_t num_classes,
                       int64_t label_bytes) {
  if (files.empty()) throw UsageError("load_cifar_bin: no CIFAR files given");
  check_cifar_args(num_classes, label_bytes);
  std::vector<std::vector<uint8_t>> raw;
  for (const auto& path : files) {
    InFile in(path, kCifarHint);
    std::vector<uint8_t> buf;
    if (!in.gzip()) {
      buf.resize(in.disk_size());
      if (in.read(buf.data(), buf.size()) != buf.size())
        throw DataError("cannot read " + path + ": the file shrank while reading" + kRedownload);
    } else {
      constexpr size_t kChunk = size_t{16} << 20;
      size_t got = 0;
      for (;;) {
        buf.resize(got + kChunk);
        const size_t r = in.read(buf.data() + got, kChunk);
        got += r;
        if (r < kChunk) break;
      }
      buf.resize(got);
    }
    check_cifar_records(buf.data(), buf.size(), path, num_classes, label_bytes);
    raw.push_back(std::move(buf));
  }
  std::vector<std::pair<const uint8_t*, size_t>> bufs;
  for (const auto& b : raw) bufs.emplace_back(b.data(), b.size());
  return cifar_from_buffers(bufs, num_classes, label_bytes);
}

Dataset parse_cifar_bin(const uint8_t* data, size_t size, int64_t num_classes,
                        int64_t label_bytes, const std::string& name) {
  check_cifar_args(num_classes, label_bytes);
  check_cifar_records(data, size, name, num_classes, label_bytes);
  return cifar_from_buffers({{data, size}}, num_classes, label_bytes);
}

Dataset make_synthetic(int64_t n, int64_t channels, int64_t size, int64_t classes, uint64_t seed) {
  if (n < 1 || channels < 1 || channels > 64 || size < 1 || size > 4096 || classes < 1 ||
      classes > 100000)
    throw UsageError("make_synthetic: need n >= 1, 1 <= channels <= 64, 1 <= size <= 4096, "
                     "1 <= classes <= 100000");
  // Class templates depend only on the geometry (not on `seed`), so a train and a test set
  // drawn with different seeds describe the same task. Each template is a random 4x4 grid per
  // channel in [-1, 1], bilinearly upsampled: a low-frequency pattern a small CNN learns fast.
  const int64_t grid = std::min<int64_t>(4, size);
  const int64_t hw = size * size;
  std::vector<float> templ(static_cast<size_t>(classes * channels * hw));
  {
    std::mt19937_64 g(mix(mix(kTagTemplates, static_cast<uint64_t>(channels)),
                          mix(static_cast<uint64_t>(size), static_cast<uint64_t>(classes))));
    std::vector<double> cells(static_cast<size_t>(grid * grid));
    for (int64_t k = 0; k < classes * channels; ++k) {
      for (auto& v : cells) v = 2.0 * uniform01(g) - 1.0;
      float* t = templ.data() + k * hw;
      for (int64_t yy = 0; yy < size; ++yy) {
        const double u = size > 1 ? double(yy) * double(grid - 1) / double(size - 1) : 0.0;
        const int64_t y0 = std::min<int64_t>(static_cast<int64_t>(u), grid - 1);
        const int64_t y1 = std::min<int64_t>(y0 + 1, grid - 1);
        const double fy = u - double(y0);
        for (int64_t xx = 0; xx < size; ++xx) {
          const double v = size > 1 ? double(xx) * double(grid - 1) / double(size - 1) : 0.0;
          const int64_t x0 = std::min<int64_t>(static_cast<int64_t>(v), grid - 1);
          const int64_t x1 = std::min<int64_t>(x0 + 1, grid - 1);
          const double fx = v - double(x0);
          const double top = cells[y0 * grid + x0] * (1 - fx) + cells[y0 * grid + x1] * fx;
          const double bot = cells[y1 * grid + x0] * (1 - fx) + cells[y1 * grid + x1] * fx;
          t[yy * size + xx] = static_cast<float>(top * (1 - fy) + bot * fy);
        }
      }
    }
  }
  Dataset d;
  d.name = "synthetic";
  d.num_classes = classes;
  d.images = torch::empty({n, channels, size, size}, torch::kUInt8);
  d.labels = torch::empty({n}, torch::kLong);
  auto* x = d.images.data_ptr<uint8_t>();
  auto* y = d.labels.data_ptr<int64_t>();
  // Balanced labels in a seeded order; per image a contrast factor and pixel noise.
  const auto order = permutation(n, mix(seed, kTagSynthetic));
  std::mt19937_64 g(mix(mix(seed, kTagSynthetic), 1));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = order[static_cast<size_t>(i)] % classes;
    y[i] = c;
    const double contrast = 0.8 + 0.4 * uniform01(g);
    const double offset = 12.0 * (2.0 * uniform01(g) - 1.0);
    uint8_t* out = x + i * channels * hw;
    const float* t = templ.data() + c * channels * hw;
    for (int64_t p = 0; p < channels * hw; ++p) {
      const double v = 128.0 + offset + 80.0 * contrast * t[p] + 32.0 * gaussian(g);
      out[p] = static_cast<uint8_t>(std::lround(std::clamp(v, 0.0, 255.0)));
    }
  }
  compute_normalization(d);
  return d;
}

void compute_normalization(Dataset& d) {
  check_images(d, "compute_normalization");
  const int64_t n = d.images.size(0), c = d.images.size(1);
  const int64_t hw = d.images.size(2) * d.images.size(3);
  d.mean.assign(static_cast<size_t>(c), 0.0f);
  d.std.assign(static_cast<size_t>(c), 1.0f);
  if (n == 0 || hw == 0) return;
  const torch::Tensor img = d.images.contiguous();
  const uint8_t* x = img.data_ptr<uint8_t>();
  // Exact integer histograms: the result does not depend on summation order.
  std::vector<uint64_t> hist(static_cast<size_t>(c * 256), 0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t ch = 0; ch < c; ++ch) {
      uint64_t* h = hist.data() + ch * 256;
      const uint8_t* p = x + (i * c + ch) * hw;
      for (int64_t k = 0; k < hw; ++k) ++h[p[k]];
    }
  for (int64_t ch = 0; ch < c; ++ch) {
    long double s = 0, s2 = 0;
    const uint64_t* h = hist.data() + ch * 256;
    for (int v = 0; v < 256; ++v) {
      s += static_cast<long double>(h[v]) * v;
      s2 += static_cast<long double>(h[v]) * v * v;
    }
    const long double cnt = static_cast<long double>(n) * hw;
    const long double mean = s / cnt / 255.0L;
    const long double var = std::max<long double>(s2 / cnt / (255.0L * 255.0L) - mean * mean, 0);
    d.mean[static_cast<size_t>(ch)] = static_cast<float>(mean);
    d.std[static_cast<size_t>(ch)] = static_cast<float>(std::sqrt(var));
  }
}

Dataset subset(const Dataset& d, int64_t n, uint64_t seed) {
  if (n <= 0 || n >= d.size()) return d;
  auto p = permutation(d.size(), seed);
  p.resize(static_cast<size_t>(n));
  std::sort(p.begin(), p.end());  // keep the chosen examples in their original order
  const auto idx = torch::tensor(p, torch::kLong);
  Dataset out = d;  // name, num_classes and the normalisation statistics are kept
  out.images = d.images.index_select(0, idx).contiguous();
  out.labels = d.labels.index_select(0, idx).contiguous();
  return out;
}

std::pair<std::vector<int64_t>, std::vector<int64_t>> split_indices(int64_t n, double portion,
                                                                    uint64_t seed) {
  if (!(portion > 0.0 && portion < 1.0))
    throw UsageError("train portion must be strictly between 0 and 1, got " +
                     std::to_string(portion));
  if (n < 0) throw UsageError("split_indices: negative size " + std::to_string(n));
  auto k = static_cast<int64_t>(std::floor(static_cast<double>(n) * portion));
  if (n >= 2) k = std::clamp<int64_t>(k, 1, n - 1);  // both halves non-empty
  if (n == 1) k = 1;                                   // a single example goes to the weights
  const auto p = permutation(n, mix(seed, kTagPermutation));
  std::vector<int64_t> a(p.begin(), p.begin() + k), b(p.begin() + k, p.end());
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  return {std::move(a), std::move(b)};
}

DatasetPair load_dataset(const std::string& name, const std::string& dir, uint64_t seed,
                         int64_t synthetic_train) {
  LoadOptions opt;
  opt.seed = seed;
  opt.synthetic_train = synthetic_train;
  return load_dataset(name, dir, opt);
}

DatasetPair load_dataset(const std::string& name, const std::string& dir, const LoadOptions& opt) {
  const uint64_t seed = opt.seed;
  const int64_t synthetic_train = opt.synthetic_train;
  if (name == "folder") {  // src/image_folder.cpp
    DatasetPair out = load_folder_dataset(dir, opt);
    out.train.name = out.test.name = name;
    return out;
  }
  const DataShape shape = dataset_shape(name);  // UsageError for unknown names
  DatasetPair out;
  if (name == "synthetic") {
    if (synthetic_train < 1)
      throw UsageError("synthetic dataset size must be >= 1, got " +
                       std::to_string(synthetic_train));
    out.train = make_synthetic(synthetic_train, shape.channels, shape.height, shape.classes,
                               mix(seed, 1));
    out.test = make_synthetic(std::max<int64_t>(1, synthetic_train / 5), shape.channels,
                              shape.height, shape.classes, mix(seed, 2));
  } else if (name == "imagenet") {
    throw UsageError("dataset imagenet cannot be loaded for search/training yet (only its shape "
                     "is known); use fashion-mnist, mnist, cifar10, cifar100, folder or synthetic");
  } else {
    const std::string d = dir.empty() ? default_data_dir(name) : dir;
    if (d.empty())
      throw UsageError("dataset " + name + " has no default location; pass --data-dir");
    if (name == "fashion-mnist" || name == "mnist") {
      const char* hint = name == "mnist" ? kMnistHint : kIdxHint;
      out.train = load_idx_files(find_idx(d, "train-images-idx3-ubyte"),
                                 find_idx(d, "train-labels-idx1-ubyte"), hint);
      out.test = load_idx_files(find_idx(d, "t10k-images-idx3-ubyte"),
                                find_idx(d, "t10k-labels-idx1-ubyte"), hint);
      // Classes: whatever the labels use (10 for MNIST and Fashion-MNIST), same for both sets.
      const int64_t k = std::max(out.train.num_classes, out.test.num_classes);
      out.train.num_classes = out.test.num_classes = k;
    } else if (name == "cifar10") {
      const std::string base = find_dir(d, "cifar-10-batches-bin", "data_batch_1.bin");
      std::vector<std::string> train;
      for (int i = 1; i <= 5; ++i) train.push_back(join(base, "data_batch_" + std::to_string(i) + ".bin"));
      out.train = load_cifar_bin(train, 10, 1);
      out.test = load_cifar_bin({join(base, "test_batch.bin")}, 10, 1);
    } else {  // cifar100: 1 coarse + 1 fine label byte; the fine label is used
      const std::string base = find_dir(d, "cifar-100-binary", "train.bin");
      out.train = load_cifar_bin({join(base, "train.bin")}, 100, 2);
      out.test = load_cifar_bin({join(base, "test.bin")}, 100, 2);
    }
  }
  out.train.name = out.test.name = name;
  out.test.mean = out.train.mean;  // the test set is normalised with the training statistics
  out.test.std = out.train.std;
  return out;
}

// ------------------------------------------------------------------------------------------
// BatchStream
// ------------------------------------------------------------------------------------------

struct BatchStream::Impl {
  // Immutable after construction (read by the workers without locking).
  torch::Tensor images, labels;  // contiguous uint8 [N,C,H,W] and int64 [N]
  const uint8_t* img = nullptr;
  const int64_t* lab = nullptr;
  int64_t c = 0, h = 0, w = 0;
  std::vector<float> lut;  // [C * 256]: the (normalised) float value of each raw byte
  int64_t batches = 0;     // per pass
  std::shared_ptr<const std::vector<int64_t>> fixed_order;  // when not shuffling

  // Pass orders (dataset indices in visiting order), the last few passes cached.
  std::mutex order_mu;
  std::deque<std::pair<int64_t, std::shared_ptr<const std::vector<int64_t>>>> orders;

  // Worker pool.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> tasks;
  bool stopping = false;
  std::vector<std::thread> threads;

  ~Impl() { shutdown(); }

  void start(int n) {
    for (int i = 0; i < n; ++i)
      threads.emplace_back([this] {
        for (;;) {
          std::function<void()> task;
          {
            std::unique_lock<std::mutex> lk(mu);
            cv.wait(lk, [this] { return stopping || !tasks.empty(); });
            if (stopping) return;
            task = std::move(tasks.front());
            tasks.pop_front();
          }
          task();  // a packaged_task: exceptions end up in its future
        }
      });
  }
  void submit(std::function<void()> f) {
    {
      std::lock_guard<std::mutex> lk(mu);
      tasks.push_back(std::move(f));
    }
    cv.notify_one();
  }
  /// Drops tasks not yet started (their futures report broken_promise; nobody waits on them).
  void cancel_pending() {
    std::deque<std::function<void()>> dropped;
    {
      std::lock_guard<std::mutex> lk(mu);
      dropped.swap(tasks);
    }
  }
  /// Drops pending tasks and waits for running ones.
  void shutdown() {
    {
      std::lock_guard<std::mutex> lk(mu);
      stopping = true;
      tasks.clear();
    }
    cv.notify_all();
    for (auto& t : threads)
      if (t.joinable()) t.join();
    threads.clear();
  }
};

namespace {
/// The rank's [start, start+count) positions of global batch `b` in a pass of n examples.
std::pair<int64_t, int64_t> batch_slice(int64_t n, int64_t batch_size, int rank, int world,
                                        int64_t b) {
  const int64_t global = batch_size * world;
  const int64_t start = b * global;
  const int64_t size = std::min(global, n - start);
  if (size == global) return {start + rank * batch_size, batch_size};
  // Partial final batch: split as evenly as possible (every rank gets >= 1, see batches_per_pass).
  const int64_t base = size / world, extra = size % world;
  return {start + rank * base + std::min<int64_t>(rank, extra), base + (rank < extra ? 1 : 0)};
}
}  // namespace

BatchStream::BatchStream(const Dataset& data, std::vector<int64_t> indices, Options opt)
    : data_(data), indices_(std::move(indices)), opt_(opt), impl_(std::make_unique<Impl>()) {
  check_images(data_, "BatchStream");
  if (!data_.labels.defined() || data_.labels.dim() != 1 ||
      data_.labels.size(0) != data_.images.size(0))
    throw UsageError("BatchStream: dataset labels must be a [N] tensor matching the images");
  if (opt_.batch_size < 1) throw UsageError("batch size must be >= 1");
  if (opt_.workers < 1) throw UsageError("data loader workers must be >= 1");
  if (opt_.prefetch < 0) throw UsageError("data loader prefetch must be >= 0");
  if (opt_.world < 1 || opt_.rank < 0 || opt_.rank >= opt_.world)
    throw UsageError("BatchStream: rank " + std::to_string(opt_.rank) + " is not in [0, world " +
                     std::to_string(opt_.world) + ")");
  if (opt_.augment.crop_padding < 0 || opt_.augment.cutout < 0)
    throw UsageError("crop padding and cutout length must be >= 0");
  const int64_t n_data = data_.size();
  for (const int64_t i : indices_)
    if (i < 0 || i >= n_data)
      throw UsageError("BatchStream: index " + std::to_string(i) + " outside the dataset of " +
                       std::to_string(n_data) + " examples");
  const auto n = static_cast<int64_t>(indices_.size());
  if (n > 0 && n < opt_.world)
    throw UsageError("only " + std::to_string(n) + " examples for " +
                     std::to_string(opt_.world) + " ranks: every rank needs at least one");

  Impl& m = *impl_;
  m.images = data_.images.contiguous();
  m.labels = data_.labels.to(torch::kLong).contiguous();
  m.img = m.images.data_ptr<uint8_t>();
  m.lab = m.labels.data_ptr<int64_t>();
  m.c = data_.images.size(1);
  m.h = data_.images.size(2);
  m.w = data_.images.size(3);

  std::vector<float> mean = data_.mean, sd = data_.std;
  if (opt_.augment.normalize && (mean.size() != size_t(m.c) || sd.size() != size_t(m.c))) {
    Dataset tmp;
    tmp.images = m.images;
    compute_normalization(tmp);
    mean = tmp.mean;
    sd = tmp.std;
  }
  m.lut.resize(static_cast<size_t>(m.c * 256));
  for (int64_t ch = 0; ch < m.c; ++ch)
    for (int v = 0; v < 256; ++v) {
      float x = static_cast<float>(v) / 255.0f;
      if (opt_.augment.normalize) {
        const float s = sd[size_t(ch)] > 1e-8f ? sd[size_t(ch)] : 1.0f;
        x = (x - mean[size_t(ch)]) / s;
      }
      m.lut[size_t(ch * 256 + v)] = x;
    }

  const int64_t global = opt_.batch_size * opt_.world;
  if (n == 0) {
    m.batches = 0;
  } else if (opt_.drop_last) {
    m.batches = std::max<int64_t>(n / global, 1);  // fewer than one global batch: keep it
  } else {
    // A final partial batch only when it gives every rank at least one example; otherwise its
    // (fewer than `world`) examples are skipped in that pass.
    m.batches = n / global + ((n % global) >= opt_.world ? 1 : 0);
  }
  if (!opt_.shuffle) m.fixed_order = std::make_shared<const std::vector<int64_t>>(indices_);
  if (opt_.prefetch > 0 && n > 0) m.start(opt_.workers);
}

BatchStream::~BatchStream() {
  if (impl_) impl_->shutdown();  // pending batches dropped, running ones finished
  queue_.clear();
}

int64_t BatchStream::batches_per_pass() const { return impl_->batches; }

Batch BatchStream::make_batch(StreamPosition p) const {
  Impl& m = *impl_;
  std::shared_ptr<const std::vector<int64_t>> order = m.fixed_order;
  if (!order) {
    std::lock_guard<std::mutex> lk(m.order_mu);
    for (const auto& e : m.orders)
      if (e.first == p.pass) order = e.second;
    if (!order) {
      const auto perm = permutation(static_cast<int64_t>(indices_.size()),
                                    mix(mix(opt_.seed, kTagPermutation), uint64_t(p.pass)));
      auto v = std::make_shared<std::vector<int64_t>>(perm.size());
      for (size_t i = 0; i < perm.size(); ++i) (*v)[i] = indices_[size_t(perm[i])];
      order = v;
      m.orders.emplace_back(p.pass, order);
      if (m.orders.size() > 3) m.orders.pop_front();
    }
  }
  const auto [start, count] = batch_slice(static_cast<int64_t>(indices_.size()), opt_.batch_size,
                                          opt_.rank, opt_.world, p.batch);
  const int64_t c = m.c, h = m.h, w = m.w, chw = c * h * w;
  Batch b;
  b.x = torch::empty({count, c, h, w}, torch::kFloat);
  b.y = torch::empty({count}, torch::kLong);
  float* out = b.x.data_ptr<float>();
  int64_t* y = b.y.data_ptr<int64_t>();
  const AugmentOptions& a = opt_.augment;
  const bool random = a.crop_padding > 0 || a.flip || a.cutout > 0;
  const uint64_t pass_seed = mix(mix(opt_.seed, kTagSample), uint64_t(p.pass));

  for (int64_t i = 0; i < count; ++i) {
    const int64_t pos = start + i;  // position within the pass: same on every rank/worker
    const int64_t idx = (*order)[size_t(pos)];
    y[i] = m.lab[idx];
    const uint8_t* src = m.img + idx * chw;
    float* dst = out + i * chw;
    int64_t dy = 0, dx = 0;
    bool flip = false;
    std::mt19937_64 g;
    if (random) g.seed(mix(pass_seed, uint64_t(pos)));
    if (a.crop_padding > 0) {  // offset of the crop window in the zero-padded image, minus pad
      dy = int64_t(uniform_below(g, uint64_t(2 * a.crop_padding + 1))) - a.crop_padding;
      dx = int64_t(uniform_below(g, uint64_t(2 * a.crop_padding + 1))) - a.crop_padding;
    }
    if (a.flip) flip = (g() >> 63) != 0;
    // out(y, x) = padded-crop(y, x') with x' = flipped x; pixels from the padding are raw 0.
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* lut = m.lut.data() + ch * 256;
      const float zero = lut[0];
      for (int64_t yy = 0; yy < h; ++yy) {
        float* orow = dst + (ch * h + yy) * w;
        const int64_t sy = yy + dy;
        if (sy < 0 || sy >= h) {
          std::fill(orow, orow + w, zero);
          continue;
        }
        const uint8_t* srow = src + (ch * h + sy) * w;
        if (!flip) {
          for (int64_t xx = 0; xx < w; ++xx) {
            const int64_t sx = xx + dx;
            orow[xx] = (sx >= 0 && sx < w) ? lut[srow[sx]] : zero;
          }
        } else {
          for (int64_t xx = 0; xx < w; ++xx) {
            const int64_t sx = (w - 1 - xx) + dx;
            orow[xx] = (sx >= 0 && sx < w) ? lut[srow[sx]] : zero;
          }
        }
      }
    }
    if (a.cutout > 0) {  // DARTS' Cutout: centre uniform, square clipped at the borders
      const int64_t cy = int64_t(uniform_below(g, uint64_t(h)));
      const int64_t cx = int64_t(uniform_below(g, uint64_t(w)));
      const int64_t y1 = std::clamp<int64_t>(cy - a.cutout / 2, 0, h);
      const int64_t y2 = std::clamp<int64_t>(cy + a.cutout / 2, 0, h);
      const int64_t x1 = std::clamp<int64_t>(cx - a.cutout / 2, 0, w);
      const int64_t x2 = std::clamp<int64_t>(cx + a.cutout / 2, 0, w);
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t yy = y1; yy < y2; ++yy)
          std::fill(dst + (ch * h + yy) * w + x1, dst + (ch * h + yy) * w + x2, 0.0f);
    }
  }
  return b;
}

namespace {
void advance(StreamPosition& p, int64_t batches) {
  if (++p.batch >= batches) {
    p.batch = 0;
    ++p.pass;
  }
}
}  // namespace

void BatchStream::fill_queue() {
  while (static_cast<int64_t>(queue_.size()) < opt_.prefetch) {
    const StreamPosition p = queued_end_;
    auto task = std::make_shared<std::packaged_task<Batch()>>([this, p] { return make_batch(p); });
    queue_.push_back(task->get_future());
    impl_->submit([task] { (*task)(); });
    advance(queued_end_, impl_->batches);
  }
}

Batch BatchStream::next() {
  if (impl_->batches == 0) throw UsageError("BatchStream::next: the stream has no examples");
  if (opt_.prefetch == 0) {
    Batch b = make_batch(pos_);
    advance(pos_, impl_->batches);
    queued_end_ = pos_;
    return b;
  }
  fill_queue();
  std::future<Batch> f = std::move(queue_.front());
  queue_.pop_front();
  advance(pos_, impl_->batches);
  fill_queue();  // keep the workers busy while the caller consumes this batch
  return f.get();
}

void BatchStream::seek(StreamPosition p) {
  const int64_t nb = impl_->batches;
  if (p.pass < 0 || p.batch < 0 || (nb > 0 && p.batch >= nb) || (nb == 0 && p.batch != 0))
    throw UsageError("cannot seek the data stream to pass " + std::to_string(p.pass) + " batch " +
                     std::to_string(p.batch) + ": a pass has " + std::to_string(nb) +
                     " batches (batch size, world size or data changed since it was saved?)");
  impl_->cancel_pending();
  queue_.clear();  // futures of packaged tasks do not block; running tasks finish unobserved
  pos_ = queued_end_ = p;
}

}  // namespace noisydarts
