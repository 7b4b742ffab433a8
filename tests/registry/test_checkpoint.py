"""Checkpoints: exact round trips, sha256 sidecars, atomic replacement, refusal of corrupted or swapped files."""
import hashlib
import json
import pickle
import subprocess
import sys

import pytest
import torch

from forge.registry import CheckpointFormatError, ChecksumError, load_checkpoint, save_checkpoint
from forge.registry import checkpoint
from forge.registry.checkpoint import file_sha256, metadata_path_for


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(7, 5, generator=g),
        "blocks.0.attn.q_proj.weight": torch.randn(5, 5, generator=g).t(),   # non-contiguous view
        "norm.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "step": torch.tensor([3], dtype=torch.int64),
        "row": torch.randn(1, 9, generator=g),
        "col": torch.randn(9, 1, generator=g),
    }


def test_round_trip_is_exact_and_sidecar_describes_the_file(tmp_path):
    state = _state()
    path = tmp_path / "sub" / "model.safetensors"
    info = save_checkpoint(state, path, {"model_config": {"dim": 5}, "note": "x"})
    loaded, metadata = load_checkpoint(path)
    assert metadata == {"model_config": {"dim": 5}, "note": "x"}
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    raw = path.read_bytes()
    assert info.sha256 == hashlib.sha256(raw).hexdigest() and info.size_bytes == len(raw)
    assert info.parameter_count == sum(t.numel() for t in state.values())
    sidecar = json.loads(metadata_path_for(path).read_text())
    assert sidecar["sha256"] == info.sha256 and sidecar["size_bytes"] == len(raw)
    assert sidecar["parameter_count"] == info.parameter_count
    assert file_sha256(path) == (info.sha256, len(raw))


def test_tied_weights_are_saved_and_counted_once(tmp_path):
    shared = torch.randn(6, 4)
    info = save_checkpoint({"embed.weight": shared, "head.weight": shared}, tmp_path / "t.safetensors", {})
    loaded, _ = load_checkpoint(tmp_path / "t.safetensors")
    assert torch.equal(loaded["embed.weight"], shared) and torch.equal(loaded["head.weight"], shared)
    assert info.parameter_count == shared.numel()


def test_corrupted_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "m.safetensors"
    info = save_checkpoint(_state(), path, {})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF                       # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=str(path)):
        load_checkpoint(path, expected_sha256=info.sha256)
    with pytest.raises(ChecksumError, match="metadata file"):
        load_checkpoint(path)              # the sidecar alone catches it too


def test_swapped_valid_checkpoint_is_refused_against_the_recorded_hash(tmp_path):
    path = tmp_path / "m.safetensors"
    recorded = save_checkpoint(_state(0), path, {}).sha256
    save_checkpoint(_state(1), path, {})   # a different, self-consistent checkpoint at the same path
    with pytest.raises(ChecksumError, match="replaced"):
        load_checkpoint(path, expected_sha256=recorded)
    loaded, _ = load_checkpoint(path)      # consistent with its own sidecar: only the record catches a swap
    assert torch.equal(loaded["row"], _state(1)["row"])


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['BOOM']).touch()",))


def test_a_pickle_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    monkeypatch.setenv("BOOM", str(marker))
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"w": _Boom()}))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(CheckpointFormatError, match=rf"{path} is not a safetensors file.*never unpickles"):
        load_checkpoint(path, expected_sha256=sha)
    assert not marker.exists()


def test_a_torch_save_file_with_matching_hashes_is_refused_naming_it(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_state(), path, {"model_config": {"dim": 5}})
    torch.save(_state(), path)                      # a pickle under the safetensors name
    sidecar = json.loads(metadata_path_for(path).read_text())
    sidecar["sha256"], sidecar["size_bytes"] = file_sha256(path)
    metadata_path_for(path).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointFormatError, match=rf"{path} is not a safetensors file"):
        load_checkpoint(path, expected_sha256=sidecar["sha256"])


def test_a_sidecar_whose_metadata_differs_from_the_record_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    recorded = {"model_config": {"dim": 5}, "tokenizer": {"chars": "abcdef"}}
    info = save_checkpoint(_state(), path, recorded)
    meta_path = metadata_path_for(path)
    meta_path.write_text(meta_path.read_text().replace("abcdef", "abdcef"))   # two characters swapped
    _, unchecked = load_checkpoint(path, expected_sha256=info.sha256)        # the weights alone still match
    assert unchecked["tokenizer"]["chars"] == "abdcef"
    with pytest.raises(ChecksumError, match=rf"{meta_path}: its metadata differs"):
        load_checkpoint(path, expected_sha256=info.sha256, expected_metadata=recorded)
    meta_path.unlink()                               # the record is the original, the sidecar a copy
    loaded, metadata = load_checkpoint(path, expected_sha256=info.sha256, expected_metadata=recorded)
    assert metadata == recorded and torch.equal(loaded["row"], _state()["row"])


def test_an_oversized_sidecar_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    info = save_checkpoint(_state(), path, {"note": "x"})
    meta_path = metadata_path_for(path)
    size = meta_path.stat().st_size
    monkeypatch.setattr(checkpoint, "MAX_SIDECAR_BYTES", size)
    load_checkpoint(path, expected_sha256=info.sha256)                        # exactly at the cap loads
    monkeypatch.setattr(checkpoint, "MAX_SIDECAR_BYTES", size - 1)
    with pytest.raises(ValueError, match=rf"{meta_path}: checkpoint metadata file is larger than the "
                                         rf"{size - 1:,}-byte cap"):
        load_checkpoint(path, expected_sha256=info.sha256)
    monkeypatch.undo()
    with open(meta_path, "r+b") as handle:          # a sparse 600 MB sidecar: refused at the real cap
        handle.truncate(600 << 20)
    with pytest.raises(ValueError, match=f"{checkpoint.MAX_SIDECAR_BYTES:,}-byte cap"):
        load_checkpoint(path, expected_sha256=info.sha256)


def test_bad_arguments_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(_state(), tmp_path / "m.pt", {})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(_state(), tmp_path / "m.safetensors", {"bad": float("nan")})
    with pytest.raises(TypeError, match=r"state_dict\['w'\]"):
        save_checkpoint({"w": [1.0]}, tmp_path / "m.safetensors", {})
    assert not (tmp_path / "m.safetensors").exists()       # nothing written on bad input
    save_checkpoint(_state(), tmp_path / "m.safetensors", {})
    with pytest.raises(ValueError, match="expected_sha256"):
        load_checkpoint(tmp_path / "m.safetensors", expected_sha256="abc")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors", expected_sha256="0" * 64)
    metadata_path_for(tmp_path / "m.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no expected_sha256"):
        load_checkpoint(tmp_path / "m.safetensors")


_READER = """
import hashlib, pathlib, sys
path, stop, out = map(pathlib.Path, sys.argv[1:4])
seen = set()
while not stop.exists():
    seen.add(hashlib.sha256(path.read_bytes()).hexdigest())
out.write_text("\\n".join(sorted(seen)))
"""


def test_readers_never_see_a_partial_file_while_it_is_overwritten(tmp_path):
    """os.replace makes each save atomic: a reader in another process sees old or new bytes, never a mix."""
    path, stop, out = tmp_path / "m.safetensors", tmp_path / "stop", tmp_path / "seen.txt"
    big = [{"w": torch.randn(512, 512, generator=torch.Generator().manual_seed(s))} for s in range(2)]
    hashes = {save_checkpoint(sd, path, {}).sha256 for sd in big}
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(path), str(stop), str(out)])
    try:
        for i in range(60):
            save_checkpoint(big[i % 2], path, {"i": i})
    finally:
        stop.touch()
        reader.wait(timeout=60)
    seen = set(out.read_text().split())
    assert seen and seen <= hashes
    assert not list(tmp_path.glob(".*tmp"))                # no temporary files left behind


def test_files_get_the_umask_mode_not_safetensors_0600(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        path = tmp_path / "model.safetensors"
        save_checkpoint(_state(), path, {"model_config": {}})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE(metadata_path_for(path).stat().st_mode) == 0o640
