"""noisydarts.search, the genotype helpers, report, and the docs' example script."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import noisydarts
from conftest import SOURCE_DIR, TINY


def test_search_gives_the_cli_genotype_and_calls_progress_per_epoch(tmp_path, cli_search_run, capfd):
    seen = []
    r = noisydarts.search(tmp_path / "run", progress=seen.append, quiet=True, **TINY)
    assert r.epochs_done == 1
    assert len(seen) == 1 and seen[0]["epoch"] == 1
    assert r.metrics == seen  # metrics.jsonl, one dict per epoch, what the callback got
    with open(tmp_path / "run" / "genotype.txt") as f:
        assert r.genotype_text == f.read().strip()
    assert r.genotype == noisydarts.genotype_from_json(r.genotype_json)
    with open(cli_search_run / "genotype.txt") as f:  # the CLI with the same seed and options
        assert r.genotype_text == f.read().strip()
    assert 0 <= r.valid_acc <= 100 and r.seconds > 0
    assert r["out"] == str(tmp_path / "run")
    assert capfd.readouterr().err == ""  # quiet
    assert torch.get_num_threads() == 1  # (the fixture's; the search restores the caller's count)
    path = noisydarts.report(tmp_path / "run")
    assert path == str(tmp_path / "run" / "report.html") and os.path.getsize(path) > 1000


def test_search_reports_to_stderr_by_default_and_releases_the_gil(tmp_path, capfd):
    torch.set_num_threads(2)
    ticks, done = [], threading.Event()

    def ticker():  # runs only while the search does not hold the GIL
        while not done.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.002)

    t = threading.Thread(target=ticker)
    start = time.monotonic()
    t.start()
    r = noisydarts.search(tmp_path / "run", **TINY)
    end = time.monotonic()
    done.set()
    t.join()
    assert torch.get_num_threads() == 2  # the run's threads=1 did not leak
    during = [x for x in ticks if start + 0.2 < x < end - 0.05]
    assert end - start > 0.5 and len(during) >= 0.2 * (end - start - 0.25) / 0.002, (len(during), end - start)
    assert r.epochs_done == 1
    err = capfd.readouterr().err
    assert "epoch 1/1" in err


def test_bad_options_name_the_key(tmp_path):
    with pytest.raises(noisydarts.ConfigError, match="unknown key 'epoch'") as e:
        noisydarts.search(tmp_path / "a", **dict(TINY, epoch=2))
    assert e.value.exit_code == 4 and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, noisydarts.Error)
    with pytest.raises(noisydarts.ConfigError, match="'epochs'"):
        noisydarts.search(tmp_path / "b", **dict(TINY, epochs="ten"))
    with pytest.raises(noisydarts.ConfigError, match="lambda"):
        noisydarts.search(tmp_path / "c", **dict(TINY, noise={"lambda": "high"}))
    with pytest.raises(noisydarts.UsageError, match="--channels"):
        noisydarts.search(tmp_path / "d", **dict(TINY, channels=3))
    with pytest.raises(noisydarts.UsageError, match="scale"):
        noisydarts.search(tmp_path / "e", scale="huge", **TINY)
    assert not any((tmp_path / n).exists() for n in "abcde")  # refused before touching the disk


def test_ctrl_c_stops_gracefully_and_resumes(tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    calls = []

    def ctrl_c_in_epoch_one(m):
        calls.append(m["epoch"])
        if m["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, while the search runs

    with pytest.raises(noisydarts.Stopped) as e:
        noisydarts.search(tmp_path / "run", progress=ctrl_c_in_epoch_one, quiet=True, **dict(TINY, epochs=2))
    assert isinstance(e.value, KeyboardInterrupt) and e.value.exit_code == 9
    assert "stopped by SIGINT after epoch 1" in str(e.value)
    assert f"noisydarts.search(out='{tmp_path / 'run'}', resume=True)" in str(e.value)
    assert calls == [1]
    # Python's own handler is back: the next Ctrl-C is a plain KeyboardInterrupt again.
    assert signal.getsignal(signal.SIGINT) is handler
    with pytest.raises(KeyboardInterrupt) as plain:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert not isinstance(plain.value, noisydarts.Stopped)
    r = noisydarts.search(tmp_path / "run", resume=True, progress=calls.append, quiet=True)
    assert calls[1:] and calls[-1]["epoch"] == 2
    assert r.epochs_done == 2 and [m["epoch"] for m in r.metrics] == [1, 2]


def test_a_failing_callback_stops_the_run_and_raises(tmp_path):
    def boom(m):
        raise ValueError("callback says no")

    with pytest.raises(ValueError, match="callback says no"):
        noisydarts.search(tmp_path / "run", progress=boom, quiet=True, **dict(TINY, epochs=2))
    assert noisydarts.latest_checkpoint(tmp_path / "run")  # stopped after writing a checkpoint
    with pytest.raises(TypeError, match="callable"):
        noisydarts.search(tmp_path / "x", progress=3, **TINY)


def test_genotype_round_trips():
    names = noisydarts.builtin_genotypes()
    assert {"DARTS_V2", "NoisyDARTS_a", "NoisyDARTS_A"} <= set(names)
    for name in names:
        g = noisydarts.genotype(name)
        assert noisydarts.genotype_from_json(g.to_json()) == g, name
        assert noisydarts.genotype_from_text(g.to_text()) == g, name
        assert noisydarts.genotype(str(g)) == g and noisydarts.genotype(g.to_json()) == g
    g = noisydarts.genotype("DARTS_V2")
    assert g.space == "darts" and g.normal[0] == ("sep_conv_3x3", 0) and g.normal_concat == [2, 3, 4, 5]
    assert g.to_json()["normal"][0] == ["sep_conv_3x3", 0]
    assert g != noisydarts.genotype("DARTS_V1")
    arch = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
    n = noisydarts.genotype_from_nb201(arch)
    assert n.space == "nb201" and n.nb201_string() == arch and noisydarts.nb201_string(arch) == arch
    assert noisydarts.genotype_from_json({"space": "nb201", "arch": arch}) == n
    assert noisydarts.genotype_from_json('{"space": "nb201", "arch": "%s"}' % arch) == n
    with pytest.raises(noisydarts.ConfigError, match="bogus_op") as e:
        noisydarts.genotype_from_text(g.to_text().replace("sep_conv_3x3", "bogus_op", 1))
    assert "\n" not in str(e.value)
    with pytest.raises(noisydarts.ConfigError, match="NoSuchGenotype"):
        noisydarts.genotype("NoSuchGenotype")
    with pytest.raises(TypeError):
        noisydarts.genotype(42)


def test_docs_example_runs(tmp_path):
    script = os.path.join(SOURCE_DIR, "docs", "examples", "python_search_loop.py")
    p = subprocess.run([sys.executable, script, "--steps", "3", "--channels", "4", "--layers", "3",
                        "--save", str(tmp_path / "supernet.pt")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["1/3", "2/3", "3/3"]
    moved = [line for line in lines if line.startswith("alphas moved")]
    assert len(moved) == 1 and float(moved[0].split("=")[1]) > 1e-4  # Adam moved the C++ alphas
    g = noisydarts.genotype_from_text(lines[-1][len("genotype: "):])
    # The saved supernet (weights and the moved alphas) gives that genotype when loaded again.
    net = noisydarts.SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1)
    net.load_state_dict(torch.load(tmp_path / "supernet.pt"))
    assert net.genotype() == g
