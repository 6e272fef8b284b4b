// The image-folder dataset (src/image_folder.cpp): layout, decoding, resize + centre crop, errors,
// and `noisydarts search/train --dataset folder` end to end. Images are written at test time with
// stb_image_write from Debian's libstb (the library the loader links).
#include <gtest/gtest.h>
#include <stb/stb_image_write.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cli_helpers.h"
#include "noisydarts/data.h"
#include "noisydarts/error.h"

namespace fs = std::filesystem;
using namespace noisydarts;
using noisydarts::test::run_cli;

namespace {

class TempTree {
 public:
  TempTree() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("noisydarts_folder_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempTree() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path operator/(const std::string& rel) const { return path_ / rel; }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

// Pixels of a w x h image with `comp` interleaved channels, all equal to `colour`.
std::vector<uint8_t> constant(int w, int h, std::vector<uint8_t> colour) {
  std::vector<uint8_t> px;
  for (int i = 0; i < w * h; ++i) px.insert(px.end(), colour.begin(), colour.end());
  return px;
}

void write_png(const fs::path& p, int w, int h, int comp, const std::vector<uint8_t>& px) {
  fs::create_directories(p.parent_path());
  ASSERT_NE(stbi_write_png(p.c_str(), w, h, comp, px.data(), w * comp), 0) << p;
}

void write_jpg(const fs::path& p, int w, int h, int comp, const std::vector<uint8_t>& px) {
  fs::create_directories(p.parent_path());
  ASSERT_NE(stbi_write_jpg(p.c_str(), w, h, comp, px.data(), 100), 0) << p;
}

// A small learnable tree: classes zebra, ant, moth (sorted: ant=0, moth=1, zebra=2), each image a
// noisy constant of the class colour, of varying sizes; PNG and JPEG mixed.
void make_tree(const fs::path& root, int train_per_class, int val_per_class) {
  const std::vector<std::pair<std::string, std::vector<uint8_t>>> classes = {
      {"zebra", {220, 220, 220}}, {"ant", {200, 30, 30}}, {"moth", {30, 30, 200}}};
  uint32_t r = 12345;
  auto rnd = [&r] { return (r = r * 1664525u + 1013904223u) >> 24; };
  for (const auto& [name, colour] : classes)
    for (const std::string split : {"train", "val"}) {
      const int n = split == "train" ? train_per_class : val_per_class;
      for (int i = 0; i < n; ++i) {
        const int w = 20 + i % 3 * 7, h = 18 + i % 2 * 9;
        std::vector<uint8_t> px;
        for (int k = 0; k < w * h; ++k)
          for (int c = 0; c < 3; ++c) px.push_back(static_cast<uint8_t>(std::clamp<int>(colour[c] + static_cast<int>(rnd() % 41) - 20, 0, 255)));
        const fs::path base = root / split / name / ("img" + std::to_string(i));
        if (i % 2) write_jpg(base.string() + ".JPG", w, h, 3, px);
        else write_png(base.string() + ".png", w, h, 3, px);
      }
    }
}

LoadOptions options(int64_t image_size, int threads = 1) {
  LoadOptions o;
  o.image_size = image_size;
  o.threads = threads;
  return o;
}

template <class E>
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(Folder, LoadsClassesInSortedOrderWithLabelsAndShapes) {
  TempTree t;
  make_tree(t / "", 4, 2);
  // Ignored: other extensions, hidden files and folders.
  std::ofstream(t / "train/ant/notes.txt") << "not an image\n";
  write_png(t / "train/ant/.hidden.png", 4, 4, 3, constant(4, 4, {0, 0, 0}));
  const DatasetPair d = load_dataset("folder", t.str(), options(16));
  ASSERT_EQ(d.train.size(), 12);
  ASSERT_EQ(d.test.size(), 6);
  EXPECT_EQ(d.train.images.sizes(), (std::vector<int64_t>{12, 3, 16, 16}));
  EXPECT_EQ(d.test.images.sizes(), (std::vector<int64_t>{6, 3, 16, 16}));
  EXPECT_EQ(d.train.images.scalar_type(), torch::kUInt8);
  EXPECT_EQ(d.train.num_classes, 3);
  EXPECT_EQ(d.test.num_classes, 3);
  EXPECT_EQ(d.train.name, "folder");
  const std::vector<int64_t> want_train = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2};
  const auto lt = d.train.labels.contiguous();
  EXPECT_EQ(std::vector<int64_t>(lt.data_ptr<int64_t>(), lt.data_ptr<int64_t>() + 12), want_train);
  const auto lv = d.test.labels.contiguous();
  EXPECT_EQ(std::vector<int64_t>(lv.data_ptr<int64_t>(), lv.data_ptr<int64_t>() + 6),
            (std::vector<int64_t>{0, 0, 1, 1, 2, 2}));
  // Class "ant" (label 0) is red, "moth" (1) blue: the pixels follow their labels.
  const auto mean = d.train.images.to(torch::kFloat).mean({2, 3});
  EXPECT_GT(mean[0][0].item<float>(), 150);
  EXPECT_LT(mean[0][2].item<float>(), 80);
  EXPECT_GT(mean[4][2].item<float>(), 150);
  // Normalisation statistics from the training images; the test set shares them.
  ASSERT_EQ(d.train.mean.size(), 3u);
  EXPECT_NEAR(d.train.mean[0], d.train.images.select(1, 0).to(torch::kDouble).mean().item<double>() / 255, 1e-5);
  EXPECT_EQ(d.test.mean, d.train.mean);
  EXPECT_EQ(d.test.std, d.train.std);
  EXPECT_EQ(dataset_shape("folder", t.str(), 16).classes, 3);
  EXPECT_EQ(dataset_shape("folder", t.str(), 16).channels, 3);
}

TEST(Folder, ConstantColourSurvivesResizeExactly) {
  TempTree t;
  // Larger than the target (downscale), smaller (upscale), and non-square both ways.
  write_png(t / "train/a/big.png", 97, 41, 3, constant(97, 41, {10, 200, 37}));
  write_png(t / "train/a/small.png", 5, 7, 3, constant(5, 7, {10, 200, 37}));
  write_png(t / "val/a/x.png", 16, 16, 3, constant(16, 16, {10, 200, 37}));
  const DatasetPair d = load_dataset("folder", t.str(), options(16));
  ASSERT_EQ(d.train.size(), 2);
  for (int i = 0; i < 2; ++i) {
    EXPECT_TRUE(d.train.images[i][0].eq(10).all().item<bool>()) << i;
    EXPECT_TRUE(d.train.images[i][1].eq(200).all().item<bool>()) << i;
    EXPECT_TRUE(d.train.images[i][2].eq(37).all().item<bool>()) << i;
  }
}

TEST(Folder, CentreCropKeepsTheMiddleOfTheLongerSide) {
  // 30 x 10, thirds red | green | blue; the shorter side is already 10, so the 10 x 10 crop is
  // exactly the green third.
  std::vector<uint8_t> px;
  for (int y = 0; y < 10; ++y)
    for (int x = 0; x < 30; ++x) {
      const int third = x / 10;
      px.push_back(third == 0 ? 255 : 0);
      px.push_back(third == 1 ? 255 : 0);
      px.push_back(third == 2 ? 255 : 0);
    }
  const auto out = resize_center_crop(px.data(), 30, 10, 10);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{3, 10, 10}));
  EXPECT_TRUE(out[0].eq(0).all().item<bool>());
  EXPECT_TRUE(out[1].eq(255).all().item<bool>());
  EXPECT_TRUE(out[2].eq(0).all().item<bool>());
}

TEST(Folder, DownscalingAveragesInsteadOfSkippingPixels) {
  // Alternating black and white columns shrunk 4x: an antialiased resize gives mid-grey, point
  // sampling or plain bilinear would give black or white.
  std::vector<uint8_t> px;
  for (int y = 0; y < 32; ++y)
    for (int x = 0; x < 32; ++x)
      for (int c = 0; c < 3; ++c) px.push_back(x % 2 ? 255 : 0);
  const auto out = resize_center_crop(px.data(), 32, 32, 8);
  const auto v = out.to(torch::kInt);
  EXPECT_GE(v.min().item<int>(), 110);
  EXPECT_LE(v.max().item<int>(), 145);
}

TEST(Folder, GrayscaleAndRgbaBecomeRgb) {
  TempTree t;
  std::vector<uint8_t> grey;
  for (int i = 0; i < 16 * 16; ++i) grey.push_back(static_cast<uint8_t>(i));
  write_png(t / "train/a/grey.png", 16, 16, 1, grey);
  write_png(t / "train/a/rgba.png", 16, 16, 4, constant(16, 16, {40, 50, 60, 0}));
  write_jpg(t / "train/a/so_grey.jpg", 16, 16, 1, constant(16, 16, {77}));
  write_png(t / "val/a/x.png", 16, 16, 1, grey);
  const DatasetPair d = load_dataset("folder", t.str(), options(16));
  ASSERT_EQ(d.train.size(), 3);
  const auto g = d.train.images[0];  // grey.png (sorted first)
  EXPECT_TRUE(g[0].equal(g[1]));
  EXPECT_TRUE(g[0].equal(g[2]));
  EXPECT_EQ(g[0][3][5].item<uint8_t>(), 3 * 16 + 5);  // same size: the pixels as written
  const auto rgba = d.train.images[1];  // alpha 0 is dropped, the colour kept
  EXPECT_TRUE(rgba[0].eq(40).all().item<bool>());
  EXPECT_TRUE(rgba[1].eq(50).all().item<bool>());
  EXPECT_TRUE(rgba[2].eq(60).all().item<bool>());
  EXPECT_TRUE(d.train.images[2].eq(77).all().item<bool>());  // a greyscale JPEG
}

TEST(Folder, DecodesPngAndJpeg) {
  TempTree t;
  write_png(t / "train/a/p.png", 24, 24, 3, constant(24, 24, {200, 100, 50}));
  write_jpg(t / "train/a/q.jpeg", 24, 24, 3, constant(24, 24, {200, 100, 50}));
  write_jpg(t / "val/a/r.JPEG", 24, 24, 3, constant(24, 24, {200, 100, 50}));
  const DatasetPair d = load_dataset("folder", t.str(), options(12));
  ASSERT_EQ(d.train.size(), 2);
  ASSERT_EQ(d.test.size(), 1);
  EXPECT_TRUE(d.train.images[0][0].eq(200).all().item<bool>());
  // JPEG is lossy (colour conversion rounding): within a few levels.
  const auto diff = (d.train.images[1].to(torch::kInt) - d.train.images[0].to(torch::kInt)).abs();
  EXPECT_LE(diff.max().item<int>(), 3);
}

TEST(Folder, ResultDoesNotDependOnTheNumberOfThreads) {
  TempTree t;
  make_tree(t / "", 6, 2);
  const DatasetPair a = load_dataset("folder", t.str(), options(20, 1));
  const DatasetPair b = load_dataset("folder", t.str(), options(20, 3));
  EXPECT_TRUE(a.train.images.equal(b.train.images));
  EXPECT_TRUE(a.train.labels.equal(b.train.labels));
  EXPECT_TRUE(a.test.images.equal(b.test.images));
}

TEST(Folder, TestSplitIsAcceptedWhenThereIsNoVal) {
  TempTree t;
  write_png(t / "train/a/1.png", 8, 8, 3, constant(8, 8, {1, 2, 3}));
  write_png(t / "train/b/1.png", 8, 8, 3, constant(8, 8, {1, 2, 3}));
  write_png(t / "test/b/1.png", 8, 8, 3, constant(8, 8, {1, 2, 3}));
  const DatasetPair d = load_dataset("folder", t.str(), options(8));
  ASSERT_EQ(d.test.size(), 1);
  EXPECT_EQ(d.test.labels[0].item<int64_t>(), 1);  // a val/test split may lack classes
  EXPECT_EQ(d.test.num_classes, 2);
}

TEST(Folder, CorruptImageIsADataErrorNamingTheFile) {
  TempTree t;
  make_tree(t / "", 2, 1);
  const fs::path bad = t / "train/moth/zz_broken.png";
  std::ofstream(bad, std::ios::binary) << "\x89PNG\r\n\x1a\n this is not a PNG";
  for (int threads : {1, 3}) {
    const std::string msg = error_of<DataError>([&] { load_dataset("folder", t.str(), options(16, threads)); });
    EXPECT_NE(msg.find(bad.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("cannot decode"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(Folder, LayoutErrorsNameTheFolder) {
  TempTree t;
  // No train/.
  EXPECT_NE(error_of<DataError>([&] { load_dataset("folder", t.str(), options(16)); }).find("train/"), std::string::npos);
  // An empty class folder.
  make_tree(t / "", 2, 1);
  fs::create_directories(t / "train/empty");
  std::string msg = error_of<DataError>([&] { load_dataset("folder", t.str(), options(16)); });
  EXPECT_NE(msg.find((t / "train/empty").string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("no .png/.jpg/.jpeg image"), std::string::npos) << msg;
  fs::remove(t / "train/empty");
  // A val class unknown to train/.
  write_png(t / "val/unknown/1.png", 8, 8, 3, constant(8, 8, {1, 2, 3}));
  msg = error_of<DataError>([&] { load_dataset("folder", t.str(), options(16)); });
  EXPECT_NE(msg.find((t / "val/unknown").string()), std::string::npos) << msg;
  fs::remove_all(t / "val");
  // Neither val/ nor test/.
  msg = error_of<DataError>([&] { load_dataset("folder", t.str(), options(16)); });
  EXPECT_NE(msg.find("neither val/ nor test/"), std::string::npos) << msg;
  // A missing directory; no --data-dir; an image size out of range.
  EXPECT_NE(error_of<DataError>([&] { load_dataset("folder", t.str() + "/nope", options(16)); }).find("/nope"),
            std::string::npos);
  EXPECT_NE(error_of<UsageError>([&] { load_dataset("folder", "", options(16)); }).find("--data-dir"), std::string::npos);
  EXPECT_NE(error_of<UsageError>([&] { load_dataset("folder", t.str(), options(4)); }).find("--image-size"),
            std::string::npos);
  EXPECT_NE(error_of<UsageError>([] { dataset_shape("folder"); }).find("folder"), std::string::npos);
}

TEST(FolderCli, SearchAndTrainOnAFolderRun) {
  TempTree t;
  make_tree(t / "data", 12, 3);
  const std::string data = (t / "data").string();
  const fs::path run = t / "search";
  auto r = run_cli("search --dataset folder --data-dir '" + data + "' --image-size 16 --epochs 1 --channels 4 "
                   "--layers 2 --batch-size 8 --threads 1 --seed 1 -q --out '" + run.string() + "'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(run / "genotype.json"));
  std::ifstream f(run / "config.json");
  std::stringstream ss;
  ss << f.rdbuf();
  const auto cfg = nlohmann::json::parse(ss.str());
  EXPECT_EQ(cfg["dataset"], "folder");
  EXPECT_EQ(cfg["image_size"], 16);
  // The search checkpoint exports without the folder (its class count comes from the classifier).
  std::string latest;
  std::getline(std::ifstream(run / "checkpoints/latest"), latest);
  fs::rename(t / "data", t / "moved");
  r = run_cli("export -c '" + (run / "checkpoints" / latest).string() + "' -o '" + (t / "m.pt").string() + "'");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(t / "m.pt"));
  fs::rename(t / "moved", t / "data");

  const fs::path trun = t / "train";
  r = run_cli("train -q --dataset folder --data-dir '" + data + "' --image-size 12 --genotype '" +
              (run / "genotype.json").string() + "' --epochs 1 --max-steps 2 --channels 4 --layers 2 "
              "--batch-size 8 --threads 1 --out '" + trun.string() + "'");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(fs::exists(trun / "checkpoint.pt"));

  r = run_cli("search --dataset folder --data-dir '" + data + "' --image-size 1000 -q --out '" +
              (t / "bad").string() + "'");
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_NE(r.err.find("--image-size"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(FolderCli, CorruptImageFailsWithOneLineNamingTheFile) {
  TempTree t;
  make_tree(t / "data", 3, 1);
  const fs::path bad = t / "data/val/ant/broken.jpg";
  std::ofstream(bad, std::ios::binary) << "\xff\xd8\xff garbage";
  const fs::path run = t / "run";
  auto r = run_cli("search --dataset folder --data-dir '" + (t / "data").string() +
                   "' --image-size 16 --epochs 1 --channels 4 --layers 2 --threads 1 --out '" + run.string() + "'");
  EXPECT_EQ(r.code, kExitData) << r.out;
  EXPECT_NE(r.err.find(bad.string()), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_FALSE(fs::exists(run));
}
