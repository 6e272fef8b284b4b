"""noisydarts from Python: searches, the fast supernet and the evaluation network as torch.nn.Modules,
genotype tools, profiles and reports. See docs/python.md.

The networks are the C++ modules themselves: their parameters and buffers, as Python sees them, are
the very tensors the C++ forward uses, so optimisers, ``load_state_dict`` and ``.grad`` act on the
C++ network, and autograd runs through its fused kernels.
"""
import json as _json
import os as _os

import torch as _torch  # before the extension: it links against torch's Python bindings

from . import _noisydarts as _core
from ._noisydarts import (  # noqa: F401  (re-exported)
    CheckpointError,
    ConfigError,
    DataError,
    DistributedError,
    DivergedError,
    Error,
    Genotype,
    IoError,
    Stopped,
    UsageError,
)

__all__ = [
    "search", "SearchResult", "SearchNetwork", "EvalNetwork", "Genotype", "genotype", "genotype_from_json",
    "genotype_from_text", "genotype_from_nb201", "genotype_to_json", "genotype_to_text", "nb201_string",
    "builtin_genotypes", "profile", "report", "export", "latest_checkpoint", "Error", "UsageError",
    "ConfigError", "DataError", "CheckpointError", "IoError", "DivergedError", "DistributedError", "Stopped",
]

# ------------------------------------------------------------------------------------------------
# Genotypes
# ------------------------------------------------------------------------------------------------


def genotype(spec):
    """A Genotype from: a Genotype, a JSON dict, or a string (built-in name such as 'NoisyDARTS_a',
    a .json/text file, a search's run directory, inline JSON, DARTS text or an NB201 string)."""
    if isinstance(spec, Genotype):
        return spec
    if isinstance(spec, dict):
        return _core.genotype_from_json(spec)
    if isinstance(spec, (str, _os.PathLike)):
        return _core.resolve_genotype(_os.fspath(spec))
    raise TypeError(f"genotype: expected a Genotype, dict or str, got {type(spec).__name__}")


def genotype_from_json(j):
    """Parses the JSON form (a dict, or a JSON string)."""
    return _core.genotype_from_json(j)


def genotype_from_text(text):
    """Parses the DARTS text form `Genotype(normal=[...], ...)`, an NB201 string or the mbv2 form."""
    return _core.genotype_from_text(text)


def genotype_from_nb201(arch):
    """Parses a NAS-Bench-201 architecture string `|op~0|+|op~0|op~1|+|...|`."""
    return _core.genotype_from_nb201(arch)


def genotype_to_json(g):
    return genotype(g).to_json()


def genotype_to_text(g):
    return genotype(g).to_text()


def nb201_string(g):
    return genotype(g).nb201_string()


def builtin_genotypes():
    """Names of the built-in genotypes (DARTS_V1, DARTS_V2, NASNet, AmoebaNet, NoisyDARTS_a, ...)."""
    return list(_core.builtin_genotype_names())


# ------------------------------------------------------------------------------------------------
# Networks as torch.nn.Modules
# ------------------------------------------------------------------------------------------------


class _Submodule(_torch.nn.Module):
    """A node of the C++ module tree (holds that module's own parameters and buffers)."""

    def forward(self, *args):
        raise RuntimeError("parts of a noisydarts network cannot be called on their own; call the network")


class _CppModule(_torch.nn.Module):
    """Mirrors a C++ module tree: every C++ parameter and buffer, as the same tensor, under its
    C++ (= reference PyTorch) name, so state_dict() keys and order match `noisydarts export`."""

    def __init__(self, cpp):
        super().__init__()
        self._cpp = cpp
        for path, name, tensor, is_param in cpp.named_tensors():
            mod = self
            if path:
                for part in path.split("."):
                    child = mod._modules.get(part)
                    if child is None:
                        child = _Submodule()
                        mod._modules[part] = child
                    mod = child
            if is_param:
                # The C++ tensor's own Python object becomes an nn.Parameter (no copy, no alias).
                tensor.__class__ = _torch.nn.Parameter
                mod._parameters[name] = tensor
            else:
                mod._buffers[name] = tensor
        super().train(cpp.is_training())

    def train(self, mode=True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        super().train(mode)
        self._cpp.train(mode)
        return self

    def _apply(self, fn):
        # nn.Module._apply would put new buffer tensors into Python only, out of the C++ module's
        # sight: only conversions that change nothing (e.g. .cpu(), .float() of a CPU float32
        # network) are accepted.
        for t in list(self.parameters()) + list(self.buffers()):
            r = fn(t)
            if r.dtype != t.dtype or r.device != t.device:
                raise NotImplementedError(
                    f"{type(self).__name__}: converting or moving its tensors ({t.dtype}/{t.device} -> "
                    f"{r.dtype}/{r.device}) is not supported: the C++ module owns them (CPU float32)")
        return self

    def __deepcopy__(self, memo):
        raise TypeError(f"{type(self).__name__} cannot be deep-copied; build a new one and load_state_dict()")


class SearchNetwork(_CppModule):
    """The supernet of a search space (darts, darts-s2..s4, nb201, mbv2) with the fused mixed ops.

    Arguments other than C, num_classes, layers, in_channels are config.json keys (None: the
    preset's default): steps, multiplier, primitives (candidate ops), noise (dict, e.g.
    {'lambda': 0.1}; acts only in training mode), alpha_init_std, space, se_ratio, swish,
    image_size (mbv2). `seed`: torch.manual_seed(seed) before the initialisation.
    forward(x) returns the logits [B, num_classes].
    """

    def __init__(self, C=16, num_classes=10, layers=8, in_channels=3, *, preset="noisydarts", space=None, steps=None,
                 multiplier=None, primitives=None, noise=None, alpha_init_std=None, se_ratio=None, swish=None,
                 image_size=None, seed=None):
        options = {"channels": C, "layers": layers}
        for key, value in (("space", space), ("steps", steps), ("multiplier", multiplier),
                           ("primitives", primitives), ("noise", noise), ("alpha_init_std", alpha_init_std),
                           ("se_ratio", se_ratio), ("swish", swish), ("image_size", image_size)):
            if value is not None:
                options[key] = list(value) if key == "primitives" else value
        if seed is not None:
            _torch.manual_seed(seed)
        super().__init__(_core._SearchNetwork(preset, options, in_channels, num_classes))

    def forward(self, x):
        return self._cpp.forward(x)

    def arch_parameters(self):
        """The alphas (darts: alphas_normal, alphas_reduce; nb201/mbv2: alphas), raw (not softmaxed)."""
        return list(self._cpp.arch_parameters())

    def weight_parameters(self):
        """Every parameter except the alphas, in registration order."""
        return list(self._cpp.weight_parameters())

    def arch_names(self):
        return list(self._cpp.arch_names())

    def candidates(self):
        """Candidate op names: the columns of each alpha."""
        return list(self._cpp.candidates())

    def arch_weights(self, i=0):
        """softmax of arch parameter i as the forward uses it (mbv2: disallowed skips 0)."""
        return self._cpp.arch_weights(i)

    def genotype(self):
        """The genotype derived from the current alphas."""
        return self._cpp.genotype()

    def set_noise_decay(self, decay):
        """Noise decay factor of the coming forwards (the search's cosine decay, 1 = none)."""
        self._cpp.set_noise_decay(float(decay))


class EvalNetwork(_CppModule):
    """The network trained from scratch on a genotype (NetworkCIFAR / NetworkImageNet layout;
    nb201 and mbv2 genotypes build their own networks). C / layers None: the recipe size
    (DARTS cells: 36 / 20, ImageNet style 48 / 14; nb201: 16 / 5).

    forward(x) returns (logits, aux_logits) like the reference: aux_logits only in training mode
    with the auxiliary head, else None. `drop_path_prob` is read by training-mode forwards.
    forward(x, precision="bf16") (eval mode only) runs in bfloat16 through oneDNN, float logits.
    """

    def __init__(self, genotype_spec, C=None, num_classes=10, layers=None, auxiliary=False, in_channels=3, *,
                 style="cifar", drop_path_prob=0.0):
        g = genotype(genotype_spec)
        super().__init__(_core._EvalNetwork(g, C or 0, num_classes, layers or 0, in_channels, bool(auxiliary), style,
                                            float(drop_path_prob)))

    def forward(self, x, precision="fp32"):
        return self._cpp.forward(x, precision)

    def genotype(self):
        return self._cpp.genotype()

    @property
    def drop_path_prob(self):
        return self._cpp.drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, p):
        self._cpp.drop_path_prob = float(p)


# ------------------------------------------------------------------------------------------------
# Search, profile, report, export
# ------------------------------------------------------------------------------------------------


class SearchResult:
    """What noisydarts.search returns: genotype (Genotype), genotype_text, genotype_json (dict),
    metrics (one dict per epoch, out/metrics.jsonl), valid_acc, seconds, epochs_done,
    stopped_early_at (-1: no early stop), out."""

    def __init__(self, d):
        self.genotype = d["genotype"]
        self.genotype_text = self.genotype.to_text()
        self.genotype_json = self.genotype.to_json()
        self.valid_acc = d["valid_acc"]
        self.seconds = d["seconds"]
        self.epochs_done = d["epochs_done"]
        self.stopped_early_at = d["stopped_early_at"]
        self.out = d["out"]
        path = _os.path.join(self.out, "metrics.jsonl")
        self.metrics = []
        if _os.path.exists(path):
            with open(path) as f:
                self.metrics = [_json.loads(line) for line in f if line.strip()]

    def __getitem__(self, key):
        return getattr(self, key)

    def __repr__(self):
        return (f"SearchResult(out={self.out!r}, epochs_done={self.epochs_done}, valid_acc={self.valid_acc}, "
                f"seconds={self.seconds:.1f}, genotype={self.genotype_text!r})")


def search(out, *, preset="noisydarts", scale="small", resume=False, progress=None, quiet=False, **options):
    """Runs a NoisyDARTS search in this process and returns a SearchResult.

    `options` are config.json keys (e.g. dataset='synthetic', epochs=1, noise={'lambda': 0.1}),
    merged over the preset's defaults at the scale exactly as the CLI merges its flags. `progress`:
    called with each epoch's metrics dict (the metrics.jsonl line). Without `quiet`, start-up and
    epoch lines go to stderr. `resume=True` continues the run in `out` (its stored configuration;
    only `threads` may be given). Ctrl-C stops after the current step, writes a checkpoint and
    raises noisydarts.Stopped (a KeyboardInterrupt). Other failures raise noisydarts.Error subclasses.
    """
    if progress is not None and not callable(progress):
        raise TypeError("search: progress must be callable (it receives each epoch's metrics dict)")
    r = _core.search(_os.fspath(out), preset, scale, options, bool(resume), bool(quiet), progress)
    return SearchResult(r)


def profile(genotype_spec, C=None, layers=None, dataset="cifar10", style=None):
    """Parameters (auxiliary head excluded) and conv+linear multiply-adds per image of the
    evaluation network of a genotype: {'params', 'macs', 'channels', 'layers'} (docs/profile.md)."""
    return _core.profile(genotype(genotype_spec), C or 0, layers or 0, dataset, style or "")


def report(run_dir):
    """Writes run_dir/report.html (docs/report.md) and returns its path."""
    return _core.report(_os.fspath(run_dir))


def export(checkpoint, out, with_alphas=True):
    """`noisydarts export`: the network of a checkpoint as a PyTorch state dict file. Returns
    (kind, number of keys)."""
    return tuple(_core.export_checkpoint(_os.fspath(checkpoint), _os.fspath(out), bool(with_alphas)))


def latest_checkpoint(run_dir):
    """Newest checkpoint of a run directory, or None."""
    p = _core.latest_checkpoint(_os.fspath(run_dir))
    return p or None
