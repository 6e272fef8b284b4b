"""noisydarts.SearchNetwork / EvalNetwork as torch.nn.Modules over the C++ modules."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import noisydarts
from conftest import run_cli


def tiny_supernet(seed=0, **kw):
    return noisydarts.SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1, seed=seed, **kw)


def test_python_tensors_are_the_cpp_tensors():
    net = tiny_supernet()
    assert isinstance(net, torch.nn.Module)
    cpp = net._cpp.state_dict()  # module_state_dict of the C++ module, as (key, tensor)
    py = list(net.state_dict(keep_vars=True).items())
    assert [k for k, _ in py] == [k for k, _ in cpp]  # same keys, same order as `noisydarts export`
    for (k, a), (_, b) in zip(py, cpp):
        assert a is b, k  # the same Python object: the same TensorImpl, no copy
    params = dict(net.named_parameters())
    assert all(isinstance(p, torch.nn.Parameter) for p in params.values())
    assert [n for n in params if n.startswith("alphas")] == ["alphas_normal", "alphas_reduce"]
    assert net.arch_parameters()[0] is params["alphas_normal"]
    assert net.arch_parameters()[1] is params["alphas_reduce"]
    weights = net.weight_parameters()
    assert len(weights) == len(params) - 2
    assert all(w is params[n] for w, n in zip(weights, [n for n in params if not n.startswith("alphas")]))
    assert net.alphas_normal.shape == (14, len(net.candidates()))
    # An in-place change from Python is seen by the C++ forward.
    net.eval()
    x = torch.randn(2, 1, 28, 28)
    before = net(x)
    with torch.no_grad():
        params["classifier.bias"].add_(1.0)
    assert torch.allclose(net(x), before + 1.0, atol=1e-5)


def test_train_eval_reach_the_cpp_module():
    net = tiny_supernet()
    assert net.training and net._cpp.is_training()
    net.eval()
    assert not net.training and not net._cpp.is_training()
    assert not any(m.training for m in net.modules())
    net.train()
    assert net._cpp.is_training()
    # BatchNorm statistics: a training-mode forward updates the running mean Python sees.
    rm = net.state_dict()["stem.1.running_mean"].clone()
    net(torch.randn(4, 1, 28, 28))
    assert not torch.equal(net.state_dict()["stem.1.running_mean"], rm)


def test_supernet_logits_equal_cli_predict(tmp_path):
    net = tiny_supernet(seed=5)
    with torch.no_grad():  # alphas away from uniform, BN statistics away from (0, 1)
        for p in net.arch_parameters():
            p.normal_()
    net(torch.randn(8, 1, 28, 28))  # training-mode forward: running stats move
    net.eval()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    run_cli("predict", "--weights", tmp_path / "sd.pt", "--search-network", "--channels", 4, "--layers", 3,
            "--in-channels", 1, "--classes", 10, "--threads", 1, "--input", tmp_path / "x.pt",
            "--out", tmp_path / "logits.pt")
    cli_logits = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        py_logits = net(x)
    assert py_logits.shape == (3, 10)
    assert (py_logits - cli_logits).abs().max().item() <= 1e-5


def test_export_of_a_cli_search_loads_and_predicts(cli_search_run, tmp_path):
    ckpt = noisydarts.latest_checkpoint(cli_search_run)
    assert ckpt and os.path.exists(ckpt)
    run_cli("export", "--checkpoint", ckpt, "--out", tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt")
    net = tiny_supernet(seed=99)
    assert list(sd.keys()) == list(net.state_dict().keys())
    net.load_state_dict(sd, strict=True)
    net.eval()
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # The alphas loaded from the file are what the C++ genotype() reads: the run's genotype.
    with open(cli_search_run / "genotype.txt") as f:
        assert net.genotype() == noisydarts.genotype_from_text(f.read())
    x = torch.randn(2, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    run_cli("predict", "--weights", tmp_path / "sd.pt", "--search-network", "--channels", 4, "--layers", 3,
            "--in-channels", 1, "--classes", 10, "--threads", 1, "--input", tmp_path / "x.pt",
            "--out", tmp_path / "logits.pt")
    with torch.no_grad():
        assert (net(x) - torch.load(tmp_path / "logits.pt")).abs().max().item() <= 1e-5


def test_gradients_equal_the_cpp_ones_and_steps_move_the_cpp_module():
    net = tiny_supernet(seed=1)  # training mode: noise on skip_connect, batch statistics
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.manual_seed(7)
    loss_cpp, grads_cpp = net._cpp.loss_and_grads(x, y)  # all in C++, .grad untouched
    assert all(p.grad is None for p in net.parameters())
    torch.manual_seed(7)  # the same noise draws
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    assert loss.item() == pytest.approx(loss_cpp.item(), rel=1e-6)
    params = net.arch_parameters() + net.weight_parameters()
    assert len(params) == len(grads_cpp)
    for p, g in zip(params, grads_cpp):
        if g is None:  # a parameter the forward does not use
            assert p.grad is None
            continue
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for a in net.arch_parameters():
        assert a.grad.abs().sum().item() > 0  # the alphas get gradients through the fused mixed ops

    # One Python SGD step on the alphas is exactly alpha - lr * grad inside the C++ module.
    cpp = dict(net._cpp.state_dict())
    before = cpp["alphas_normal"].detach().clone()
    grad = net.alphas_normal.grad.clone()
    torch.optim.SGD(net.arch_parameters(), lr=0.5).step()
    assert torch.equal(dict(net._cpp.state_dict())["alphas_normal"], before - 0.5 * grad)
    # One Adam step on the weights changes what the C++ forward computes.
    net.eval()
    with torch.no_grad():
        out_before = net(x).clone()
    torch.optim.Adam(net.weight_parameters(), lr=1e-2).step()
    with torch.no_grad():
        assert (net(x) - out_before).abs().max().item() > 1e-3


def test_nb201_supernet_and_bad_options():
    net = noisydarts.SearchNetwork(C=4, num_classes=10, layers=1, in_channels=1, space="nb201", seed=0)
    assert net.arch_names() == ["alphas"]
    assert net.arch_parameters()[0].shape == (6, 5)
    assert net.genotype().space == "nb201"
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(noisydarts.UsageError, match="--channels must be even"):
        noisydarts.SearchNetwork(C=3, num_classes=10, layers=3)
    with pytest.raises(noisydarts.ConfigError, match="'noise.lambda'|lambda"):
        tiny_supernet(noise={"lambda": "big"})
    with pytest.raises(TypeError):
        tiny_supernet(epochs=3)  # not a network option
    with pytest.raises(NotImplementedError, match="owns them"):
        tiny_supernet().double()


def train_tiny_eval_network(tmp_path, genotype_name):
    out = tmp_path / "train"
    run_cli("train", "--out", out, "--quiet", "--genotype", genotype_name, "--dataset", "synthetic", "--channels", 4,
            "--layers", 3, "--auxiliary", "true", "--subset", 64, "--batch-size", 16, "--epochs", 1, "--max-steps", 2,
            "--threads", 1, "--seed", 1)
    return out


def test_eval_network_loads_export_and_equals_cli_predict(tmp_path):
    run = train_tiny_eval_network(tmp_path, "NoisyDARTS_a")
    run_cli("export", "--checkpoint", run / "checkpoint.pt", "--out", tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt")
    net = noisydarts.EvalNetwork("NoisyDARTS_a", C=4, num_classes=10, layers=3, auxiliary=True, in_channels=1)
    assert list(sd.keys()) == list(net.state_dict().keys())
    assert any(k.startswith("auxiliary_head.") for k in sd)
    net.load_state_dict(sd, strict=True)
    net.eval()
    x = torch.randn(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    run_cli("predict", "--weights", tmp_path / "sd.pt", "--genotype", "NoisyDARTS_a", "--channels", 4, "--layers", 3,
            "--in-channels", 1, "--classes", 10, "--threads", 1, "--input", tmp_path / "x.pt",
            "--out", tmp_path / "logits.pt")
    with torch.no_grad():
        logits, aux = net(x)
    assert aux is None  # eval mode: no auxiliary logits
    assert (logits - torch.load(tmp_path / "logits.pt")).abs().max().item() <= 1e-5
    # Training mode with the head: both outputs, gradients into the C++ parameters.
    net.train()
    net.drop_path_prob = 0.2
    assert net.drop_path_prob == pytest.approx(0.2)
    logits, aux = net(x)
    assert aux.shape == (3, 10)
    (logits.sum() + aux.sum()).backward()
    assert net.state_dict(keep_vars=True)["auxiliary_head.classifier.weight"].grad is not None


def test_eval_network_recipe_size_and_profile():
    net = noisydarts.EvalNetwork("DARTS_V2", num_classes=10)
    assert (net._cpp.channels(), net._cpp.layers()) == (36, 20)
    p = noisydarts.profile("DARTS_V2")
    assert (p["channels"], p["layers"]) == (36, 20)
    assert p["params"] == sum(t.numel() for t in net.parameters())  # no auxiliary head built
    assert p["macs"] > 100_000_000
    with_aux = noisydarts.EvalNetwork("DARTS_V2", num_classes=10, auxiliary=True)
    assert sum(t.numel() for n, t in with_aux.named_parameters() if not n.startswith("auxiliary_head")) == p["params"]
    cli = json.loads(run_cli("profile", "--genotype", "DARTS_V2", "--json").stdout)
    assert cli == {"params": p["params"], "macs": p["macs"]}
    p_small = noisydarts.profile("DARTS_V2", C=8, layers=5, dataset="fashion-mnist")
    assert p_small["params"] < p["params"] and p_small["macs"] < p["macs"]


def test_eval_network_bf16_precision():
    torch.manual_seed(0)
    net = noisydarts.EvalNetwork("NoisyDARTS_a", C=8, num_classes=10, layers=5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 32, 32))  # running statistics of real batches
    with pytest.raises(noisydarts.UsageError, match="eval"):
        net(x, precision="bf16")  # training mode
    net.eval()
    with torch.inference_mode():
        want, _ = net(x)
        got, aux = net(x, precision="bf16")
        again, _ = net(x)
    assert aux is None and got.dtype == torch.float32 and got.shape == want.shape
    err = (got - want).abs().max().item()
    assert 0 < err < 0.015 * want.abs().max().item()
    assert torch.equal(again, want)  # the scope restored float and the fused kernels
    with pytest.raises(noisydarts.UsageError, match="--precision"):
        net(x, precision="fp16")
