"""Shared fixtures of the Python module's tests (run by ctest as `python_module`, or by hand:
PYTHONPATH=build/python NOISYDARTS_CLI=build/noisydarts /usr/bin/python3 -m pytest -q tests/python)."""
import os
import subprocess

import pytest
import torch  # noqa: F401  (before noisydarts, as the package itself does)

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("NOISYDARTS_SOURCE_DIR", os.path.dirname(os.path.dirname(HERE)))

# The tiny search every search test uses (Python keys; the CLI flags of the same run below).
TINY = dict(dataset="synthetic", channels=4, layers=3, batch_size=16, subset=256, epochs=1, max_steps=2, threads=1,
            seed=3)
TINY_FLAGS = ["--dataset", "synthetic", "--channels", "4", "--layers", "3", "--batch-size", "16", "--subset", "256",
              "--epochs", "1", "--max-steps", "2", "--threads", "1", "--seed", "3"]


def cli_path():
    path = os.environ.get("NOISYDARTS_CLI")
    if not path:
        pytest.fail("NOISYDARTS_CLI is not set: run through ctest, or export NOISYDARTS_CLI=<build>/noisydarts")
    return path


def run_cli(*args, timeout=300):
    """Runs the CLI; fails the test with its stderr when it exits non-zero."""
    p = subprocess.run([cli_path(), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"noisydarts {' '.join(map(str, args))} exited {p.returncode}: {p.stderr.strip()}")
    return p


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def cli_search_run(tmp_path_factory):
    """A finished tiny search made by the CLI (the TINY configuration)."""
    out = tmp_path_factory.mktemp("cli") / "search"
    run_cli("search", "--out", out, "--quiet", *TINY_FLAGS)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Same thread count as the CLI runs here (--threads 1): comparable floating-point sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
