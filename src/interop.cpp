#include "noisydarts/interop.h"

#include <caffe2/serialize/inline_container.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include "noisydarts/engine.h"
#include "noisydarts/checkpoint.h"
#include "noisydarts/config.h"
#include "noisydarts/error.h"
#include "noisydarts/search.h"
#include "noisydarts/search_network.h"
#include "noisydarts/train.h"

namespace noisydarts {

// ------------------------------------------------------------------------------------------
// State dicts of modules
// ------------------------------------------------------------------------------------------

StateDict module_state_dict(const torch::nn::Module& m) {
  StateDict sd;
  for (const auto& item : m.named_modules(/*name_prefix=*/"", /*include_self=*/true)) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false))
      if (p.value().defined()) sd.emplace_back(prefix + p.key(), p.value());
    for (const auto& b : item.value()->named_buffers(/*recurse=*/false))
      if (b.value().defined()) sd.emplace_back(prefix + b.key(), b.value());
  }
  return sd;
}

void load_module_state(torch::nn::Module& m, const StateDict& sd, const std::string& source,
                       const std::vector<std::string>& ignore) {
  std::map<std::string, torch::Tensor> given;
  const std::set<std::string> skip(ignore.begin(), ignore.end());
  for (const auto& [k, v] : sd)
    if (!skip.count(k)) given[k] = v;
  std::vector<std::string> missing, mismatched;
  std::set<std::string> used;
  torch::NoGradGuard no_grad;
  for (const auto& [k, target] : module_state_dict(m)) {
    auto it = given.find(k);
    if (it == given.end()) {
      const std::string suffix = "num_batches_tracked";
      if (k.size() < suffix.size() || k.compare(k.size() - suffix.size(), suffix.size(), suffix) != 0)
        missing.push_back(k);
      continue;
    }
    used.insert(k);
    if (it->second.sizes() != target.sizes()) {
      std::ostringstream o;
      o << k << " has shape " << it->second.sizes() << " in the file, " << target.sizes() << " here";
      mismatched.push_back(o.str());
      continue;
    }
    target.copy_(it->second.to(target.device(), target.scalar_type()));
  }
  std::vector<std::string> unexpected;
  for (const auto& [k, v] : given)
    if (!used.count(k)) unexpected.push_back(k);
  if (missing.empty() && unexpected.empty() && mismatched.empty()) return;
  auto first = [](const std::vector<std::string>& v) {
    std::string s;
    for (size_t i = 0; i < v.size() && i < 3; ++i) s += (i ? ", " : "") + v[i];
    if (v.size() > 3) s += ", ... (" + std::to_string(v.size()) + " in all)";
    return s;
  };
  std::string msg = source + " does not match this network:";
  if (!mismatched.empty()) msg += " shape mismatch: " + first(mismatched) + ";";
  if (!missing.empty()) msg += " missing keys: " + first(missing) + ";";
  if (!unexpected.empty()) msg += " unexpected keys: " + first(unexpected) + ";";
  msg += " (check --genotype/--channels/--layers/--classes/--in-channels)";
  throw CheckpointError(msg);
}

// ------------------------------------------------------------------------------------------
// Writing: LibTorch's pickler writes the zip format Python's torch.load reads.
// ------------------------------------------------------------------------------------------

namespace {
void write_ivalue(const c10::IValue& v, const std::string& path) {
  std::vector<char> bytes;
  try {
    bytes = torch::pickle_save(v);
  } catch (const c10::Error& e) {
    throw IoError("cannot serialise " + path + ": " + e.what_without_backtrace());
  }
  write_file_atomic(path, std::string(bytes.data(), bytes.size()));
}
}  // namespace

void save_state_dict(const StateDict& sd, const std::string& path) {
  c10::Dict<std::string, at::Tensor> d;
  for (const auto& [k, v] : sd) d.insert(k, v.detach().to(torch::kCPU).contiguous());
  write_ivalue(c10::IValue(d), path);
}

void save_tensor_file(const torch::Tensor& t, const std::string& path) {
  write_ivalue(c10::IValue(t.detach().to(torch::kCPU).contiguous()), path);
}

// ------------------------------------------------------------------------------------------
// Reading: a small unpickler for what torch.save writes (protocol 2): dicts/OrderedDicts,
// tuples, lists, scalars, strings and tensors rebuilt from persistent storage records.
// LibTorch's own unpickler rejects OrderedDict, the type of every Python state_dict().
// ------------------------------------------------------------------------------------------

namespace {

struct PyObj;
using PyPtr = std::shared_ptr<PyObj>;
struct PyObj {
  enum Kind { kNone, kBool, kInt, kFloat, kStr, kTuple, kList, kDict, kGlobal, kTensor, kMark };
  Kind kind = kNone;
  int64_t i = 0;
  double d = 0;
  std::string s;  // string value, or "module.name" of a global
  std::vector<PyPtr> items;
  std::vector<std::pair<PyPtr, PyPtr>> entries;
  torch::Tensor t;
};

PyPtr make(PyObj::Kind k) {
  auto p = std::make_shared<PyObj>();
  p->kind = k;
  return p;
}

c10::ScalarType storage_dtype(const std::string& type) {
  static const std::map<std::string, c10::ScalarType> k{
      {"torch.FloatStorage", torch::kFloat},     {"torch.DoubleStorage", torch::kDouble},
      {"torch.HalfStorage", torch::kHalf},       {"torch.BFloat16Storage", torch::kBFloat16},
      {"torch.LongStorage", torch::kLong},       {"torch.IntStorage", torch::kInt},
      {"torch.ShortStorage", torch::kShort},     {"torch.CharStorage", torch::kChar},
      {"torch.ByteStorage", torch::kByte},       {"torch.BoolStorage", torch::kBool}};
  auto it = k.find(type);
  if (it == k.end()) throw CheckpointError("unsupported storage type " + type);
  return it->second;
}

class MiniUnpickler {
 public:
  MiniUnpickler(const std::string& path, caffe2::serialize::PyTorchStreamReader& reader,
                const char* data, size_t size)
      : path_(path), reader_(reader), p_(data), end_(data + size) {}

  PyPtr run() {
    while (true) {
      const uint8_t op = u8();
      switch (op) {
        case 0x80: u8(); break;                       // PROTO
        case 0x95: take(8); break;                    // FRAME
        case '}': push(make(PyObj::kDict)); break;    // EMPTY_DICT
        case ']': push(make(PyObj::kList)); break;    // EMPTY_LIST
        case ')': push(make(PyObj::kTuple)); break;   // EMPTY_TUPLE
        case '(': push(make(PyObj::kMark)); break;    // MARK
        case 'N': push(make(PyObj::kNone)); break;
        case 0x88: case 0x89: {                       // NEWTRUE / NEWFALSE
          auto b = make(PyObj::kBool);
          b->i = op == 0x88;
          push(b);
          break;
        }
        case 'K': push_int(u8()); break;              // BININT1
        case 'M': push_int(le(2)); break;             // BININT2
        case 'J': push_int(static_cast<int32_t>(le(4))); break;  // BININT
        case 0x8a: {                                  // LONG1
          const size_t n = u8();
          int64_t v = 0;
          const char* b = take(n);
          for (size_t k = 0; k < n && k < 8; ++k) v |= static_cast<int64_t>(static_cast<uint8_t>(b[k])) << (8 * k);
          if (n > 0 && n < 8 && (static_cast<uint8_t>(b[n - 1]) & 0x80)) v -= int64_t(1) << (8 * n);
          push_int(v);
          break;
        }
        case 'G': {                                   // BINFLOAT (big endian)
          const char* b = take(8);
          uint64_t bits = 0;
          for (int k = 0; k < 8; ++k) bits = (bits << 8) | static_cast<uint8_t>(b[k]);
          auto f = make(PyObj::kFloat);
          std::memcpy(&f->d, &bits, 8);
          push(f);
          break;
        }
        case 'X': push_str(take_str(le(4))); break;   // BINUNICODE
        case 0x8c: push_str(take_str(u8())); break;   // SHORT_BINUNICODE
        case 0x8d: push_str(take_str(le(8))); break;  // BINUNICODE8
        case 'c': {                                   // GLOBAL
          auto g = make(PyObj::kGlobal);
          const std::string module = line();  // two statements: operand order is unspecified
          g->s = module + "." + line();
          push(g);
          break;
        }
        case 0x93: {                                  // STACK_GLOBAL
          auto name = pop();
          auto mod = pop();
          auto g = make(PyObj::kGlobal);
          g->s = mod->s + "." + name->s;
          push(g);
          break;
        }
        case 'q': memo_[u8()] = top(); break;         // BINPUT
        case 'r': memo_[le(4)] = top(); break;        // LONG_BINPUT
        case 0x94: memo_[memo_.size()] = top(); break; // MEMOIZE
        case 'h': push(memo(u8())); break;            // BINGET
        case 'j': push(memo(le(4))); break;           // LONG_BINGET
        case 't': {                                   // TUPLE
          auto t = make(PyObj::kTuple);
          t->items = pop_to_mark();
          push(t);
          break;
        }
        case 0x85: case 0x86: case 0x87: {            // TUPLE1..3
          auto t = make(PyObj::kTuple);
          t->items.resize(op - 0x84);
          for (size_t k = t->items.size(); k-- > 0;) t->items[k] = pop();
          push(t);
          break;
        }
        case 'a': {                                   // APPEND
          auto v = pop();
          top()->items.push_back(v);
          break;
        }
        case 'e': {                                   // APPENDS
          auto vs = pop_to_mark();
          for (auto& v : vs) top()->items.push_back(v);
          break;
        }
        case 's': {                                   // SETITEM
          auto v = pop();
          auto k = pop();
          dict_top()->entries.emplace_back(k, v);
          break;
        }
        case 'u': {                                   // SETITEMS
          auto vs = pop_to_mark();
          auto d = dict_top();
          for (size_t k = 0; k + 1 < vs.size(); k += 2) d->entries.emplace_back(vs[k], vs[k + 1]);
          break;
        }
        case 'b': pop(); break;                       // BUILD: drop state (OrderedDict _metadata)
        case 'Q': push(persistent_load(pop())); break; // BINPERSID
        case 'R': {                                   // REDUCE
          auto args = pop();
          auto fn = pop();
          push(reduce(fn, args));
          break;
        }
        case '.': return pop();                       // STOP
        default: {
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          fail(std::string("unsupported pickle opcode ") + hex);
        }
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw CheckpointError("cannot read " + path_ + ": " + why);
  }
  const char* take(size_t n) {
    if (static_cast<size_t>(end_ - p_) < n) fail("truncated pickle data");
    const char* r = p_;
    p_ += n;
    return r;
  }
  uint8_t u8() { return static_cast<uint8_t>(*take(1)); }
  uint64_t le(size_t n) {
    const char* b = take(n);
    uint64_t v = 0;
    for (size_t k = 0; k < n; ++k) v |= static_cast<uint64_t>(static_cast<uint8_t>(b[k])) << (8 * k);
    return v;
  }
  std::string take_str(uint64_t n) { return std::string(take(n), n); }
  std::string line() {
    std::string s;
    while (true) {
      const char c = static_cast<char>(u8());
      if (c == '\n') return s;
      s += c;
    }
  }
  void push(PyPtr p) { stack_.push_back(std::move(p)); }
  void push_int(int64_t v) {
    auto p = make(PyObj::kInt);
    p->i = v;
    push(p);
  }
  void push_str(std::string s) {
    auto p = make(PyObj::kStr);
    p->s = std::move(s);
    push(p);
  }
  PyPtr top() {
    if (stack_.empty()) fail("corrupt pickle (empty stack)");
    return stack_.back();
  }
  PyPtr pop() {
    auto p = top();
    stack_.pop_back();
    return p;
  }
  PyPtr dict_top() {
    auto d = top();
    if (d->kind != PyObj::kDict) fail("corrupt pickle (SETITEM on a non-dict)");
    return d;
  }
  PyPtr memo(uint64_t k) {
    auto it = memo_.find(k);
    if (it == memo_.end()) fail("corrupt pickle (unknown memo entry)");
    return it->second;
  }
  std::vector<PyPtr> pop_to_mark() {
    std::vector<PyPtr> out;
    while (true) {
      auto p = pop();
      if (p->kind == PyObj::kMark) break;
      out.push_back(p);
    }
    return {out.rbegin(), out.rend()};
  }

  PyPtr persistent_load(const PyPtr& pid) {
    // ('storage', <storage type global>, key, location, numel)
    if (pid->kind != PyObj::kTuple || pid->items.size() < 3 || pid->items[0]->s != "storage")
      fail("unsupported persistent id");
    const std::string key = pid->items[2]->s;
    auto it = storages_.find(key);
    if (it != storages_.end()) return it->second;
    const auto dtype = storage_dtype(pid->items[1]->s);
    at::DataPtr data;
    size_t size = 0;
    try {
      std::tie(data, size) = reader_.getRecord("data/" + key);
    } catch (const c10::Error&) {
      fail("missing tensor record data/" + key);
    }
    const auto elem = c10::elementSize(dtype);
    auto t = torch::empty({static_cast<int64_t>(size / elem)}, torch::TensorOptions().dtype(dtype));
    if (size) std::memcpy(t.data_ptr(), data.get(), (size / elem) * elem);
    auto obj = make(PyObj::kTensor);
    obj->t = t;
    storages_[key] = obj;
    return obj;
  }

  static std::vector<int64_t> ints(const PyPtr& tuple) {
    std::vector<int64_t> v;
    for (const auto& x : tuple->items) v.push_back(x->i);
    return v;
  }

  PyPtr reduce(const PyPtr& fn, const PyPtr& args) {
    if (fn->kind != PyObj::kGlobal || args->kind != PyObj::kTuple) fail("unsupported REDUCE");
    const auto& a = args->items;
    if (fn->s == "collections.OrderedDict" || fn->s == "builtins.dict") return make(PyObj::kDict);
    if (fn->s == "torch._utils._rebuild_tensor_v2" || fn->s == "torch._utils._rebuild_tensor") {
      if (a.size() < 4 || a[0]->kind != PyObj::kTensor) fail("malformed tensor record");
      auto t = make(PyObj::kTensor);
      t->t = a[0]->t.as_strided(ints(a[2]), ints(a[3]), a[1]->i);
      return t;
    }
    if (fn->s == "torch._utils._rebuild_parameter" || fn->s == "torch.jit._pickle.restore_type_tag") {
      if (a.empty()) fail("malformed " + fn->s);
      return a[0];
    }
    fail("unsupported object " + fn->s + " (expected a dict of tensors or a tensor)");
  }

  std::string path_;
  caffe2::serialize::PyTorchStreamReader& reader_;
  const char* p_;
  const char* end_;
  std::vector<PyPtr> stack_;
  std::map<uint64_t, PyPtr> memo_;
  std::map<std::string, PyPtr> storages_;
};

// LibTorch's reader over bytes in memory; reads past the end return short (0 bytes).
class BytesReader final : public caffe2::serialize::ReadAdapterInterface {
 public:
  explicit BytesReader(const std::string& b) : b_(b) {}
  size_t size() const override { return b_.size(); }
  size_t read(uint64_t pos, void* buf, size_t n, const char* what = "") const override {
    if (pos >= b_.size()) return 0;
    const size_t k = std::min<uint64_t>(n, b_.size() - pos);
    std::memcpy(buf, b_.data() + pos, k);
    return k;
  }

 private:
  const std::string& b_;
};

PyPtr read_pickle_file(const std::string& path) {
  if (!std::filesystem::exists(path)) throw CheckpointError("cannot read " + path + ": no such file");
  // Read once and checked by us before LibTorch's reader sees it (docs/checkpoint.md): that
  // reader can crash on crafted archives. `bytes` outlives the reader, which reads from it.
  std::string bytes;
  {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw CheckpointError("cannot read " + path + ": " + std::strerror(errno));
    bytes.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    if (f.bad()) throw CheckpointError("cannot read " + path + ": read error");
  }
  validate_pytorch_zip_bytes(bytes.data(), bytes.size(),
                             "cannot read " + path + ": damaged or not a zip-format PyTorch file (torch.save, PyTorch >= 1.6): ",
                             /*allow_unset_crc=*/true);
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(std::make_shared<BytesReader>(bytes));
  } catch (const c10::Error&) {
    throw CheckpointError("cannot read " + path +
                          ": not a zip-format PyTorch file (save it with torch.save(obj, path), PyTorch >= 1.6)");
  }
  at::DataPtr data;
  size_t size = 0;
  try {
    std::tie(data, size) = reader->getRecord("data.pkl");
  } catch (const c10::Error&) {
    throw CheckpointError("cannot read " + path + ": no data.pkl record (not a torch.save file?)");
  }
  MiniUnpickler u(path, *reader, static_cast<const char*>(data.get()), size);
  return u.run();
}

}  // namespace

StateDict load_state_dict_file(const std::string& path) {
  auto obj = read_pickle_file(path);
  if (obj->kind != PyObj::kDict)
    throw CheckpointError(path + " does not hold a state dict (a {name: tensor} mapping)");
  StateDict sd;
  for (const auto& [k, v] : obj->entries) {
    if (k->kind != PyObj::kStr || v->kind != PyObj::kTensor)
      throw CheckpointError(path + " holds a non-tensor entry; expected a state dict of tensors");
    sd.emplace_back(k->s, v->t);
  }
  return sd;
}

torch::Tensor load_tensor_file(const std::string& path) {
  auto obj = read_pickle_file(path);
  if (obj->kind != PyObj::kTensor) throw CheckpointError(path + " does not hold a single tensor");
  return obj->t.contiguous();
}

// ------------------------------------------------------------------------------------------
// Export
// ------------------------------------------------------------------------------------------

std::pair<std::string, size_t> export_checkpoint(const std::string& checkpoint,
                                                 const std::string& out, bool with_alphas) {
  if (!std::filesystem::exists(checkpoint)) throw CheckpointError("cannot read checkpoint " + checkpoint + ": no such file");
  torch::serialize::InputArchive probe;
  std::string kind;
  load_checkpoint_archive(checkpoint, probe);
  try {
    kind = read_string(probe, "kind");
  } catch (const std::exception&) {
    throw CheckpointError("cannot read checkpoint " + checkpoint + ": not a noisydarts checkpoint or damaged");
  }
  StateDict sd;
  if (kind == "train") {
    TrainConfig cfg;
    EvalNetwork net = load_trained_network(checkpoint, &cfg);
    sd = module_state_dict(*net);
  } else if (kind == "search") {
    SearchNetwork net = load_search_network(checkpoint);
    for (auto& [k, v] : module_state_dict(*net))
      if (with_alphas || (k != "alphas_normal" && k != "alphas_reduce")) sd.emplace_back(k, v);
  } else {
    throw CheckpointError("checkpoint " + checkpoint + " has unknown kind '" + kind + "'");
  }
  save_state_dict(sd, out);
  return {kind, sd.size()};
}

SearchNetwork load_search_network(const std::string& checkpoint) {
  SearchConfig cfg = SearchConfig::preset_defaults("noisydarts", "paper");
  merge_stored_config(cfg, read_checkpoint_config(checkpoint, "search"), checkpoint);
  torch::serialize::InputArchive a;
  open_checkpoint(checkpoint, "search", a);
  DataShape shape;
  if (cfg.dataset == "folder") {
    // An image folder's class count is not part of the config (and the folder may be gone):
    // the classifier's rows give it; folder images are always RGB.
    try {
      torch::serialize::InputArchive m, head;
      torch::Tensor w;
      a.read("model", m);
      m.read("classifier", head);
      head.read("weight", w);
      shape = {3, cfg.image_size, cfg.image_size, w.size(0)};
    } catch (const std::exception&) {
      throw CheckpointError("checkpoint " + checkpoint + " lacks the classifier of its search network");
    }
  } else {
    shape = dataset_shape(cfg.dataset);
  }
  SearchNetwork net = build_search_network(cfg, shape);
  try {
    torch::serialize::InputArchive m;
    a.read("model", m);
    net->load(m);
  } catch (const std::exception& e) {
    throw CheckpointError("checkpoint " + checkpoint + " does not match its own search configuration: " +
                          std::string(e.what()).substr(0, 200));
  }
  net->eval();
  return net;
}

}  // namespace noisydarts
