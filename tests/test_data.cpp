// Tests of src/data.cpp: IDX/CIFAR readers and their errors, synthetic data, splits,
// augmentation and the deterministic, sharded, prefetching BatchStream.
#include "noisydarts/data.h"

#include "noisydarts/error.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace noisydarts;

namespace {

/// A fresh, empty temporary directory per test, removed afterwards.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("noisydarts_data_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

using Bytes = std::vector<uint8_t>;

void put_be32(Bytes& b, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(v >> s));
}

Bytes idx_images(uint32_t n, uint32_t rows, uint32_t cols, const Bytes& pixels,
                 uint32_t magic = 2051) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, n);
  put_be32(b, rows);
  put_be32(b, cols);
  b.insert(b.end(), pixels.begin(), pixels.end());
  return b;
}

Bytes idx_labels(const Bytes& labels, uint32_t magic = 2049) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, static_cast<uint32_t>(labels.size()));
  b.insert(b.end(), labels.begin(), labels.end());
  return b;
}

void write_raw(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

void write_gz(const std::string& path, const Bytes& b) {
  gzFile g = gzopen(path.c_str(), "wb");
  ASSERT_NE(g, nullptr);
  ASSERT_EQ(gzwrite(g, b.data(), static_cast<unsigned>(b.size())), static_cast<int>(b.size()));
  gzclose(g);
}

Bytes read_raw(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(f), {});
}

/// Expects `fn` to throw E whose message contains every string of `parts`.
template <typename E, typename F>
void expect_error(F&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning " << parts.front();
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line expected: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

Bytes iota_bytes(size_t n, int mul = 1) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>((i * static_cast<size_t>(mul)) % 256);
  return b;
}

/// A dataset of n 1xHxW images whose label is its index and whose pixel (0,0) is index % 256.
Dataset index_dataset(int64_t n, int64_t c = 1, int64_t h = 4, int64_t w = 4) {
  Dataset d;
  d.images = torch::zeros({n, c, h, w}, torch::kUInt8);
  auto acc = d.images.accessor<uint8_t, 4>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) acc[i][ch][y][x] = uint8_t((i * 7 + ch * 31 + y * w + x + 1) % 251);
  d.labels = torch::arange(n, torch::kLong);
  d.num_classes = n;
  compute_normalization(d);
  return d;
}

std::vector<int64_t> labels_of(const Batch& b) {
  return std::vector<int64_t>(b.y.data_ptr<int64_t>(), b.y.data_ptr<int64_t>() + b.y.numel());
}

std::vector<int64_t> all_indices(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
  return v;
}

bool same(const Batch& a, const Batch& b) {
  return a.x.sizes() == b.x.sizes() && torch::equal(a.x, b.x) && torch::equal(a.y, b.y);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// IDX
// ---------------------------------------------------------------------------------------------

TEST(Data, IdxRawFilesRoundTripExactBytes) {
  TempDir t;
  const Bytes px = iota_bytes(3 * 2 * 5, 7);
  write_raw(t.file("img"), idx_images(3, 2, 5, px));
  write_raw(t.file("lab"), idx_labels({4, 0, 7}));
  const Dataset d = load_idx(t.file("img"), t.file("lab"));
  ASSERT_EQ(d.images.sizes(), (std::vector<int64_t>{3, 1, 2, 5}));
  EXPECT_EQ(d.images.scalar_type(), torch::kUInt8);
  EXPECT_EQ(d.labels.scalar_type(), torch::kLong);
  EXPECT_EQ(Bytes(d.images.data_ptr<uint8_t>(), d.images.data_ptr<uint8_t>() + px.size()), px);
  EXPECT_EQ(labels_of({d.images, d.labels}), (std::vector<int64_t>{4, 0, 7}));
  EXPECT_EQ(d.num_classes, 8);
  ASSERT_EQ(d.mean.size(), 1u);
  double s = 0, s2 = 0;
  for (auto v : px) s += v / 255.0, s2 += (v / 255.0) * (v / 255.0);
  const double mean = s / px.size();
  EXPECT_NEAR(d.mean[0], mean, 1e-6);
  EXPECT_NEAR(d.std[0], std::sqrt(s2 / px.size() - mean * mean), 1e-6);
}

TEST(Data, IdxGzipFilesReadLikeRaw) {
  TempDir t;
  const Bytes px = iota_bytes(4 * 3 * 3, 13);
  write_gz(t.file("img.gz"), idx_images(4, 3, 3, px));
  write_gz(t.file("lab.gz"), idx_labels({1, 2, 3, 9}));
  ASSERT_EQ(read_raw(t.file("img.gz"))[0], 0x1f);
  const Dataset d = load_idx(t.file("img.gz"), t.file("lab.gz"));
  ASSERT_EQ(d.images.sizes(), (std::vector<int64_t>{4, 1, 3, 3}));
  EXPECT_EQ(Bytes(d.images.data_ptr<uint8_t>(), d.images.data_ptr<uint8_t>() + px.size()), px);
  EXPECT_EQ(labels_of({d.images, d.labels}), (std::vector<int64_t>{1, 2, 3, 9}));
  EXPECT_EQ(d.num_classes, 10);
}

TEST(Data, IdxMissingFileNamesPathAndInstallHint) {
  TempDir t;
  write_raw(t.file("lab"), idx_labels({1}));
  expect_error<DataError>([&] { load_idx(t.file("nope"), t.file("lab")); },
                          {"cannot open " + t.file("nope"), "No such file",
                           "dataset-fashion-mnist", "--data-dir"});
}

TEST(Data, IdxWrongMagicThrowsNamingFile) {
  TempDir t;
  write_raw(t.file("img"), idx_images(1, 2, 2, {1, 2, 3, 4}));
  write_raw(t.file("lab"), idx_labels({1}));
  // Images and labels swapped: each has the other's magic.
  expect_error<DataError>([&] { load_idx(t.file("lab"), t.file("img")); },
                          {t.file("lab"), "magic", "2049", "2051"});
  write_raw(t.file("bad_lab"), idx_labels({1}, 2051));
  expect_error<DataError>([&] { load_idx(t.file("img"), t.file("bad_lab")); },
                          {t.file("bad_lab"), "magic"});
  write_raw(t.file("text"), Bytes{'h', 'e', 'l', 'l', 'o', '\n'});
  expect_error<DataError>([&] { load_idx(t.file("text"), t.file("lab")); }, {t.file("text")});
}

TEST(Data, IdxTruncatedRawAndGzipFilesThrow) {
  TempDir t;
  Bytes img = idx_images(3, 4, 4, iota_bytes(48));
  img.resize(img.size() - 5);
  write_raw(t.file("img"), img);
  write_gz(t.file("img.gz"), img);
  write_raw(t.file("lab"), idx_labels({1, 2, 3}));
  expect_error<DataError>([&] { load_idx(t.file("img"), t.file("lab")); },
                          {t.file("img"), "truncated"});
  expect_error<DataError>([&] { load_idx(t.file("img.gz"), t.file("lab")); },
                          {t.file("img.gz"), "truncated"});
  // Header cut short, and a label file with fewer labels than declared.
  write_raw(t.file("short"), Bytes{0, 0, 8, 3, 0, 0});
  expect_error<DataError>([&] { load_idx(t.file("short"), t.file("lab")); },
                          {t.file("short"), "truncated"});
  Bytes lab = idx_labels({1, 2, 3});
  lab.pop_back();
  write_raw(t.file("lab_short"), lab);
  write_raw(t.file("img_ok"), idx_images(3, 4, 4, iota_bytes(48)));
  expect_error<DataError>([&] { load_idx(t.file("img_ok"), t.file("lab_short")); },
                          {t.file("lab_short"), "truncated"});
  // A gzip stream cut in the middle of its compressed data.
  Bytes big = idx_images(50, 28, 28, iota_bytes(50 * 784, 31));
  write_gz(t.file("big.gz"), big);
  Bytes gz = read_raw(t.file("big.gz"));
  gz.resize(gz.size() / 2);
  write_raw(t.file("cut.gz"), gz);
  write_raw(t.file("lab50"), idx_labels(Bytes(50, 1)));
  expect_error<DataError>([&] { load_idx(t.file("cut.gz"), t.file("lab50")); },
                          {t.file("cut.gz"), "truncated"});
}

TEST(Data, IdxCorruptGzipThrowsNamingFile) {
  TempDir t;
  write_raw(t.file("img.gz"), Bytes{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xfe, 0x12, 0x34, 0x56});
  write_raw(t.file("lab"), idx_labels({1}));
  expect_error<DataError>([&] { load_idx(t.file("img.gz"), t.file("lab")); },
                          {t.file("img.gz"), "corrupt gzip"});
}

TEST(Data, IdxEmptyFileThrowsNamingFile) {
  TempDir t;
  write_raw(t.file("empty"), {});
  write_raw(t.file("lab"), idx_labels({1}));
  expect_error<DataError>([&] { load_idx(t.file("empty"), t.file("lab")); },
                          {t.file("empty"), "empty"});
  write_raw(t.file("img"), idx_images(1, 2, 2, {1, 2, 3, 4}));
  expect_error<DataError>([&] { load_idx(t.file("img"), t.file("empty")); },
                          {t.file("empty"), "empty"});
}

TEST(Data, IdxAbsurdDimensionsAreRejectedBeforeReading) {
  TempDir t;
  write_raw(t.file("lab"), idx_labels({1}));
  const std::vector<std::array<uint32_t, 3>> bad = {
      {0xffffffffu, 28, 28}, {0, 28, 28}, {1, 0, 28}, {1, 28, 5000}, {20'000'000, 1, 1}};
  for (const auto& dims : bad) {
    write_raw(t.file("img"), idx_images(dims[0], dims[1], dims[2], {1, 2, 3}));
    write_gz(t.file("img.gz"), idx_images(dims[0], dims[1], dims[2], {1, 2, 3}));
    expect_error<DataError>([&] { load_idx(t.file("img"), t.file("lab")); },
                            {t.file("img"), "implausible"});
    expect_error<DataError>([&] { load_idx(t.file("img.gz"), t.file("lab")); },
                            {t.file("img.gz"), "implausible"});
  }
  // Plausible header but a huge declared size in a tiny gzip file: truncated, not bad_alloc.
  write_gz(t.file("lie.gz"), idx_images(10'000'000, 64, 64, {1, 2, 3}));
  Bytes labels;
  put_be32(labels, 2049);
  put_be32(labels, 10'000'000);
  write_raw(t.file("lie_lab"), labels);
  expect_error<DataError>([&] { load_idx(t.file("lie.gz"), t.file("lie_lab")); },
                          {t.file("lie.gz"), "truncated"});
}

TEST(Data, IdxTrailingBytesAreRejected) {
  TempDir t;
  Bytes img = idx_images(1, 2, 2, {1, 2, 3, 4});
  img.push_back(99);
  write_raw(t.file("img"), img);
  write_gz(t.file("img.gz"), img);
  write_raw(t.file("lab"), idx_labels({1}));
  expect_error<DataError>([&] { load_idx(t.file("img"), t.file("lab")); },
                          {t.file("img"), "unexpected bytes"});
  expect_error<DataError>([&] { load_idx(t.file("img.gz"), t.file("lab")); },
                          {t.file("img.gz"), "unexpected bytes"});
}

TEST(Data, IdxImageLabelCountMismatchNamesBothFiles) {
  TempDir t;
  write_raw(t.file("img"), idx_images(2, 2, 2, iota_bytes(8)));
  write_raw(t.file("lab"), idx_labels({1, 2, 3}));
  expect_error<DataError>([&] { load_idx(t.file("img"), t.file("lab")); },
                          {t.file("img"), t.file("lab"), "2 images", "3 labels"});
}

TEST(Data, LoadDatasetFindsRawOrGzipIdxNamesInDirectory) {
  TempDir t;
  write_raw(t.file("train-images-idx3-ubyte"), idx_images(4, 28, 28, iota_bytes(4 * 784)));
  write_gz(t.file("train-labels-idx1-ubyte.gz"), idx_labels({0, 1, 2, 3}));
  write_gz(t.file("t10k-images-idx3-ubyte.gz"), idx_images(2, 28, 28, iota_bytes(2 * 784, 3)));
  write_raw(t.file("t10k-labels-idx1-ubyte"), idx_labels({9, 0}));
  const DatasetPair p = load_dataset("fashion-mnist", t.str());
  EXPECT_EQ(p.train.size(), 4);
  EXPECT_EQ(p.test.size(), 2);
  EXPECT_EQ(p.train.num_classes, 10);  // max over both sets
  EXPECT_EQ(p.test.num_classes, 10);
  EXPECT_EQ(p.train.name, "fashion-mnist");
  EXPECT_EQ(p.test.mean, p.train.mean);  // test normalised with training statistics
  fs::remove(t.file("t10k-labels-idx1-ubyte"));
  expect_error<DataError>([&] { load_dataset("mnist", t.str()); },
                          {t.file("t10k-labels-idx1-ubyte.gz"), "No such file", "--data-dir"});
}

TEST(Data, RealFashionMnistLoadsWithExpectedShapes) {
  const std::string dir = default_data_dir("fashion-mnist");
  if (!fs::exists(dir)) GTEST_SKIP() << dir << " not installed (Debian dataset-fashion-mnist)";
  const DatasetPair p = load_dataset("fashion-mnist", "");
  ASSERT_EQ(p.train.images.sizes(), (std::vector<int64_t>{60000, 1, 28, 28}));
  ASSERT_EQ(p.test.images.sizes(), (std::vector<int64_t>{10000, 1, 28, 28}));
  EXPECT_EQ(p.train.labels.sizes(), (std::vector<int64_t>{60000}));
  EXPECT_EQ(p.train.num_classes, 10);
  EXPECT_EQ(p.test.num_classes, 10);
  // Balanced: 6000 per class in train.
  const auto counts = torch::bincount(p.train.labels);
  EXPECT_TRUE(torch::equal(counts, torch::full({10}, 6000, torch::kLong)));
  // The well-known statistics of Fashion-MNIST.
  EXPECT_NEAR(p.train.mean[0], 0.2860, 1e-3);
  EXPECT_NEAR(p.train.std[0], 0.3530, 1e-3);
}

// ---------------------------------------------------------------------------------------------
// CIFAR
// ---------------------------------------------------------------------------------------------

namespace {
Bytes cifar_records(int n, int label_bytes, int first_label, int label_mod) {
  Bytes b;
  for (int r = 0; r < n; ++r) {
    for (int k = 0; k < label_bytes - 1; ++k) b.push_back(uint8_t(200 + k));  // coarse: ignored
    b.push_back(uint8_t((first_label + r) % label_mod));
    for (int p = 0; p < 3072; ++p) b.push_back(uint8_t((r * 5 + p) % 256));
  }
  return b;
}
}  // namespace

TEST(Data, CifarBinaryRoundTripUsesLastLabelByte) {
  TempDir t;
  write_raw(t.file("a.bin"), cifar_records(3, 1, 0, 10));
  write_raw(t.file("b.bin"), cifar_records(2, 1, 7, 10));
  const Dataset d = load_cifar_bin({t.file("a.bin"), t.file("b.bin")}, 10, 1);
  ASSERT_EQ(d.images.sizes(), (std::vector<int64_t>{5, 3, 32, 32}));
  EXPECT_EQ(labels_of({d.images, d.labels}), (std::vector<int64_t>{0, 1, 2, 7, 8}));
  EXPECT_EQ(d.num_classes, 10);
  EXPECT_EQ(d.images[1][2][31][31].item<int>(), (1 * 5 + 3071) % 256);
  EXPECT_EQ(d.images[3][0][0][1].item<int>(), 1);
  EXPECT_EQ(d.mean.size(), 3u);
  const Dataset c100 = [&] {
    write_raw(t.file("fine.bin"), cifar_records(4, 2, 95, 100));
    return load_cifar_bin({t.file("fine.bin")}, 100, 2);
  }();
  EXPECT_EQ(labels_of({c100.images, c100.labels}), (std::vector<int64_t>{95, 96, 97, 98}));
  EXPECT_EQ(c100.num_classes, 100);
}

TEST(Data, LoadDatasetFindsCifarInItsExtractedSubdirectory) {
  TempDir t;
  fs::create_directories(t.file("cifar-10-batches-bin"));
  for (int i = 1; i <= 5; ++i)
    write_raw(t.file("cifar-10-batches-bin/data_batch_" + std::to_string(i) + ".bin"),
              cifar_records(2, 1, i, 10));
  write_raw(t.file("cifar-10-batches-bin/test_batch.bin"), cifar_records(3, 1, 0, 10));
  const DatasetPair p = load_dataset("cifar10", t.str());
  EXPECT_EQ(p.train.size(), 10);
  EXPECT_EQ(p.test.size(), 3);
  EXPECT_EQ(p.train.num_classes, 10);
  fs::create_directories(t.file("c100"));
  write_raw(t.file("c100/train.bin"), cifar_records(3, 2, 0, 100));
  write_raw(t.file("c100/test.bin"), cifar_records(1, 2, 0, 100));
  EXPECT_EQ(load_dataset("cifar100", t.file("c100")).train.num_classes, 100);
  expect_error<DataError>([&] { load_dataset("cifar100", t.str()); },
                          {t.file("train.bin"), "No such file"});
}

TEST(Data, CifarBadSizeEmptyAndBadLabelThrowNamingFile) {
  TempDir t;
  Bytes b = cifar_records(2, 1, 0, 10);
  b.pop_back();
  write_raw(t.file("cut.bin"), b);
  expect_error<DataError>([&] { load_cifar_bin({t.file("cut.bin")}, 10, 1); },
                          {t.file("cut.bin"), "multiple", "3073"});
  write_raw(t.file("empty.bin"), {});
  expect_error<DataError>([&] { load_cifar_bin({t.file("empty.bin")}, 10, 1); },
                          {t.file("empty.bin"), "empty"});
  write_raw(t.file("lab.bin"), cifar_records(3, 1, 8, 256));  // labels 8, 9, 10
  expect_error<DataError>([&] { load_cifar_bin({t.file("lab.bin")}, 10, 1); },
                          {t.file("lab.bin"), "record 2", "label 10"});
  expect_error<DataError>([&] { load_cifar_bin({t.file("missing.bin")}, 10, 1); },
                          {t.file("missing.bin"), "No such file"});
  // A CIFAR-100 file read as CIFAR-10 has the wrong record size.
  write_raw(t.file("c100.bin"), cifar_records(1, 2, 0, 10));
  EXPECT_THROW(load_cifar_bin({t.file("c100.bin")}, 10, 1), DataError);
}

// ---------------------------------------------------------------------------------------------
// Names, synthetic data, normalisation, subsets and splits
// ---------------------------------------------------------------------------------------------

TEST(Data, DatasetShapesDefaultsAndUnknownNames) {
  const DataShape f = dataset_shape("fashion-mnist");
  EXPECT_EQ(std::vector<int64_t>({f.channels, f.height, f.width, f.classes}),
            std::vector<int64_t>({1, 28, 28, 10}));
  const DataShape c = dataset_shape("cifar100");
  EXPECT_EQ(std::vector<int64_t>({c.channels, c.height, c.width, c.classes}),
            std::vector<int64_t>({3, 32, 32, 100}));
  EXPECT_EQ(dataset_shape("cifar10").classes, 10);
  EXPECT_EQ(dataset_shape("imagenet").height, 224);
  EXPECT_EQ(dataset_shape("imagenet").classes, 1000);
  EXPECT_EQ(dataset_shape("synthetic").channels, 1);
  EXPECT_EQ(default_data_dir("fashion-mnist"), "/usr/share/datasets/fashion-mnist");
  EXPECT_EQ(default_data_dir("mnist"), "/usr/share/datasets/mnist");
  EXPECT_EQ(default_data_dir("cifar10"), "");
  expect_error<UsageError>([] { dataset_shape("cifar11"); }, {"cifar11"});
  expect_error<UsageError>([] { load_dataset("svhn", "/tmp"); }, {"svhn"});
  EXPECT_THROW(load_dataset("cifar10", ""), UsageError);  // no default directory
}

TEST(Data, SyntheticIsDeterministicBalancedAndLearnable) {
  const DatasetPair a = load_dataset("synthetic", "", 5, 1000);
  const DatasetPair b = load_dataset("synthetic", "", 5, 1000);
  ASSERT_EQ(a.train.images.sizes(), (std::vector<int64_t>{1000, 1, 28, 28}));
  ASSERT_EQ(a.test.images.sizes(), (std::vector<int64_t>{200, 1, 28, 28}));
  EXPECT_EQ(a.train.num_classes, 10);
  EXPECT_TRUE(torch::equal(a.train.images, b.train.images));
  EXPECT_TRUE(torch::equal(a.test.labels, b.test.labels));
  EXPECT_FALSE(torch::equal(a.train.images.slice(0, 0, 200), a.test.images));
  const DatasetPair other = load_dataset("synthetic", "", 6, 1000);
  EXPECT_FALSE(torch::equal(a.train.images, other.train.images));
  EXPECT_TRUE(torch::equal(torch::bincount(a.train.labels), torch::full({10}, 100, torch::kLong)));
  EXPECT_EQ(load_dataset("synthetic", "", 0, 3).test.size(), 1);
  // Nearest class-mean classifier fitted on train: near perfect on test (same templates).
  auto x = a.train.images.to(torch::kFloat).view({1000, -1});
  std::vector<torch::Tensor> means;
  for (int k = 0; k < 10; ++k) means.push_back(x.index({a.train.labels == k}).mean(0));
  auto centres = torch::stack(means);
  auto xt = a.test.images.to(torch::kFloat).view({200, -1});
  auto pred = torch::cdist(xt, centres).argmin(1);
  const double acc = (pred == a.test.labels).to(torch::kFloat).mean().item<double>();
  EXPECT_GT(acc, 0.95);
  // Not trivially separable pixel-wise: per-image noise is present.
  EXPECT_GT((x - centres.index_select(0, a.train.labels)).std().item<double>(), 10.0);
}

TEST(Data, ComputeNormalizationIsPerChannelExact) {
  Dataset d;
  d.images = torch::zeros({2, 2, 1, 2}, torch::kUInt8);
  d.images[0][0].fill_(255);                      // channel 0: 255,255,0,0
  d.images[0][1][0][0] = 51;                       // channel 1: 51,0,0,0
  compute_normalization(d);
  ASSERT_EQ(d.mean.size(), 2u);
  EXPECT_NEAR(d.mean[0], 0.5, 1e-7);
  EXPECT_NEAR(d.std[0], 0.5, 1e-7);
  EXPECT_NEAR(d.mean[1], 0.05, 1e-7);
  EXPECT_NEAR(d.std[1], std::sqrt(0.04 / 4 - 0.05 * 0.05), 1e-7);
}

TEST(Data, SubsetIsDeterministicAndKeepsStatistics) {
  const Dataset d = index_dataset(50);
  const Dataset s = subset(d, 10, 3);
  EXPECT_EQ(s.size(), 10);
  EXPECT_TRUE(torch::equal(s.labels, subset(d, 10, 3).labels));
  EXPECT_FALSE(torch::equal(s.labels, subset(d, 10, 4).labels));
  const auto ids = labels_of({s.images, s.labels});
  EXPECT_EQ(std::set<int64_t>(ids.begin(), ids.end()).size(), 10u);
  for (int64_t i = 0; i < 10; ++i)  // images follow their labels
    EXPECT_TRUE(torch::equal(s.images[i], d.images[s.labels[i].item<int64_t>()]));
  EXPECT_EQ(s.mean, d.mean);
  EXPECT_EQ(subset(d, 0, 1).size(), 50);
  EXPECT_EQ(subset(d, 99, 1).size(), 50);
}

TEST(Data, SplitIndicesIsDeterministicDisjointAndCovering) {
  for (const int64_t n : {2, 3, 7, 1000, 60000}) {
    for (const double portion : {0.5, 0.1, 0.9, 0.999}) {
      const auto [a, b] = split_indices(n, portion, 42);
      const auto [a2, b2] = split_indices(n, portion, 42);
      EXPECT_EQ(a, a2);
      EXPECT_EQ(b, b2);
      const auto expected = std::clamp<int64_t>(
          static_cast<int64_t>(std::floor(double(n) * portion)), 1, n - 1);
      EXPECT_EQ(int64_t(a.size()), expected) << n << " " << portion;
      EXPECT_FALSE(b.empty());
      std::vector<int64_t> all(a);
      all.insert(all.end(), b.begin(), b.end());
      std::sort(all.begin(), all.end());
      EXPECT_EQ(all, all_indices(n));  // disjoint and covering
    }
  }
  const auto [x, y] = split_indices(1000, 0.5, 1);
  EXPECT_NE(x, split_indices(1000, 0.5, 2).first);  // seed matters
  // Not simply the first half.
  EXPECT_NE(x, std::vector<int64_t>(all_indices(500)));
  EXPECT_EQ(split_indices(0, 0.5, 1).first.size(), 0u);
  for (const double bad : {0.0, 1.0, -0.5, 1.5, std::nan("")})
    EXPECT_THROW(split_indices(10, bad, 1), UsageError);
}

// ---------------------------------------------------------------------------------------------
// BatchStream
// ---------------------------------------------------------------------------------------------

TEST(Data, BatchStreamOnePassVisitsEveryIndexExactlyOnce) {
  const Dataset d = index_dataset(103);
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < 103; i += 1) if (i % 4 != 3) idx.push_back(i);  // 78 indices
  BatchStream::Options o;
  o.batch_size = 10;
  o.augment.normalize = false;
  o.seed = 9;
  BatchStream s(d, idx, o);
  ASSERT_EQ(s.batches_per_pass(), 8);
  EXPECT_EQ(s.num_examples(), 78);
  std::vector<int64_t> seen;
  for (int b = 0; b < 8; ++b) {
    const Batch batch = s.next();
    EXPECT_EQ(batch.x.size(0), b < 7 ? 10 : 8);
    EXPECT_EQ(batch.x.scalar_type(), torch::kFloat);
    for (int64_t i = 0; i < batch.x.size(0); ++i) {  // pixels follow labels
      const int64_t id = batch.y[i].item<int64_t>();
      EXPECT_TRUE(torch::allclose(batch.x[i], d.images[id].to(torch::kFloat) / 255.0));
    }
    const auto l = labels_of(batch);
    seen.insert(seen.end(), l.begin(), l.end());
  }
  EXPECT_NE(seen, idx);  // shuffled
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(seen, idx);
  EXPECT_EQ(s.position().pass, 1);
  EXPECT_EQ(s.position().batch, 0);
}

TEST(Data, BatchStreamIsPersistentAcrossPasses) {
  const Dataset d = index_dataset(30);
  BatchStream::Options o;
  o.batch_size = 8;
  o.prefetch = 3;
  BatchStream s(d, all_indices(30), o);
  ASSERT_EQ(s.batches_per_pass(), 4);
  std::vector<std::vector<int64_t>> passes(3);
  for (int p = 0; p < 3; ++p)
    for (int b = 0; b < 4; ++b) {
      EXPECT_EQ(s.position().pass, p);
      EXPECT_EQ(s.position().batch, b);
      const auto l = labels_of(s.next());
      passes[size_t(p)].insert(passes[size_t(p)].end(), l.begin(), l.end());
    }
  for (auto& p : passes) {
    auto sorted = p;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, all_indices(30));
  }
  EXPECT_NE(passes[0], passes[1]);  // a new order each pass
  EXPECT_NE(passes[1], passes[2]);
  // Without shuffling the order is the index order, every pass.
  o.shuffle = false;
  BatchStream u(d, {5, 3, 9}, o);
  EXPECT_EQ(labels_of(u.next()), (std::vector<int64_t>{5, 3, 9}));
  EXPECT_EQ(labels_of(u.next()), (std::vector<int64_t>{5, 3, 9}));
}

TEST(Data, BatchStreamDropLastAndTailRules) {
  const Dataset d = index_dataset(23);
  BatchStream::Options o;
  o.batch_size = 5;
  o.drop_last = true;
  BatchStream s(d, all_indices(23), o);
  EXPECT_EQ(s.batches_per_pass(), 4);
  for (int i = 0; i < 9; ++i) EXPECT_EQ(s.next().x.size(0), 5);
  // Fewer examples than one batch: the partial batch is kept even with drop_last.
  BatchStream small(d, {1, 2, 3}, o);
  EXPECT_EQ(small.batches_per_pass(), 1);
  EXPECT_EQ(small.next().x.size(0), 3);
  o.drop_last = false;
  BatchStream t(d, all_indices(23), o);
  EXPECT_EQ(t.batches_per_pass(), 5);
  BatchStream empty(d, {}, o);
  EXPECT_EQ(empty.batches_per_pass(), 0);
  EXPECT_THROW(empty.next(), UsageError);
}

TEST(Data, BatchStreamSameBatchesForAnyWorkerCountAndPrefetch) {
  const DatasetPair p = load_dataset("synthetic", "", 1, 300);
  BatchStream::Options o;
  o.batch_size = 32;
  o.augment = {4, true, 8, true};
  o.seed = 77;
  o.workers = 1;
  o.prefetch = 0;
  BatchStream a(p.train, all_indices(300), o);
  o.workers = 3;
  o.prefetch = 4;
  BatchStream b(p.train, all_indices(300), o);
  for (int i = 0; i < 25; ++i) ASSERT_TRUE(same(a.next(), b.next())) << "batch " << i;
  o.seed = 78;
  BatchStream c(p.train, all_indices(300), o);
  BatchStream a2(p.train, all_indices(300), [&] { auto q = o; q.seed = 77; return q; }());
  EXPECT_FALSE(same(a2.next(), c.next()));
}

TEST(Data, BatchStreamSeekReproducesTheUninterruptedStreamBitwise) {
  const DatasetPair p = load_dataset("synthetic", "", 2, 200);
  BatchStream::Options o;
  o.batch_size = 16;
  o.augment = {2, true, 6, true};
  o.workers = 2;
  o.prefetch = 3;
  BatchStream ref(p.train, all_indices(200), o);
  std::vector<Batch> expected;
  std::vector<StreamPosition> positions;
  for (int i = 0; i < 40; ++i) {  // 13 batches per pass: crosses two pass boundaries
    positions.push_back(ref.position());
    expected.push_back(ref.next());
  }
  BatchStream s(p.train, all_indices(200), o);
  for (int i = 0; i < 5; ++i) s.next();  // leaves prefetched batches in flight
  for (const int at : {17, 3, 12, 26, 39}) {
    s.seek(positions[size_t(at)]);
    EXPECT_EQ(s.position().pass, positions[size_t(at)].pass);
    EXPECT_EQ(s.position().batch, positions[size_t(at)].batch);
    for (int i = at; i < std::min(at + 3, 40); ++i)
      ASSERT_TRUE(same(s.next(), expected[size_t(i)])) << "from " << at << " batch " << i;
  }
  // A fresh stream seeked to a saved position (the resume path).
  BatchStream r(p.train, all_indices(200), o);
  r.seek(positions[30]);
  for (int i = 30; i < 40; ++i) ASSERT_TRUE(same(r.next(), expected[size_t(i)]));
  EXPECT_THROW(r.seek({0, 13}), UsageError);
  EXPECT_THROW(r.seek({-1, 0}), UsageError);
}

TEST(Data, BatchStreamRanksPartitionTheGlobalBatch) {
  const DatasetPair p = load_dataset("synthetic", "", 3, 100);
  BatchStream::Options o;
  o.augment = {3, true, 5, true};
  o.seed = 5;
  o.batch_size = 24;
  o.world = 1;
  BatchStream global(p.train, all_indices(100), o);  // 5 global batches: 4 x 24 + 4
  o.batch_size = 12;
  o.world = 2;
  o.rank = 0;
  BatchStream r0(p.train, all_indices(100), o);
  o.rank = 1;
  o.prefetch = 0;
  BatchStream r1(p.train, all_indices(100), o);
  ASSERT_EQ(global.batches_per_pass(), 5);
  ASSERT_EQ(r0.batches_per_pass(), 5);
  ASSERT_EQ(r1.batches_per_pass(), 5);
  for (int b = 0; b < 10; ++b) {
    const Batch g = global.next(), a = r0.next(), c = r1.next();
    EXPECT_EQ(a.x.size(0), b % 5 == 4 ? 2 : 12);
    EXPECT_EQ(c.x.size(0), b % 5 == 4 ? 2 : 12);
    EXPECT_TRUE(torch::equal(torch::cat({a.x, c.x}), g.x)) << "batch " << b;
    EXPECT_TRUE(torch::equal(torch::cat({a.y, c.y}), g.y));
  }
  // A tail smaller than the world size is skipped, so no rank ever gets an empty batch.
  o.batch_size = 4;
  o.world = 3;
  o.rank = 2;
  BatchStream r2(p.train, all_indices(14), o);  // 12 + tail of 2 < 3 ranks
  EXPECT_EQ(r2.batches_per_pass(), 1);
  o.rank = 3;
  EXPECT_THROW(BatchStream(p.train, all_indices(14), o), UsageError);
  o.rank = 0;
  o.world = 20;
  EXPECT_THROW(BatchStream(p.train, all_indices(14), o), UsageError);  // fewer examples than ranks
}

TEST(Data, NormalizationGivesZeroMeanUnitStdOverAPass) {
  const DatasetPair p = load_dataset("synthetic", "", 4, 500);
  BatchStream::Options o;
  o.batch_size = 100;
  o.augment = {0, false, 0, true};
  BatchStream s(p.train, all_indices(500), o);
  std::vector<torch::Tensor> xs;
  for (int i = 0; i < 5; ++i) xs.push_back(s.next().x);
  const auto x = torch::cat(xs);
  EXPECT_NEAR(x.mean().item<double>(), 0.0, 1e-4);
  EXPECT_NEAR(x.std(/*unbiased=*/false).item<double>(), 1.0, 1e-4);
  // Exactly (v/255 - mean)/std per pixel, in dataset order when not shuffling.
  o.shuffle = false;
  BatchStream u(p.train, all_indices(500), o);
  const auto want = (p.train.images.slice(0, 0, 100).to(torch::kFloat) / 255.0 -
                     p.train.mean[0]) / p.train.std[0];
  EXPECT_TRUE(torch::allclose(u.next().x, want, 1e-5, 1e-5));
}

TEST(Data, FlipAndCropMovePixelsLikeTorchvision) {
  // Images whose pixel values encode their coordinates: (y * 8 + x + 1).
  Dataset d;
  const int64_t n = 64;
  d.images = torch::empty({n, 1, 8, 8}, torch::kUInt8);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t y = 0; y < 8; ++y)
      for (int64_t x = 0; x < 8; ++x) d.images[i][0][y][x] = uint8_t(y * 8 + x + 1);
  d.labels = torch::arange(n, torch::kLong);
  compute_normalization(d);
  BatchStream::Options o;
  o.batch_size = n;
  o.augment = {2, true, 0, false};
  BatchStream s(d, all_indices(n), o);
  const Batch b = s.next();
  const auto src = d.images[0][0].to(torch::kFloat) / 255.0;
  int flipped = 0, shifted = 0;
  for (int64_t i = 0; i < n; ++i) {
    const auto out = b.x[i][0];
    bool matched = false;
    for (int dy = -2; dy <= 2 && !matched; ++dy)
      for (int dx = -2; dx <= 2 && !matched; ++dx)
        for (const bool flip : {false, true}) {
          auto want = torch::zeros({8, 8});
          for (int y = 0; y < 8; ++y)
            for (int x = 0; x < 8; ++x) {
              const int sx = (flip ? 7 - x : x) + dx, sy = y + dy;
              if (sx >= 0 && sx < 8 && sy >= 0 && sy < 8) want[y][x] = src[sy][sx];
            }
          if (torch::allclose(out, want, 0.0, 1e-6)) {
            matched = true;
            flipped += flip;
            shifted += (dx != 0 || dy != 0);
            break;
          }
        }
    EXPECT_TRUE(matched) << "image " << i << " is no padded crop/flip of the source";
  }
  EXPECT_GT(flipped, 16);  // about half of 64
  EXPECT_LT(flipped, 48);
  EXPECT_GT(shifted, 40);  // 24 of 25 offsets move pixels
}

TEST(Data, PaddedPixelsAreRawZeroBeforeNormalisation) {
  Dataset d;
  d.images = torch::full({32, 1, 4, 4}, 200, torch::kUInt8);
  d.labels = torch::zeros({32}, torch::kLong);
  d.mean = {0.5f};
  d.std = {0.25f};
  BatchStream::Options o;
  o.batch_size = 32;
  o.augment = {3, false, 0, true};
  BatchStream s(d, all_indices(32), o);
  const auto x = s.next().x;
  const float inside = (200.0f / 255.0f - 0.5f) / 0.25f, pad = (0.0f - 0.5f) / 0.25f;
  EXPECT_TRUE(((x == inside) | (x == pad)).all().item<bool>());
  EXPECT_TRUE((x == pad).any().item<bool>());
}

TEST(Data, CutoutZeroesAClippedSquareAfterNormalisation) {
  Dataset d;
  d.images = torch::full({200, 2, 12, 12}, 255, torch::kUInt8);
  d.labels = torch::zeros({200}, torch::kLong);
  d.mean = {0.25f, 0.5f};
  d.std = {0.5f, 0.25f};
  BatchStream::Options o;
  o.batch_size = 200;
  o.augment = {0, false, 6, true};
  BatchStream s(d, all_indices(200), o);
  const auto x = s.next().x;
  int clipped = 0;
  for (int64_t i = 0; i < 200; ++i) {
    const auto zero = (x[i] == 0);
    EXPECT_TRUE(torch::equal(zero[0], zero[1])) << "same square in every channel";
    const auto z = zero[0];
    const auto rows = z.any(1).nonzero().view(-1), cols = z.any(0).nonzero().view(-1);
    ASSERT_GT(rows.numel(), 0) << "image " << i;
    const int64_t h = rows.numel(), w = cols.numel();
    // A solid rectangle of at most 6x6, exactly 6x6 unless clipped by a border.
    EXPECT_EQ(z.sum().item<int64_t>(), h * w);
    EXPECT_EQ(rows[-1].item<int64_t>() - rows[0].item<int64_t>() + 1, h);
    EXPECT_LE(h, 6);
    EXPECT_LE(w, 6);
    if (h < 6 || w < 6) {
      ++clipped;
      EXPECT_TRUE(rows[0].item<int64_t>() == 0 || rows[-1].item<int64_t>() == 11 ||
                  cols[0].item<int64_t>() == 0 || cols[-1].item<int64_t>() == 11);
    }
    // Outside the square: the normalised value of 255.
    EXPECT_TRUE((x[i][0].masked_select(~z) == (1.0f - 0.25f) / 0.5f).all().item<bool>());
    EXPECT_TRUE((x[i][1].masked_select(~z) == (1.0f - 0.5f) / 0.25f).all().item<bool>());
  }
  EXPECT_GT(clipped, 20);
  EXPECT_LT(clipped, 190);
}

TEST(Data, BatchStreamRejectsBadOptions) {
  const Dataset d = index_dataset(10);
  BatchStream::Options o;
  auto make = [&](auto edit) {
    BatchStream::Options q = o;
    edit(q);
    BatchStream s(d, all_indices(10), q);
  };
  EXPECT_THROW(make([](auto& q) { q.batch_size = 0; }), UsageError);
  EXPECT_THROW(make([](auto& q) { q.workers = 0; }), UsageError);
  EXPECT_THROW(make([](auto& q) { q.prefetch = -1; }), UsageError);
  EXPECT_THROW(make([](auto& q) { q.world = 0; }), UsageError);
  EXPECT_THROW(make([](auto& q) { q.augment.cutout = -1; }), UsageError);
  EXPECT_THROW(BatchStream(d, {0, 10}, o), UsageError);
  EXPECT_THROW(BatchStream(d, {-1}, o), UsageError);
}

TEST(Data, BatchStreamDestroysCleanlyWithBatchesInFlight) {
  const DatasetPair p = load_dataset("synthetic", "", 1, 2000);
  BatchStream::Options o;
  o.batch_size = 256;
  o.workers = 4;
  o.prefetch = 16;
  o.augment = {4, true, 16, true};
  for (int k = 0; k < 5; ++k) {
    BatchStream s(p.train, all_indices(2000), o);
    s.next();
    s.seek({3, 2});
    s.next();
  }  // each destructor joins its workers while batches are still queued
  SUCCEED();
}
