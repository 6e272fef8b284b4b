// `noisydarts export` and `noisydarts predict`: weights exchanged with PyTorch (SPEC 6).
#include <cstdio>
#include <memory>
#include <sstream>

#include "commands.h"
#include "config_flags.h"
#include "noisydarts/error.h"
#include "noisydarts/eval_network.h"
#include "noisydarts/genotype.h"
#include "noisydarts/interop.h"
#include "noisydarts/runtime.h"
#include "noisydarts/ops.h"
#include "noisydarts/search_network.h"

namespace noisydarts::cli {

void add_export_command(CLI::App& app, Action& run) {
  struct State {
    std::string checkpoint, out;
    bool no_alphas = false;
  };
  auto st = std::make_shared<State>();
  auto* cmd = app.add_subcommand("export", "Write a checkpoint's network as a PyTorch state dict (reference key names; torch.load reads it)");
  cmd->add_option("-c,--checkpoint", st->checkpoint, "A search or train checkpoint")->required();
  cmd->add_option("-o,--out", st->out, "Output file, e.g. model.pt")->required();
  cmd->add_flag("--no-alphas", st->no_alphas, "Search checkpoints: leave alphas_normal/alphas_reduce out (then the file loads into the reference Network with strict=True as is)");
  cmd->callback([st, &run] {
    run = [st] {
      const auto [kind, n] = export_checkpoint(st->checkpoint, st->out, !st->no_alphas);
      std::fprintf(stderr, "exported the %s network of %s: %zu tensors -> %s\n",
                   kind == "search" ? "search" : "evaluation", st->checkpoint.c_str(), n, st->out.c_str());
      return kExitOk;
    };
  });
}

namespace {

bool has_prefix(const StateDict& sd, const std::string& prefix) {
  for (const auto& kv : sd)
    if (kv.first.rfind(prefix, 0) == 0) return true;
  return false;
}

const torch::Tensor* find_key(const StateDict& sd, const std::string& key) {
  for (const auto& kv : sd)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

}  // namespace

void add_predict_command(CLI::App& app, Action& run) {
  struct State {
    std::string weights, input, out, genotype, network = "cifar", ops;
    bool search_network = false;
    int64_t channels = 0, layers = 0, in_channels = 3, classes = 10;
    int threads = 0;
    std::string precision = "fp32";
  };
  auto st = std::make_shared<State>();
  auto* cmd = app.add_subcommand("predict", "Eval-mode logits of a network loaded from a PyTorch state dict, for a tensor saved with torch.save");
  cmd->add_option("-w,--weights", st->weights, "State dict file (torch.save(model.state_dict()) or noisydarts export)")->required();
  cmd->add_option("-i,--input", st->input, "Float tensor [N, C, H, W] saved with torch.save")->required();
  cmd->add_option("-o,--out", st->out, "Output: logits [N, classes], readable by torch.load")->required();
  auto* g = cmd->add_option("-g,--genotype", st->genotype, "Evaluation network of this genotype (built-in name, file or inline)");
  auto* s = cmd->add_flag("--search-network", st->search_network, "The search network (supernet) with the file's alphas");
  g->excludes(s);
  cmd->add_option("--channels", st->channels, "Initial channels C (default: 36 evaluation, 16 search)");
  cmd->add_option("--layers", st->layers, "Number of cells L (default: 20 evaluation, 8 search)");
  cmd->add_option("--in-channels", st->in_channels, "Image channels")->capture_default_str();
  cmd->add_option("--classes", st->classes, "Number of classes")->capture_default_str();
  cmd->add_option("--network", st->network, "Evaluation network layout: cifar | imagenet")
      ->check(CLI::IsMember({"cifar", "imagenet"}))->capture_default_str();
  cmd->add_option("--ops", st->ops, "Search network: comma-separated candidate ops (default: from the alphas' width, 7 = noisydarts, 8 = darts)");
  cmd->add_option("--threads", st->threads, "Compute threads (0 = all cores)");
  add_precision_option(cmd, st->precision);
  cmd->callback([st, &run] {
    run = [st] {
      if (st->genotype.empty() == !st->search_network)
        throw UsageError("predict needs exactly one of --genotype G or --search-network");
      const Precision precision = parse_precision(st->precision);
      if (precision != Precision::kFp32 && st->search_network)
        throw UsageError("--precision bf16 is implemented for evaluation networks (--genotype), not --search-network: use fp32");
      check_threads(st->threads);
      if (st->threads > 0) at::set_num_threads(st->threads);
      StateDict sd = load_state_dict_file(st->weights);
      torch::Tensor x = load_tensor_file(st->input);
      if (x.dim() != 4 || x.size(1) != st->in_channels)
        throw UsageError("--input " + st->input + " must hold a float tensor [N, " + std::to_string(st->in_channels) +
                         ", H, W]");
      x = x.to(torch::kFloat);
      torch::NoGradGuard no_grad;  // building and loading; the forward itself runs in inference mode
      torch::Tensor logits;
      try {
        if (!st->search_network) {
          EvalNetworkOptions o(st->channels > 0 ? st->channels : 36, st->classes, st->layers > 0 ? st->layers : 20,
                               resolve_genotype(st->genotype));
          o.in_channels(st->in_channels).style(parse_eval_style(st->network)).auxiliary(has_prefix(sd, "auxiliary_head."));
          EvalNetwork net(o);
          load_module_state(*net, sd, st->weights);
          net->eval();
          torch::InferenceMode im;
          PrecisionScope scope(precision, x.device());
          logits = net->forward(x).logits.to(torch::kFloat);
        } else {
          std::vector<std::string> ops;
          if (!st->ops.empty()) {
            std::stringstream ss(st->ops);
            for (std::string item; std::getline(ss, item, ',');)
              if (!item.empty()) ops.push_back(item);
          } else {
            const torch::Tensor* a = find_key(sd, "alphas_normal");
            if (!a) throw CheckpointError(st->weights + " has no alphas_normal/alphas_reduce: a search network needs them (export without --no-alphas)");
            if (a->dim() != 2 || (a->size(1) != 7 && a->size(1) != 8))
              throw UsageError("cannot infer the candidate ops from alphas of width " + std::to_string(a->size(-1)) + ": pass --ops");
            ops = a->size(1) == 7 ? noisydarts_primitives() : darts_primitives();
          }
          SearchNetworkOptions o(st->channels > 0 ? st->channels : 16, st->classes, st->layers > 0 ? st->layers : 8);
          o.in_channels(st->in_channels).primitives(ops);
          SearchNetwork net = make_search_network(o);
          load_module_state(*net, sd, st->weights);
          net->eval();
          torch::InferenceMode im;
          logits = net->forward(x);
        }
      } catch (const c10::Error& e) {
        throw UsageError(std::string("cannot run this network: ") + e.what_without_backtrace());
      }
      save_tensor_file(logits, st->out);
      std::fprintf(stderr, "logits [%lld, %lld] -> %s\n", static_cast<long long>(logits.size(0)),
                   static_cast<long long>(logits.size(1)), st->out.c_str());
      return kExitOk;
    };
  });
}

}  // namespace noisydarts::cli
