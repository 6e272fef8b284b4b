// Our own structural check of a checkpoint's ZIP container, run before LibTorch's archive reader
// (caffe2 PyTorchStreamReader on miniz) sees the bytes: that reader trusts the offsets and sizes
// it reads and can crash on crafted files (pytorch#77573). docs/checkpoint.md lists what is
// checked here and what stays LibTorch's.
//
// The layout `OutputArchive::save_to` writes (LibTorch 1.13, miniz with MZ_ZIP_FLAG_WRITE_ZIP64):
//   for each record: local header (sizes 0, bit 3 set: a data descriptor follows the data),
//   an "FB" extra field padding the data to 64 bytes, the stored data, the data descriptor;
//   then the central directory, a ZIP64 end-of-central-directory record and its locator, and
//   the classic end-of-central-directory record (no comment).
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <caffe2/serialize/versions.h>

#include "noisydarts/checkpoint.h"
#include "noisydarts/error.h"

namespace noisydarts {

namespace {

constexpr uint32_t kSigLocal = 0x04034b50, kSigCentral = 0x02014b50, kSigEnd = 0x06054b50,
                   kSigEnd64 = 0x06064b50, kSigLocator64 = 0x07064b50;
constexpr uint64_t kLocalSize = 30, kCentralSize = 46, kEndSize = 22, kEnd64Size = 56, kLocator64Size = 20;
constexpr uint64_t kMaxComment = 0xffff;

// `what` is the message up to the reason ("checkpoint X is damaged or not ...: ").
[[noreturn]] void bad(const std::string& what, const std::string& reason) { throw CheckpointError(what + reason); }

// A record name as it may appear in the one-line message: printable ASCII, at most 80 chars.
std::string printable(const std::string& s) {
  std::string out;
  for (char c : s.substr(0, 80)) out.push_back(c >= 0x20 && c < 0x7f ? c : '?');
  if (s.size() > 80) out += "...";
  return out;
}

// [off, off + len) lies inside [0, limit), without overflow.
bool fits(uint64_t off, uint64_t len, uint64_t limit) { return off <= limit && len <= limit - off; }

struct Bytes {
  const unsigned char* p;
  uint64_t n;
  uint16_t u16(uint64_t o) const { return static_cast<uint16_t>(p[o] | (p[o + 1] << 8)); }
  uint32_t u32(uint64_t o) const { return static_cast<uint32_t>(u16(o)) | (static_cast<uint32_t>(u16(o + 2)) << 16); }
  uint64_t u64(uint64_t o) const { return static_cast<uint64_t>(u32(o)) | (static_cast<uint64_t>(u32(o + 4)) << 32); }
};

struct Entry {
  std::string name;
  uint64_t local = 0, size = 0, data = 0;  // local header offset, stored size, data offset
  uint64_t usize = 0;                       // original size
  bool deflated = false;
  uint32_t crc = 0;
};

// Reads the ZIP64 "extended information" extra field (id 1) of a central entry: the 8-byte
// values of the saturated fields, in the order uncompressed size, compressed size, offset.
void read_zip64_extra(const Bytes& b, uint64_t extra, uint64_t len, bool need_usize, bool need_csize,
                      bool need_offset, uint64_t& usize, uint64_t& csize, uint64_t& offset,
                      const std::string& what, const std::string& rec) {
  uint64_t o = extra;
  const uint64_t end = extra + len;
  while (o + 4 <= end) {
    const uint16_t id = b.u16(o), sz = b.u16(o + 2);
    if (sz > end - o - 4) bad(what, "record " + rec + " has an extra field running past its header");
    if (id == 1) {
      uint64_t q = o + 4;
      const uint64_t qend = q + sz;
      auto take = [&](bool need, uint64_t& v) {
        if (!need) return;
        if (qend - q < 8) bad(what, "record " + rec + " has a short ZIP64 extra field");
        v = b.u64(q);
        q += 8;
      };
      take(need_usize, usize);
      take(need_csize, csize);
      take(need_offset, offset);
      return;
    }
    o += 4 + sz;
  }
  bad(what, "record " + rec + " has saturated 32-bit fields but no ZIP64 extra field");
}

}  // namespace

void validate_pytorch_zip_bytes(const char* data, size_t size, const std::string& what, bool allow_unset_crc) {
  const Bytes b{reinterpret_cast<const unsigned char*>(data), static_cast<uint64_t>(size)};
  const uint64_t n = b.n;
  if (n < kEndSize) bad(what, "too short for a zip archive (" + std::to_string(n) + " bytes)");

  // ---- End of central directory: its comment must reach exactly the end of the file.
  uint64_t eocd = UINT64_MAX;
  const uint64_t lowest = n - kEndSize > kMaxComment ? n - kEndSize - kMaxComment : 0;
  for (uint64_t o = n - kEndSize + 1; o-- > lowest;) {
    if (b.u32(o) == kSigEnd && o + kEndSize + b.u16(o + 20) == n) {
      eocd = o;
      break;
    }
  }
  if (eocd == UINT64_MAX)
    bad(what, "no zip end-of-central-directory record (not a zip archive, or cut short)");
  if (b.u16(eocd + 4) != 0 || b.u16(eocd + 6) != 0)
    bad(what, "multi-disk zip archive");
  uint64_t entries = b.u16(eocd + 10), cd_size = b.u32(eocd + 12), cd_off = b.u32(eocd + 16);
  if (b.u16(eocd + 8) != entries) bad(what, "end record's entry counts disagree");
  uint64_t cd_end = eocd;  // the central directory ends where the (ZIP64) end records begin

  // ---- ZIP64 end record, located by the locator just before the classic end record. miniz
  // uses its values whenever it is present, so it is checked whenever it is present.
  if (eocd >= kLocator64Size && b.u32(eocd - kLocator64Size) == kSigLocator64) {
    const uint64_t loc = eocd - kLocator64Size;
    const uint64_t z = b.u64(loc + 8);
    if (b.u32(loc + 4) != 0 || b.u32(loc + 16) != 1) bad(what, "multi-disk ZIP64 archive");
    if (!fits(z, kEnd64Size, loc) || b.u32(z) != kSigEnd64)
      bad(what, "ZIP64 end-of-central-directory locator points to no ZIP64 end record");
    const uint64_t rec_size = b.u64(z + 4);
    if (rec_size < kEnd64Size - 12 || rec_size != loc - z - 12)
      bad(what, "ZIP64 end record has a wrong size field");
    if (b.u32(z + 16) != 0 || b.u32(z + 20) != 0) bad(what, "multi-disk ZIP64 archive");
    const uint64_t e64 = b.u64(z + 32), s64 = b.u64(z + 40), o64 = b.u64(z + 48);
    if (b.u64(z + 24) != e64) bad(what, "ZIP64 end record's entry counts disagree");
    // Where the classic record is not saturated it must agree with the ZIP64 one.
    if ((entries != 0xffff && entries != e64) || (cd_size != 0xffffffff && cd_size != s64) ||
        (cd_off != 0xffffffff && cd_off != o64))
      bad(what, "ZIP64 end record disagrees with the end-of-central-directory record");
    entries = e64;
    cd_size = s64;
    cd_off = o64;
    cd_end = z;
  } else if (entries == 0xffff || cd_size == 0xffffffff || cd_off == 0xffffffff) {
    bad(what, "ZIP64 sizes without a ZIP64 end record");
  }

  if (entries == 0) bad(what, "the archive holds no records");
  if (!fits(cd_off, cd_size, cd_end) || cd_off + cd_size != cd_end)
    bad(what, "central directory (offset " + std::to_string(cd_off) + ", " + std::to_string(cd_size) +
                  " bytes) does not end where the end record begins (file of " + std::to_string(n) + " bytes)");
  if (entries > cd_size / kCentralSize)
    bad(what, "end record claims " + std::to_string(entries) + " records, more than its central directory holds");

  // ---- Central directory entries.
  std::vector<Entry> recs;
  recs.reserve(static_cast<size_t>(entries));
  std::set<std::string> names;
  std::string folder;
  uint64_t p = cd_off;
  for (uint64_t i = 0; i < entries; ++i) {
    const std::string idx = "#" + std::to_string(i);
    if (!fits(p, kCentralSize, cd_end) || b.u32(p) != kSigCentral)
      bad(what, "central directory entry " + idx + " is missing or has a wrong signature");
    const uint16_t flags = b.u16(p + 8), method = b.u16(p + 10);
    const uint16_t name_len = b.u16(p + 28), extra_len = b.u16(p + 30), comment_len = b.u16(p + 32);
    const uint64_t var = static_cast<uint64_t>(name_len) + extra_len + comment_len;
    if (!fits(p + kCentralSize, var, cd_end))
      bad(what, "central directory entry " + idx + " runs past the central directory");
    Entry e;
    e.name.assign(data + p + kCentralSize, name_len);
    const std::string rec = idx + " (" + printable(e.name) + ")";
    if (name_len == 0) bad(what, "record " + idx + " has an empty name");
    // Bits miniz refuses: 0 and 6 (encryption), 5 (patch data), 13 (masked local headers).
    if (flags & 0x2061) bad(what, "record " + rec + " is encrypted or patch data (flags " + std::to_string(flags) + ")");
    // miniz takes the DOS directory attribute for a directory and then extracts nothing.
    if (b.u32(p + 38) & 0x10) bad(what, "record " + rec + " is marked as a directory");
    // LibTorch stores tensors and pickles, but deflates larger TorchScript sources (code/...).
    if (method != 0 && method != 8)
      bad(what, "record " + rec + " uses compression method " + std::to_string(method) +
                    "; checkpoints hold stored or deflated records only");
    uint64_t csize = b.u32(p + 20), usize = b.u32(p + 24), local = b.u32(p + 42);
    if (csize == 0xffffffff || usize == 0xffffffff || local == 0xffffffff)
      read_zip64_extra(b, p + kCentralSize + name_len, extra_len, usize == 0xffffffff, csize == 0xffffffff,
                       local == 0xffffffff, usize, csize, local, what, rec);
    if (b.u16(p + 34) != 0) bad(what, "record " + rec + " starts on another disk");
    if (method == 0 && csize != usize) bad(what, "record " + rec + " has different stored and original sizes");
    // Deflate expands at most ~1032:1; a larger claim would only make LibTorch allocate it.
    if (method == 8 && usize / 1032 > csize) bad(what, "record " + rec + " claims an impossible original size");
    e.size = csize;
    e.usize = usize;
    e.deflated = method == 8;
    e.local = local;
    e.crc = b.u32(p + 16);

    // Names: one top-level folder for all, no absolute paths, no "..", no NUL bytes.
    if (e.name.find('\0') != std::string::npos || e.name.find('\\') != std::string::npos)
      bad(what, "record " + rec + " has a malformed name");
    const auto slash = e.name.find('/');
    if (slash == std::string::npos || slash == 0 || slash + 1 == e.name.size())
      bad(what, "record " + rec + " is not a file inside a top-level folder");
    for (size_t s = 0; s <= e.name.size();) {
      const size_t t = std::min(e.name.find('/', s), e.name.size());
      const std::string part = e.name.substr(s, t - s);
      if (part.empty() || part == "..") bad(what, "record " + rec + " has an empty or '..' path component");
      s = t + 1;
    }
    const std::string top = e.name.substr(0, slash);
    if (folder.empty()) folder = top;
    else if (top != folder)
      bad(what, "records are not all under one folder ('" + printable(folder) + "' and '" + printable(top) + "')");
    if (!names.insert(e.name).second) bad(what, "record " + rec + " appears twice");
    recs.push_back(std::move(e));
    p += kCentralSize + var;
  }
  if (p != cd_end) bad(what, "central directory holds bytes after its last entry");

  // ---- Local headers and data: inside the file, before the central directory, disjoint.
  for (size_t i = 0; i < recs.size(); ++i) {
    Entry& e = recs[i];
    const std::string rec = "#" + std::to_string(i) + " (" + printable(e.name) + ")";
    if (!fits(e.local, kLocalSize, cd_off) || b.u32(e.local) != kSigLocal)
      bad(what, "record " + rec + " points to no local header (offset " + std::to_string(e.local) + ")");
    const uint16_t name_len = b.u16(e.local + 26), extra_len = b.u16(e.local + 28);
    if (b.u16(e.local + 8) != (e.deflated ? 8 : 0)) bad(what, "record " + rec + "'s local header has another compression method");
    if (name_len != e.name.size() || !fits(e.local + kLocalSize, name_len, cd_off) ||
        std::memcmp(data + e.local + kLocalSize, e.name.data(), name_len) != 0)
      bad(what, "record " + rec + "'s local header names another record");
    e.data = e.local + kLocalSize + name_len + extra_len;
    if (!fits(e.data, e.size, cd_off))
      bad(what, "record " + rec + " (" + std::to_string(e.size) + " bytes) runs past the start of the central directory");
    uLong crc = crc32(0L, Z_NULL, 0);
    if (e.deflated) {
      // Inflated (raw deflate) to check that it gives exactly the original size and its CRC.
      if (e.size > UINT32_MAX || e.usize > UINT32_MAX) bad(what, "record " + rec + " is too large a deflated record");
      std::vector<unsigned char> out(static_cast<size_t>(e.usize) + 1);
      z_stream zs{};
      if (inflateInit2(&zs, -15) != Z_OK) bad(what, "cannot inflate record " + rec);
      zs.next_in = const_cast<Bytef*>(b.p + e.data);
      zs.avail_in = static_cast<uInt>(e.size);
      zs.next_out = out.data();
      zs.avail_out = static_cast<uInt>(out.size());
      const int rc = inflate(&zs, Z_FINISH);
      const uint64_t got = zs.total_out;
      inflateEnd(&zs);
      if (rc != Z_STREAM_END || got != e.usize) bad(what, "record " + rec + " does not inflate to its original size");
      crc = crc32(crc, out.data(), static_cast<uInt>(got));
    } else {
      // zlib's crc32 takes a uInt length: feed large records in pieces.
      for (uint64_t o = 0; o < e.size;) {
        const uInt chunk = static_cast<uInt>(std::min<uint64_t>(e.size - o, 1u << 30));
        crc = crc32(crc, b.p + e.data + o, chunk);
        o += chunk;
      }
    }
    if (static_cast<uint32_t>(crc) != e.crc && !(allow_unset_crc && e.crc == 0)) bad(what, "record " + rec + " fails its CRC-32 check");
  }
  std::vector<const Entry*> by_offset;
  for (const auto& e : recs) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const Entry* x, const Entry* y) { return x->local < y->local; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->local < by_offset[i - 1]->data + by_offset[i - 1]->size)
      bad(what, "records " + printable(by_offset[i - 1]->name) + " and " + printable(by_offset[i]->name) + " overlap");

  // ---- The records LibTorch's reader needs: data.pkl and a version it can read. It reads
  // <folder>/.data/version when present, else <folder>/version.
  auto find = [&](const std::string& name) -> const Entry* {
    for (const auto& e : recs)
      if (e.name == folder + "/" + name) return &e;
    return nullptr;
  };
  if (!find("data.pkl")) bad(what, "no data.pkl record");
  const Entry* v = find(".data/version");
  if (!v) v = find("version");
  if (!v) bad(what, "no version record");
  if (v->deflated) bad(what, "version record is deflated");
  std::string text(data + v->data, static_cast<size_t>(std::min<uint64_t>(v->size, 64)));
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  const bool digits = !text.empty() && text.size() <= 19 &&
                      std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
  if (v->size > 32 || !digits) bad(what, "version record is not a number");
  const uint64_t version = std::stoull(text);
  if (version < caffe2::serialize::kMinSupportedFileFormatVersion ||
      version > caffe2::serialize::kMaxSupportedFileFormatVersion)
    bad(what, "archive format version " + std::to_string(version) + " is outside what LibTorch reads (" +
                  std::to_string(caffe2::serialize::kMinSupportedFileFormatVersion) + ".." +
                  std::to_string(caffe2::serialize::kMaxSupportedFileFormatVersion) + ")");
}

void validate_checkpoint_bytes(const char* data, size_t size, const std::string& what) {
  validate_pytorch_zip_bytes(data, size, "checkpoint " + what + " is damaged or not a noisydarts checkpoint: ",
                             /*allow_unset_crc=*/false);
}

std::string read_checkpoint_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw CheckpointError("cannot read checkpoint " + path + ": " + std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw CheckpointError("cannot read checkpoint " + path + ": read error");
  validate_checkpoint_bytes(bytes.data(), bytes.size(), path);
  return bytes;
}

void validate_checkpoint_file(const std::string& path) { (void)read_checkpoint_file(path); }

}  // namespace noisydarts
