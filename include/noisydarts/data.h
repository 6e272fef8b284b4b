#pragma once
/// Datasets (IDX, CIFAR binary, image folders, synthetic), the deterministic search split,
/// augmentation and a prefetching batch stream (SPEC 4).
#include <torch/torch.h>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <vector>

namespace noisydarts {

/// A whole dataset held in memory.
struct Dataset {
  std::string name;
  torch::Tensor images;  ///< uint8 [N, C, H, W]
  torch::Tensor labels;  ///< int64 [N], values in [0, num_classes)
  int64_t num_classes = 0;
  std::vector<float> mean;  ///< per-channel mean of the training images, in [0, 1]
  std::vector<float> std;   ///< per-channel std of the training images, in [0, 1]
  int64_t size() const { return images.defined() ? images.size(0) : 0; }
};

struct DatasetPair {
  Dataset train;
  Dataset test;
};

/// Input geometry of a named dataset, known without reading any file (used by `profile`).
struct DataShape {
  int64_t channels = 0, height = 0, width = 0, classes = 0;
};
/// Shape of `name` in {fashion-mnist, mnist, cifar10, cifar100, synthetic, imagenet}.
/// Throws UsageError for unknown names and for `folder`, whose shape depends on its files.
DataShape dataset_shape(const std::string& name);
/// As above, and `folder`: {3, image_size, image_size, number of class folders of dir/train}
/// (lists the folders, decodes nothing; DataError when dir/train is missing or has no class).
DataShape dataset_shape(const std::string& name, const std::string& dir, int64_t image_size);

/// Default directory of a named dataset (fashion-mnist: /usr/share/datasets/fashion-mnist from
/// Debian's dataset-fashion-mnist package). Empty when there is none.
std::string default_data_dir(const std::string& name);

/// Loads train and test sets. `name` in {fashion-mnist, mnist, cifar10, cifar100, synthetic}.
/// IDX files may be raw or gzip (`train-images-idx3-ubyte[.gz]` etc.). CIFAR: the binary
/// version's files (`data_batch_1..5.bin`, `test_batch.bin`; CIFAR-100 `train.bin`, `test.bin`,
/// fine labels), searched in `dir` and `dir/cifar-10-batches-bin` / `dir/cifar-100-binary`.
/// synthetic: `synthetic_train` + `synthetic_train/5` images of 1x28x28, 10 classes, generated
/// from `seed`, learnable (class-dependent patterns plus noise).
/// Throws DataError naming the file on missing, empty, truncated, wrong-magic or inconsistent files.
DatasetPair load_dataset(const std::string& name, const std::string& dir, uint64_t seed = 0,
                         int64_t synthetic_train = 1024);

/// What load_dataset needs beyond the name and the directory.
struct LoadOptions {
  uint64_t seed = 0;
  int64_t synthetic_train = 1024;  ///< synthetic: training images (the test set has a fifth)
  int64_t image_size = 32;         ///< folder: side in pixels of the stored square images, [8, 512]
  int threads = 0;                 ///< folder: decoding threads (0 = all cores)
  /// folder: called with a one-line status every ~2 s while a long load runs (may be empty).
  std::function<void(const std::string&)> progress;
};
/// load_dataset with every option; `name` may also be `folder` (load_folder_dataset).
DatasetPair load_dataset(const std::string& name, const std::string& dir, const LoadOptions& opt);

/// Smallest and largest accepted `image_size` of the folder dataset.
constexpr int64_t kMinImageSize = 8, kMaxImageSize = 512;

/// The image-folder dataset (src/image_folder.cpp), ImageNet style:
///   dir/train/<class>/<...>/*.png|*.jpg|*.jpeg  (extensions case-insensitive, other files ignored)
///   dir/val/<class>/...  or, when there is no val/, dir/test/<class>/...
/// Classes are the sorted sub-folder names of train/ (label = position); a class folder of the
/// held-out split must be one of them. Files are taken in sorted path order (sub-folders of a
/// class folder included; names starting with '.' skipped). Every image is decoded once (stb_image;
/// grayscale expanded to RGB, alpha dropped), resized so that its shorter side is `image_size`
/// (separable triangle filter as PIL's bilinear: bilinear when upscaling, area-weighted when
/// downscaling) and centre-cropped to image_size x image_size. The whole set stays in memory as uint8:
/// N * 3 * image_size^2 bytes (ImageNet-1k's 1.28 M images at 64 px: 15.7 GB; at 224 px: 193 GB,
/// which does not fit, while downsampled copies such as ImageNet16-120 do).
/// Decoding uses `opt.threads` threads; the result does not depend on their number.
/// Throws DataError naming the folder or file: missing train/ or val/test, a class folder without
/// images, a val class unknown to train/, an undecodable image, memory that cannot be allocated.
DatasetPair load_folder_dataset(const std::string& dir, const LoadOptions& opt);
/// Sorted class folder names of `split_dir` (DataError when it is missing or has none).
std::vector<std::string> folder_classes(const std::string& split_dir);
/// Decodes one PNG/JPEG file into uint8 [3, image_size, image_size] (resize + centre crop as in
/// load_folder_dataset). DataError naming `path` when it cannot be read or decoded.
torch::Tensor load_image_file(const std::string& path, int64_t image_size);
/// The resize + centre crop of load_image_file on decoded interleaved RGB bytes (h x w x 3).
torch::Tensor resize_center_crop(const uint8_t* rgb, int64_t width, int64_t height,
                                 int64_t image_size);

/// Reads one IDX image file (magic 2051, ubyte, 3 dims) and its label file (magic 2049).
Dataset load_idx(const std::string& images_path, const std::string& labels_path);
/// Reads CIFAR binary files: each record = `label_bytes` label bytes (the last one is used) +
/// 3072 pixel bytes.
Dataset load_cifar_bin(const std::vector<std::string>& files, int64_t num_classes,
                       int64_t label_bytes);
/// load_idx on files already in memory (raw, not gzip): the same validation and messages, with
/// `images_name`/`labels_name` in place of the paths. For tests and fuzzing.
Dataset parse_idx(const uint8_t* images, size_t images_size, const uint8_t* labels,
                  size_t labels_size, const std::string& images_name = "<images>",
                  const std::string& labels_name = "<labels>");
/// load_cifar_bin on one file already in memory (raw, not gzip); `name` is used in messages.
Dataset parse_cifar_bin(const uint8_t* data, size_t size, int64_t num_classes,
                        int64_t label_bytes, const std::string& name = "<cifar>");
/// A learnable synthetic dataset: n images [channels, size, size], `classes` classes.
Dataset make_synthetic(int64_t n, int64_t channels, int64_t size, int64_t classes, uint64_t seed);
/// Sets mean/std from the images (per channel, scaled to [0, 1]).
void compute_normalization(Dataset& d);
/// Keeps the first n examples of a seeded permutation (n <= 0 or n >= size: unchanged).
Dataset subset(const Dataset& d, int64_t n, uint64_t seed);

/// Splits [0, n) into a weight half (first `portion` of a permutation by `seed`) and an
/// architecture half (the rest). Deterministic given (n, portion, seed).
std::pair<std::vector<int64_t>, std::vector<int64_t>> split_indices(int64_t n, double portion,
                                                                    uint64_t seed);

struct AugmentOptions {
  int64_t crop_padding = 0;  ///< random crop of the original size after zero-padding; 0 = off
  bool flip = false;          ///< random horizontal flip
  int64_t cutout = 0;         ///< side of a zeroed square (after normalisation); 0 = off
  bool normalize = true;      ///< (x - mean) / std per channel
};

struct Batch {
  torch::Tensor x;  ///< float32 [B, C, H, W]
  torch::Tensor y;  ///< int64 [B]
};

/// Where a BatchStream stands; stored in checkpoints.
struct StreamPosition {
  int64_t pass = 0;   ///< completed passes over the indices
  int64_t batch = 0;  ///< next batch within the current pass
};

/// A persistent, deterministic stream of batches over a fixed index set. Each pass visits every
/// index once (a permutation seeded by (seed, pass) when shuffling); when a pass ends the next
/// begins. Batch content (order and augmentation) is a pure function of (seed, pass, batch), so
/// results do not depend on the number of worker threads, and seek() restores a position
/// exactly. `workers` threads prepare up to `prefetch` batches ahead of the consumer.
/// Sharding for data parallelism: with (rank, world) each rank gets the rank-th slice of every
/// global batch of size batch_size*world. A final partial global batch is split over the ranks
/// as evenly as possible; one with fewer examples than ranks is skipped (so no rank ever gets an
/// empty batch and all ranks agree on batches_per_pass). Needs indices.size() >= world.
/// Augmentation randomness is drawn per example from (seed, pass, position in the pass), so the
/// ranks' batches are exactly the slices of the single-process global batch.
class BatchStream {
 public:
  struct Options {
    int64_t batch_size = 64;
    bool shuffle = true;
    bool drop_last = false;  ///< drop a final partial batch in each pass
    AugmentOptions augment;
    uint64_t seed = 0;
    int workers = 1;     ///< threads preparing batches (>= 1)
    int prefetch = 2;    ///< batches prepared ahead (>= 0; 0 = synchronous)
    int rank = 0, world = 1;
  };
  BatchStream(const Dataset& data, std::vector<int64_t> indices, Options opt);
  ~BatchStream();
  BatchStream(const BatchStream&) = delete;
  BatchStream& operator=(const BatchStream&) = delete;

  /// The next batch; advances the position (and the pass at the end of one).
  Batch next();
  /// Batches per pass (with drop_last, full batches only; at least 1 when indices non-empty).
  int64_t batches_per_pass() const;
  int64_t num_examples() const { return static_cast<int64_t>(indices_.size()); }
  StreamPosition position() const { return pos_; }
  /// Jumps to `p`; discards prefetched batches.
  void seek(StreamPosition p);

 private:
  Batch make_batch(StreamPosition p) const;
  void fill_queue();
  const Dataset& data_;
  std::vector<int64_t> indices_;
  Options opt_;
  StreamPosition pos_;          // position of the next batch returned by next()
  StreamPosition queued_end_;   // position after the last batch in queue_
  std::deque<std::future<Batch>> queue_;
  struct Impl;                  // worker threads, pass-order cache, normalisation tables
  std::unique_ptr<Impl> impl_;  // declared last: destroyed (threads joined) first
};

}  // namespace noisydarts
