// The image-folder dataset (ImageNet layout: one sub-folder per class), decoded once at load time
// with Debian's libstb (stb_image) into the in-memory uint8 Dataset.
#include <stb/stb_image.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <thread>

#include <unistd.h>

#include "noisydarts/data.h"
#include "noisydarts/error.h"

namespace noisydarts {
namespace fs = std::filesystem;

namespace {

constexpr const char* kLayoutHint =
    "expected DIR/train/<class>/*.png|jpg|jpeg and DIR/val/<class>/... (or DIR/test/<class>/...)";

bool hidden(const fs::path& p) { return !p.filename().empty() && p.filename().string()[0] == '.'; }

bool is_image_file(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg";
}

bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}

// Image files under a class folder (recursively, following links), sorted by path.
std::vector<std::string> list_images(const fs::path& class_dir) {
  std::vector<std::string> files;
  std::error_code ec;
  fs::recursive_directory_iterator it(class_dir, fs::directory_options::follow_directory_symlink, ec), end;
  if (ec) throw DataError("cannot read class folder " + class_dir.string() + ": " + ec.message());
  for (; it != end; it.increment(ec)) {
    if (ec) throw DataError("cannot read class folder " + class_dir.string() + ": " + ec.message());
    if (hidden(it->path())) {
      if (it->is_directory(ec)) it.disable_recursion_pending();
      continue;
    }
    if (is_image_file(it->path()) && it->is_regular_file(ec)) files.push_back(it->path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

std::string format_bytes(double b) {
  char buf[32];
  if (b >= 1e9) std::snprintf(buf, sizeof buf, "%.1f GB", b / 1e9);
  else std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  return buf;
}

// Decodes `files` (label per file) into one Dataset with `threads` threads. Each image owns its
// slot of the tensor, so the result does not depend on the threads; on failure the error of the
// first bad file in list order is reported (every file before it has been claimed and finished).
Dataset decode_split(const std::string& what, const std::vector<std::string>& files,
                     const std::vector<int64_t>& labels, int64_t num_classes, const LoadOptions& opt) {
  const int64_t n = static_cast<int64_t>(files.size()), s = opt.image_size;
  Dataset d;
  d.num_classes = num_classes;
  try {
    d.images = torch::empty({n, 3, s, s}, torch::kUInt8);
  } catch (const std::exception&) {
    throw DataError("not enough memory for " + what + ": " + std::to_string(n) + " images of 3x" +
                    std::to_string(s) + "x" + std::to_string(s) + " need " +
                    format_bytes(static_cast<double>(n) * 3 * s * s) +
                    "; use a smaller --image-size or a downsampled copy of the folder");
  }
  d.labels = torch::tensor(labels, torch::kInt64);
  uint8_t* out = d.images.data_ptr<uint8_t>();
  const int64_t per_image = 3 * s * s;

  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::condition_variable cv;
  int64_t error_index = n;
  std::string error_message;
  auto work = [&] {
    for (;;) {
      if (failed.load()) break;
      const int64_t i = next.fetch_add(1);
      if (i >= n) break;
      try {
        const torch::Tensor img = load_image_file(files[static_cast<size_t>(i)], s);
        std::memcpy(out + i * per_image, img.data_ptr<uint8_t>(), static_cast<size_t>(per_image));
      } catch (const std::exception& e) {
        const bool data = dynamic_cast<const DataError*>(&e) != nullptr;
        std::lock_guard<std::mutex> lk(mu);
        if (i < error_index) {
          error_index = i;
          error_message = data ? std::string(e.what())
                               : "cannot load image " + files[static_cast<size_t>(i)] + ": " + e.what();
        }
        failed = true;
      }
      ++done;
    }
    std::lock_guard<std::mutex> lk(mu);
    cv.notify_all();
  };
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads = static_cast<int>(std::min<int64_t>(opt.threads > 0 ? opt.threads : hw, std::max<int64_t>(1, n)));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(work);
  // The calling thread reports progress while the pool decodes: the first line after ~2 s, so
  // short loads stay silent.
  const auto t0 = std::chrono::steady_clock::now();
  auto last = t0;
  {
    std::unique_lock<std::mutex> lk(mu);
    while (done.load() < n && !failed.load()) {
      cv.wait_for(lk, std::chrono::milliseconds(200));
      const auto now = std::chrono::steady_clock::now();
      if (opt.progress && now - last >= std::chrono::seconds(2)) {
        last = now;
        const int64_t k = done.load();
        const double sec = std::chrono::duration<double>(now - t0).count();
        char buf[160];
        std::snprintf(buf, sizeof buf, "%lld/%lld images (%.0f%%), %.0f images/s",
                      static_cast<long long>(k), static_cast<long long>(n), 100.0 * k / std::max<int64_t>(1, n),
                      k / std::max(1e-9, sec));
        const std::string line = "loading " + what + ": " + buf;
        lk.unlock();
        opt.progress(line);
        lk.lock();
      }
    }
  }
  for (auto& t : pool) t.join();
  if (failed) throw DataError(error_message);
  return d;
}

// Files and labels of one split; `classes` maps a class folder name to its label.
void collect_split(const fs::path& split_dir, const std::map<std::string, int64_t>& classes,
                   const fs::path& train_dir, std::vector<std::string>& files, std::vector<int64_t>& labels) {
  for (const auto& name : folder_classes(split_dir.string())) {
    const auto it = classes.find(name);
    if (it == classes.end())
      throw DataError("class folder " + (split_dir / name).string() + " has no counterpart in " +
                      train_dir.string() + ": the held-out split must use the training classes' folder names");
    const auto f = list_images(split_dir / name);
    if (f.empty())
      throw DataError("class folder " + (split_dir / name).string() +
                      " holds no .png/.jpg/.jpeg image: add images or remove the folder");
    files.insert(files.end(), f.begin(), f.end());
    labels.insert(labels.end(), f.size(), it->second);
  }
}

// Source taps of one output pixel along one axis: weights of source pixels first, first + 1, ...
struct Taps {
  int64_t first = 0;
  std::vector<float> w;
};

// Triangle-filter weights (PIL's bilinear resize, which torchvision uses) mapping `in` source
// pixels to `out` pixels, for the output pixels [start, start + count). Enlarging, the filter is
// plain bilinear interpolation; shrinking by a factor f it is f times wider, so every source pixel
// contributes (area-weighted, no aliasing). Taps outside the image are dropped and the rest
// renormalised, so a constant image stays exactly constant. (stb_image_resize would do the same,
// but Debian's build aborts on an internal assertion for some scale factors.)
std::vector<Taps> resize_weights(int64_t in, int64_t out, int64_t start, int64_t count) {
  const double scale = static_cast<double>(in) / static_cast<double>(out);
  const double widen = std::max(1.0, scale), support = widen;
  std::vector<Taps> taps(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    const double centre = (static_cast<double>(start + i) + 0.5) * scale;
    const int64_t lo = std::max<int64_t>(0, static_cast<int64_t>(std::floor(centre - support)));
    const int64_t hi = std::min<int64_t>(in, static_cast<int64_t>(std::ceil(centre + support)));
    Taps& t = taps[static_cast<size_t>(i)];
    double sum = 0;
    std::vector<double> w;
    for (int64_t j = lo; j < hi; ++j) {
      const double v = std::max(0.0, 1.0 - std::abs((static_cast<double>(j) + 0.5 - centre) / widen));
      w.push_back(v);
      sum += v;
    }
    // Trim zero weights at both ends.
    size_t a = 0, b = w.size();
    while (a < b && w[a] == 0) ++a;
    while (b > a && w[b - 1] == 0) --b;
    if (a == b) {  // cannot happen for in >= 1 (the nearest pixel has weight > 0); kept safe
      t.first = std::min(in - 1, std::max<int64_t>(0, static_cast<int64_t>(centre)));
      t.w = {1.0f};
      continue;
    }
    t.first = lo + static_cast<int64_t>(a);
    for (size_t k = a; k < b; ++k) t.w.push_back(static_cast<float>(w[k] / sum));
  }
  return taps;
}

}  // namespace

std::vector<std::string> folder_classes(const std::string& split_dir) {
  if (!is_dir(split_dir))
    throw DataError("image folder " + split_dir + " is missing or not a directory (" + kLayoutHint + ")");
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(split_dir, ec), end; !ec && it != end; it.increment(ec))
    if (!hidden(it->path()) && is_dir(it->path())) names.push_back(it->path().filename().string());
  if (ec) throw DataError("cannot read image folder " + split_dir + ": " + ec.message());
  if (names.empty())
    throw DataError("image folder " + split_dir + " has no class sub-folder (" + kLayoutHint + ")");
  std::sort(names.begin(), names.end());
  return names;
}

torch::Tensor resize_center_crop(const uint8_t* rgb, int64_t width, int64_t height, int64_t image_size) {
  TORCH_CHECK_VALUE(width >= 1 && height >= 1, "resize_center_crop: empty image");
  TORCH_CHECK_VALUE(image_size >= 1, "resize_center_crop: image_size must be >= 1, got ", image_size);
  // Shorter side -> image_size, the longer one scaled alike (rounded, at least image_size); only
  // the centred image_size x image_size window of that resized image is computed.
  const int64_t s = image_size;
  int64_t rw = s, rh = s;
  if (width < height) rh = std::max<int64_t>(s, (height * s + width / 2) / width);
  else rw = std::max<int64_t>(s, (width * s + height / 2) / height);
  const auto wx = resize_weights(width, rw, (rw - s) / 2, s);
  const auto wy = resize_weights(height, rh, (rh - s) / 2, s);
  // Horizontal pass over every source row, then vertical pass, in float.
  std::vector<float> tmp(static_cast<size_t>(height * s * 3));
  for (int64_t y = 0; y < height; ++y)
    for (int64_t x = 0; x < s; ++x) {
      const Taps& t = wx[static_cast<size_t>(x)];
      float acc[3] = {0, 0, 0};
      for (size_t k = 0; k < t.w.size(); ++k) {
        const uint8_t* p = rgb + (y * width + t.first + static_cast<int64_t>(k)) * 3;
        for (int c = 0; c < 3; ++c) acc[c] += t.w[k] * p[c];
      }
      for (int c = 0; c < 3; ++c) tmp[static_cast<size_t>((y * s + x) * 3 + c)] = acc[c];
    }
  torch::Tensor out = torch::empty({3, s, s}, torch::kUInt8);
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t y = 0; y < s; ++y) {
    const Taps& t = wy[static_cast<size_t>(y)];
    for (int64_t x = 0; x < s; ++x) {
      float acc[3] = {0, 0, 0};
      for (size_t k = 0; k < t.w.size(); ++k) {
        const float* p = tmp.data() + ((t.first + static_cast<int64_t>(k)) * s + x) * 3;
        for (int c = 0; c < 3; ++c) acc[c] += t.w[k] * p[c];
      }
      for (int c = 0; c < 3; ++c)
        o[(c * s + y) * s + x] = static_cast<uint8_t>(std::clamp(std::lround(acc[c]), 0L, 255L));
    }
  }
  return out;
}

torch::Tensor load_image_file(const std::string& path, int64_t image_size) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw DataError("cannot open image " + path + ": check that it exists and is readable");
  const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw DataError("cannot read image " + path + ": check the file and the disk");
  if (bytes.size() > static_cast<size_t>(INT32_MAX))
    throw DataError("image " + path + " is larger than 2 GiB: remove it or convert it");
  int w = 0, h = 0, comp = 0;
  // req_comp 3: stb expands grayscale to RGB and drops alpha; 16-bit PNGs come back as 8 bits.
  stbi_uc* px = stbi_load_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()), static_cast<int>(bytes.size()),
                                      &w, &h, &comp, 3);
  if (!px) {
    const char* why = stbi_failure_reason();
    throw DataError("cannot decode image " + path + " (" + (why ? why : "unknown reason") +
                    "): replace it with a valid PNG/JPEG or delete it");
  }
  std::unique_ptr<stbi_uc, void (*)(void*)> guard(px, stbi_image_free);
  try {
    return resize_center_crop(px, w, h, image_size);
  } catch (const DataError& e) {
    throw DataError(std::string(e.what()) + " from " + path);
  }
}

DataShape dataset_shape(const std::string& name, const std::string& dir, int64_t image_size) {
  if (name != "folder") return dataset_shape(name);
  if (dir.empty()) throw UsageError("dataset folder needs --data-dir (" + std::string(kLayoutHint) + ")");
  const auto classes = folder_classes((fs::path(dir) / "train").string());
  return {3, image_size, image_size, static_cast<int64_t>(classes.size())};
}

DatasetPair load_folder_dataset(const std::string& dir, const LoadOptions& opt) {
  if (dir.empty()) throw UsageError("dataset folder needs --data-dir (" + std::string(kLayoutHint) + ")");
  if (opt.image_size < kMinImageSize || opt.image_size > kMaxImageSize)
    throw UsageError("--image-size must be in [" + std::to_string(kMinImageSize) + ", " +
                     std::to_string(kMaxImageSize) + "], got " + std::to_string(opt.image_size));
  const fs::path root(dir);
  if (!is_dir(root)) throw DataError("image folder " + dir + " is missing or not a directory (" + kLayoutHint + ")");
  const fs::path train_dir = root / "train";
  if (!is_dir(train_dir)) throw DataError("image folder " + dir + " has no train/ sub-folder (" + kLayoutHint + ")");
  const fs::path test_dir = is_dir(root / "val") ? root / "val" : root / "test";
  if (!is_dir(test_dir))
    throw DataError("image folder " + dir + " has neither val/ nor test/ sub-folder: the held-out images are needed (" +
                    kLayoutHint + ")");

  const auto names = folder_classes(train_dir.string());
  std::map<std::string, int64_t> classes;
  for (size_t i = 0; i < names.size(); ++i) classes[names[i]] = static_cast<int64_t>(i);
  std::vector<std::string> train_files, test_files;
  std::vector<int64_t> train_labels, test_labels;
  collect_split(train_dir, classes, train_dir, train_files, train_labels);
  collect_split(test_dir, classes, train_dir, test_files, test_labels);

  // Refuse what cannot fit before decoding for minutes (an allocation beyond it would succeed
  // lazily on Linux and be killed by the OS later).
  const double need = static_cast<double>(train_files.size() + test_files.size()) * 3 * opt.image_size * opt.image_size;
  const double ram = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  if (ram > 0 && need > ram)
    throw DataError("image folder " + dir + ": " + std::to_string(train_files.size() + test_files.size()) +
                    " images at " + std::to_string(opt.image_size) + "x" + std::to_string(opt.image_size) + " need " +
                    format_bytes(need) + " of memory, more than this machine's " + format_bytes(ram) +
                    "; use a smaller --image-size or a downsampled copy of the folder");
  const int64_t k = static_cast<int64_t>(names.size());
  DatasetPair out;
  out.train = decode_split(train_dir.string(), train_files, train_labels, k, opt);
  out.test = decode_split(test_dir.string(), test_files, test_labels, k, opt);
  compute_normalization(out.train);
  out.test.mean = out.train.mean;  // the held-out images are normalised with the training statistics
  out.test.std = out.train.std;
  return out;
}

}  // namespace noisydarts
