"""The backend table: availability, the choice rule, FORGE_BACKEND, clear errors, the README matrix."""
import os
from pathlib import Path

import pytest
import torch

import forge
from forge import _native
from forge.ops import (
    BackendUnavailableError,
    _dispatch,
    available_backends,
    backend_matrix_markdown,
    grokfast_ema_,
    last_backend,
    newton_schulz,
)
from forge.ops._dispatch import implemented

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_op_has_its_reference_and_required_backends():
    table = implemented()
    assert set(table["grokfast_ema"]) == {"torch", "cpu", "triton", "cuda"}
    assert set(table["grokfast_ma"]) == {"torch", "cpu", "triton", "cuda"}
    assert {"torch", "cpu", "triton"} <= set(table["newton_schulz"])


def test_cpu_module_is_built_and_used_by_auto():
    """The C++ module is always built, so on CPU tensors `auto` takes it."""
    assert _native.cpu_module() is not None, _native.load_errors()
    assert "cpu" in available_backends("grokfast_ema")
    grokfast_ema_([torch.randn(4)], [torch.zeros(4)])
    assert last_backend("grokfast_ema") == "cpu"
    newton_schulz(torch.randn(4, 6))
    assert last_backend("newton_schulz") == "cpu"


def test_missing_cuda_is_not_an_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "cuda" not in available_backends("grokfast_ema")
    assert "no CUDA device" in _native.load_errors()["_cuda"]


def test_forge_backend_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("FORGE_BACKEND", "torch")
    newton_schulz(torch.randn(4, 6))
    assert last_backend("newton_schulz") == "torch"
    newton_schulz(torch.randn(4, 6), backend="cpu")  # an explicit argument still wins
    assert last_backend("newton_schulz") == "cpu"


def test_a_changed_forge_backend_is_seen_by_the_next_call(monkeypatch):
    """resolve() remembers its choice per (op, device, backend, environment): a change of FORGE_BACKEND is a new key."""
    monkeypatch.delenv("FORGE_BACKEND", raising=False)
    newton_schulz(torch.randn(4, 6))
    assert last_backend("newton_schulz") == "cpu"
    monkeypatch.setenv("FORGE_BACKEND", "torch")
    newton_schulz(torch.randn(4, 6))
    assert last_backend("newton_schulz") == "torch"
    monkeypatch.delenv("FORGE_BACKEND")
    newton_schulz(torch.randn(4, 6))
    assert last_backend("newton_schulz") == "cpu"


@pytest.mark.parametrize("value", [None, "", "torch", "caf\u00e9 \u2713"])
def test_environ_get_reads_what_os_environ_holds(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("FORGE_TEST_VARIABLE", raising=False)
    else:
        monkeypatch.setenv("FORGE_TEST_VARIABLE", value)
    assert _dispatch.environ_get("FORGE_TEST_VARIABLE") == os.environ.get("FORGE_TEST_VARIABLE") == value


def test_forge_backend_naming_a_missing_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FORGE_BACKEND", "cuda")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailableError, match=r"FORGE_BACKEND='cuda' is not available .*available here: \['torch', 'cpu'"):
        grokfast_ema_([torch.randn(4)], [torch.zeros(4)])


def test_backend_for_the_wrong_device_names_the_device():
    if torch.cuda.is_available():
        x = torch.randn(4, device="cuda")
        with pytest.raises(BackendUnavailableError, match="does not run tensors on device 'cuda'"):
            grokfast_ema_([x], [torch.zeros_like(x)], backend="cpu")
    with pytest.raises(ValueError, match="Invalid backend"):
        grokfast_ema_([torch.randn(4)], [torch.zeros(4)], backend="fastest")


def test_readme_backend_matrix_matches_the_table():
    assert backend_matrix_markdown() in README.read_text()


def test_available_backends_shape():
    table = available_backends()
    assert set(table) == set(implemented())
    for op, names in table.items():
        assert names[0] == "torch" and set(names) <= set(implemented()[op])
    assert forge.__version__
