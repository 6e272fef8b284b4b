// The extension module behind `import noisydarts` (docs/python.md). python/noisydarts/__init__.py
// wraps it: the networks become torch.nn.Modules whose parameters and buffers are the very tensors
// of the C++ modules (the torch caster of torch/csrc/utils/pybind.h hands Python the same
// TensorImpl, so gradients, optimiser steps and load_state_dict act on the C++ network).
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <pybind11/stl.h>

#include <csignal>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "noisydarts/config.h"
#include "noisydarts/engine.h"
#include "noisydarts/error.h"
#include "noisydarts/runtime.h"
#include "noisydarts/eval_network.h"
#include "noisydarts/genotype.h"
#include "noisydarts/interop.h"
#include "noisydarts/profile.h"
#include "noisydarts/report.h"
#include "noisydarts/search.h"
#include "noisydarts/search_network.h"

namespace py = pybind11;
namespace nd = noisydarts;
using json = nlohmann::json;

namespace {

// ------------------------------------------------------------------------------------------
// Exceptions: noisydarts.Error (RuntimeError) and its subclasses, noisydarts.Stopped
// (KeyboardInterrupt). Each instance carries `exit_code`, the CLI's exit code for the failure.
// ------------------------------------------------------------------------------------------

struct ExceptionTypes {
  PyObject *error = nullptr, *usage = nullptr, *config = nullptr, *data = nullptr, *checkpoint = nullptr,
           *io = nullptr, *diverged = nullptr, *distributed = nullptr, *stopped = nullptr;
};
ExceptionTypes g_exc;

PyObject* new_exception(py::module_& m, const char* name, std::vector<PyObject*> bases, const char* doc) {
  py::tuple b(bases.size());
  for (size_t i = 0; i < bases.size(); ++i) b[i] = py::reinterpret_borrow<py::object>(bases[i]);
  const std::string full = std::string("noisydarts.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(full.c_str(), doc, b.ptr(), nullptr);
  if (!type) throw py::error_already_set();
  m.add_object(name, py::reinterpret_borrow<py::object>(type));
  return type;  // a new reference, kept for the life of the process
}

void raise_as(PyObject* type, const std::string& msg, int code) {
  py::object inst = py::reinterpret_borrow<py::object>(type)(msg);
  inst.attr("exit_code") = code;
  PyErr_SetObject(type, inst.ptr());
}

void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const nd::StoppedError& e) {
    raise_as(g_exc.stopped, e.what(), e.code());
  } catch (const nd::UsageError& e) {
    raise_as(g_exc.usage, e.what(), e.code());
  } catch (const nd::ConfigError& e) {
    raise_as(g_exc.config, e.what(), e.code());
  } catch (const nd::DataError& e) {
    raise_as(g_exc.data, e.what(), e.code());
  } catch (const nd::CheckpointError& e) {
    raise_as(g_exc.checkpoint, e.what(), e.code());
  } catch (const nd::IoError& e) {
    raise_as(g_exc.io, e.what(), e.code());
  } catch (const nd::DivergedError& e) {
    raise_as(g_exc.diverged, e.what(), e.code());
  } catch (const nd::DistributedError& e) {
    raise_as(g_exc.distributed, e.what(), e.code());
  } catch (const nd::Error& e) {
    raise_as(g_exc.error, e.what(), e.code());
  } catch (const c10::ValueError& e) {  // LibTorch's own: one line, no C++ backtrace
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  }
}

// ------------------------------------------------------------------------------------------
// JSON <-> Python objects, through Python's json module (config values, metrics, genotypes)
// ------------------------------------------------------------------------------------------

json to_json(py::handle o, const std::string& where) {
  std::string text;
  try {
    text = py::module_::import("json").attr("dumps")(o, py::arg("allow_nan") = false).cast<std::string>();
  } catch (py::error_already_set& e) {
    throw nd::ConfigError(where + ": not representable as JSON: " + std::string(py::str(e.value())));
  }
  return json::parse(text);
}

py::object from_json(const json& j) { return py::module_::import("json").attr("loads")(j.dump()); }

// ------------------------------------------------------------------------------------------
// Networks
// ------------------------------------------------------------------------------------------

/// (module path, local name, tensor, is_parameter) of every defined parameter and buffer, modules
/// in pre-order and per module parameters before buffers: the order of Python's state_dict() and
/// of module_state_dict().
py::list named_tensors(torch::nn::Module& root) {
  py::list out;
  for (const auto& item : root.named_modules("", /*include_self=*/true)) {
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false))
      if (p.value().defined()) out.append(py::make_tuple(item.key(), p.key(), p.value(), true));
    for (const auto& b : item.value()->named_buffers(/*recurse=*/false))
      if (b.value().defined()) out.append(py::make_tuple(item.key(), b.key(), b.value(), false));
  }
  return out;
}

/// SearchConfig from a preset and the network keys given from Python (same keys as config.json).
nd::SearchConfig network_config(const std::string& preset, py::dict options, const std::string& where) {
  nd::SearchConfig cfg = nd::SearchConfig::preset_defaults(preset, "small");
  cfg.merge_json(to_json(options, where), where);
  cfg.finish_layering();
  cfg.validate();
  return cfg;
}

std::shared_ptr<nd::SearchNetworkImpl> make_search(const std::string& preset, py::dict options, int64_t in_channels,
                                                   int64_t num_classes) {
  const nd::SearchConfig cfg = network_config(preset, options, "noisydarts.SearchNetwork");
  if (in_channels < 1) throw nd::UsageError("noisydarts.SearchNetwork: in_channels must be >= 1, got " + std::to_string(in_channels));
  if (num_classes < 2) throw nd::UsageError("noisydarts.SearchNetwork: num_classes must be >= 2, got " + std::to_string(num_classes));
  nd::DataShape shape{in_channels, cfg.image_size, cfg.image_size, num_classes};
  return nd::build_search_network(cfg, shape).ptr();
}

std::shared_ptr<nd::EvalNetworkImpl> make_eval(const nd::Genotype& g, int64_t channels, int64_t num_classes, int64_t layers,
                                               int64_t in_channels, bool auxiliary, const std::string& style,
                                               double drop_path_prob) {
  const auto st = nd::parse_eval_style(style);
  if (channels <= 0 || layers <= 0) {
    const auto size = nd::default_eval_size(g, st);
    if (channels <= 0) channels = size.first;
    if (layers <= 0) layers = size.second;
  }
  if (num_classes < 2) throw nd::UsageError("noisydarts.EvalNetwork: num_classes must be >= 2, got " + std::to_string(num_classes));
  if (in_channels < 1) throw nd::UsageError("noisydarts.EvalNetwork: in_channels must be >= 1, got " + std::to_string(in_channels));
  if (!(drop_path_prob >= 0 && drop_path_prob < 1))
    throw nd::UsageError("noisydarts.EvalNetwork: drop_path_prob must be in [0, 1), got " + std::to_string(drop_path_prob));
  nd::EvalNetworkOptions o(channels, num_classes, layers, g);
  o.in_channels(in_channels).auxiliary(auxiliary).style(st).drop_path_prob(drop_path_prob);
  return nd::EvalNetwork(o).ptr();
}

// ------------------------------------------------------------------------------------------
// Search
// ------------------------------------------------------------------------------------------

/// For the duration of a search: the C++ SIGINT/SIGTERM handlers (a request to stop after the
/// current step, as in the CLI; Python's handler cannot run while the GIL is released), then the
/// previous handlers (Python's) back, and no pending stop request left behind.
class StopHandlerScope {
 public:
  StopHandlerScope() {
    ::sigaction(SIGINT, nullptr, &old_int_);
    ::sigaction(SIGTERM, nullptr, &old_term_);
    nd::clear_stop();
    nd::install_stop_handlers();
  }
  ~StopHandlerScope() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
    nd::clear_stop();
  }
  StopHandlerScope(const StopHandlerScope&) = delete;
  StopHandlerScope& operator=(const StopHandlerScope&) = delete;

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

py::dict search(const std::string& out, const std::string& preset, const std::string& scale, py::dict options,
                bool resume, bool quiet, py::object progress) {
  const std::string where = "noisydarts.search";
  nd::SearchConfig cfg = nd::SearchConfig::preset_defaults(preset, scale);
  const json given = to_json(options, where);
  for (const char* key : {"preset", "scale", "out"})
    if (given.contains(key)) throw nd::UsageError(where + ": give '" + key + "' as its own argument, not among the options");
  // Merged key by key (as the CLI merges its flags one by one): a refused value names its key.
  for (const auto& [k, v] : given.items()) cfg.merge_json(json{{k, v}}, where);
  if (out.empty()) throw nd::UsageError(where + ": out (the run directory) is required");
  cfg.out = out;
  cfg.finish_layering();
  if (resume && !given.contains("threads")) cfg.threads = -1;  // keep the run's own

  std::optional<py::error_already_set> callback_error;
  nd::SearchCallbacks cb;
  cb.progress = !quiet;
  cb.info = [quiet](const std::string& s) {
    if (!quiet) std::fprintf(stderr, "%s\n", s.c_str());
  };
  if (!progress.is_none()) {
    cb.on_epoch = [&progress, &callback_error](const json& m) {
      py::gil_scoped_acquire gil;
      if (callback_error) return;
      try {
        progress(from_json(m));
      } catch (py::error_already_set& e) {
        // The callback failed: stop the run as Ctrl-C would (checkpoint written), then raise it.
        callback_error.emplace(std::move(e));
        nd::request_stop(SIGINT);
      }
    };
  }

  const int threads_before = at::get_num_threads();
  nd::SearchResult r;
  try {
    StopHandlerScope handlers;
    py::gil_scoped_release nogil;
    r = nd::run_search(cfg, resume, cb);
  } catch (const nd::StoppedError& e) {
    at::set_num_threads(threads_before);
    if (callback_error) throw std::move(*callback_error);
    py::object inst = py::reinterpret_borrow<py::object>(g_exc.stopped)(
        std::string(e.what()) + "; from Python: noisydarts.search(out=" + py::repr(py::str(out)).cast<std::string>() +
        ", resume=True)");
    inst.attr("exit_code") = e.code();
    inst.attr("out") = out;
    PyErr_SetObject(g_exc.stopped, inst.ptr());
    throw py::error_already_set();
  } catch (...) {
    at::set_num_threads(threads_before);
    if (callback_error) throw std::move(*callback_error);
    throw;
  }
  at::set_num_threads(threads_before);
  if (callback_error) throw std::move(*callback_error);
  py::dict d;
  d["genotype"] = r.genotype;
  d["seconds"] = r.seconds;
  d["valid_acc"] = r.valid_acc;
  d["epochs_done"] = r.epochs_done;
  d["stopped_early_at"] = r.stopped_early_at;
  d["out"] = out;
  return d;
}

nd::Genotype genotype_from_json_object(py::object o) {
  if (py::isinstance<py::str>(o)) {
    json j;
    try {
      j = json::parse(o.cast<std::string>());
    } catch (const json::parse_error& e) {
      throw nd::ConfigError(std::string("genotype JSON: ") + e.what());
    }
    return nd::genotype_from_json(j);
  }
  return nd::genotype_from_json(to_json(o, "genotype JSON"));
}

}  // namespace

PYBIND11_MODULE(_noisydarts, m) {
  m.doc() = "noisydarts C++ core (use the `noisydarts` package)";

  g_exc.error = new_exception(m, "Error", {PyExc_RuntimeError}, "A noisydarts failure; exit_code is the CLI's exit code.");
  g_exc.usage = new_exception(m, "UsageError", {g_exc.error, PyExc_ValueError}, "Bad option value.");
  g_exc.config = new_exception(m, "ConfigError", {g_exc.error, PyExc_ValueError}, "Invalid configuration or genotype.");
  g_exc.data = new_exception(m, "DataError", {g_exc.error}, "Dataset missing, corrupt or inconsistent.");
  g_exc.checkpoint = new_exception(m, "CheckpointError", {g_exc.error}, "Checkpoint or state dict unreadable or incompatible.");
  g_exc.io = new_exception(m, "IoError", {g_exc.error}, "Output cannot be written.");
  g_exc.diverged = new_exception(m, "DivergedError", {g_exc.error}, "NaN/Inf loss; the last good checkpoint is kept.");
  g_exc.distributed = new_exception(m, "DistributedError", {g_exc.error}, "Data-parallel run failed.");
  g_exc.stopped = new_exception(m, "Stopped", {PyExc_KeyboardInterrupt},
                                "A search stopped by Ctrl-C/SIGTERM after writing a checkpoint; `out` can be resumed.");
  py::register_exception_translator(&translate);

  // Genotypes.
  py::class_<nd::Genotype>(m, "Genotype", "A derived architecture (darts, nb201 or mbv2 family).")
      .def_readonly("space", &nd::Genotype::space)
      .def_readonly("normal", &nd::Genotype::normal)
      .def_readonly("normal_concat", &nd::Genotype::normal_concat)
      .def_readonly("reduce", &nd::Genotype::reduce)
      .def_readonly("reduce_concat", &nd::Genotype::reduce_concat)
      .def_readonly("layers", &nd::Genotype::layers)
      .def_readonly("se_ratio", &nd::Genotype::se_ratio)
      .def_readonly("swish", &nd::Genotype::swish)
      .def("to_json", [](const nd::Genotype& g) { return from_json(nd::genotype_to_json(g)); },
           "The JSON form as a dict (what genotype.json holds).")
      .def("to_text", &nd::genotype_to_text, "DARTS text form `Genotype(normal=[...], ...)` (nb201: arch string; mbv2: mbv2:...).")
      .def("nb201_string", &nd::nb201_arch_string, "NAS-Bench-201 architecture string (nb201 genotypes only).")
      .def("__str__", &nd::genotype_to_text)
      .def("__repr__", [](const nd::Genotype& g) {
        return "noisydarts.genotype(" + py::repr(py::str(nd::genotype_to_text(g))).cast<std::string>() + ")";
      })
      .def("__eq__", [](const nd::Genotype& a, const nd::Genotype& b) { return a == b; })
      .def("__hash__", [](const nd::Genotype& g) { return py::hash(py::str(nd::genotype_to_text(g))); });
  m.def("genotype_from_json", &genotype_from_json_object, py::arg("j"), "Parses the JSON form (dict or JSON string).");
  m.def("genotype_from_text", &nd::genotype_from_text, py::arg("text"), "Parses a text form (DARTS, NB201, mbv2).");
  m.def("genotype_from_nb201", &nd::nb201_from_string, py::arg("arch"), "Parses a NAS-Bench-201 arch string.");
  m.def("resolve_genotype", &nd::resolve_genotype, py::arg("spec"),
        "A built-in name, a .json/text file, a run directory or inline JSON/text (like --genotype).");
  m.def("builtin_genotype_names", &nd::builtin_genotype_names);

  // Networks.
  py::class_<nd::SearchNetworkImpl, std::shared_ptr<nd::SearchNetworkImpl>>(m, "_SearchNetwork")
      .def(py::init(&make_search), py::arg("preset"), py::arg("options"), py::arg("in_channels"), py::arg("num_classes"))
      .def("forward", [](nd::SearchNetworkImpl& n, const torch::Tensor& x) { return n.forward(x); },
           py::call_guard<py::gil_scoped_release>())
      .def("train", [](nd::SearchNetworkImpl& n, bool on) { n.train(on); })
      .def("is_training", [](const nd::SearchNetworkImpl& n) { return n.is_training(); })
      .def("genotype", &nd::SearchNetworkImpl::genotype)
      .def("named_tensors", [](nd::SearchNetworkImpl& n) { return named_tensors(n); })
      .def("weight_parameters", &nd::SearchNetworkImpl::weight_parameters)
      .def("arch_parameters", &nd::SearchNetworkImpl::arch_parameters)
      .def("arch_names", &nd::SearchNetworkImpl::arch_names)
      .def("candidates", &nd::SearchNetworkImpl::candidates)
      .def("arch_weights", [](const nd::SearchNetworkImpl& n, size_t i) {
        if (i >= n.arch_parameters().size()) throw py::index_error("no architecture parameter " + std::to_string(i));
        return n.arch_weights(i);
      })
      .def("set_noise_decay", &nd::SearchNetworkImpl::set_noise_decay, py::arg("decay"))
      .def("state_dict", [](nd::SearchNetworkImpl& n) { return nd::module_state_dict(n); },
           "module_state_dict of the C++ module: (key, tensor) pairs, the tensors themselves.")
      .def("loss_and_grads", [](nd::SearchNetworkImpl& n, const torch::Tensor& x, const torch::Tensor& y) {
        // Cross-entropy and its gradients w.r.t. arch_parameters() + weight_parameters(), all in
        // C++ (torch::autograd::grad; no .grad is touched): the reference for Python's autograd.
        py::gil_scoped_release nogil;
        auto loss = torch::nn::functional::cross_entropy(n.forward(x), y);
        std::vector<torch::Tensor> inputs = n.arch_parameters();
        for (auto& w : n.weight_parameters()) inputs.push_back(w);
        auto grads = torch::autograd::grad({loss}, inputs, {}, c10::nullopt, false, /*allow_unused=*/true);
        return std::make_pair(loss.detach(), grads);
      });

  py::class_<nd::EvalNetworkImpl, std::shared_ptr<nd::EvalNetworkImpl>>(m, "_EvalNetwork")
      .def(py::init(&make_eval), py::arg("genotype"), py::arg("C"), py::arg("num_classes"), py::arg("layers"),
           py::arg("in_channels"), py::arg("auxiliary"), py::arg("style"), py::arg("drop_path_prob"))
      .def("forward", [](nd::EvalNetworkImpl& n, const torch::Tensor& x, const std::string& precision) {
             const nd::Precision p = nd::parse_precision(precision);
             if (p != nd::Precision::kFp32 && n.is_training())
               throw nd::UsageError("precision bf16 is for evaluation passes: call eval() first");
             nd::EvalOutput o;
             {
               py::gil_scoped_release nogil;
               nd::PrecisionScope scope(p, x.device());
               o = n.forward(x);
               o.logits = o.logits.to(torch::kFloat);  // itself in fp32
             }
             return py::make_tuple(o.logits, o.aux_logits.defined() ? py::cast(o.aux_logits) : py::none());
           }, py::arg("x"), py::arg("precision") = "fp32")
      .def("train", [](nd::EvalNetworkImpl& n, bool on) { n.train(on); })
      .def("is_training", [](const nd::EvalNetworkImpl& n) { return n.is_training(); })
      .def("genotype", [](const nd::EvalNetworkImpl& n) { return n.options().genotype(); })
      .def("channels", [](const nd::EvalNetworkImpl& n) { return n.options().channels(); })
      .def("layers", [](const nd::EvalNetworkImpl& n) { return n.options().layers(); })
      .def("named_tensors", [](nd::EvalNetworkImpl& n) { return named_tensors(n); })
      .def("state_dict", [](nd::EvalNetworkImpl& n) { return nd::module_state_dict(n); })
      .def_property("drop_path_prob", &nd::EvalNetworkImpl::drop_path_prob, &nd::EvalNetworkImpl::set_drop_path_prob);

  // Runs, profiles, reports, files.
  m.def("search", &search, py::arg("out"), py::arg("preset"), py::arg("scale"), py::arg("options"), py::arg("resume"),
        py::arg("quiet"), py::arg("progress"));
  m.def("profile", [](const nd::Genotype& g, int64_t channels, int64_t layers, const std::string& dataset,
                      const std::string& style) {
          const auto st = nd::parse_eval_style(style.empty() ? (dataset == "imagenet" ? "imagenet" : "cifar") : style);
          const auto size = nd::default_eval_size(g, st);
          if (channels <= 0) channels = size.first;
          if (layers <= 0) layers = size.second;
          const auto p = nd::profile_genotype(g, channels, layers, nd::dataset_shape(dataset), st);
          py::dict d;
          d["params"] = p.params;
          d["macs"] = p.macs;
          d["channels"] = channels;
          d["layers"] = layers;
          return d;
        },
        py::arg("genotype"), py::arg("C"), py::arg("layers"), py::arg("dataset"), py::arg("style"));
  m.def("report", &nd::write_report, py::arg("run_dir"), py::call_guard<py::gil_scoped_release>());
  m.def("export_checkpoint", [](const std::string& ckpt, const std::string& out, bool with_alphas) {
          return nd::export_checkpoint(ckpt, out, with_alphas);
        },
        py::arg("checkpoint"), py::arg("out"), py::arg("with_alphas"));
  m.def("latest_checkpoint", &nd::latest_checkpoint, py::arg("run_dir"));
}
