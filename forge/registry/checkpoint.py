"""Checkpoints: safetensors weights plus a JSON sidecar holding their sha256, size and metadata.

Never pickle: weights go through safetensors only, so loading a file cannot run code. Both files
are written to a temporary name in the same folder and moved into place with ``os.replace``, so a
reader sees the old pair or the new one, never a half-written file. Loading hashes the exact bytes
it deserializes, so a file swapped between the check and the read cannot slip through.

The sidecar is a copy: the registry keeps each model's metadata in its own row, and a loader that
rebuilds a model passes that record as ``expected_metadata`` so an edited sidecar is refused (the
sidecar's sha256 covers the weights only, and nothing but the registry vouches for the sidecar).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge._checks import read_capped

if TYPE_CHECKING:
    from torch import Tensor

SUFFIX = ".safetensors"
CHUNK_BYTES = 1 << 20
MAX_SIDECAR_BYTES = 8 << 20   # a sidecar is a few KB (config, tokenizer, task weights); read no more than this
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ChecksumError(ValueError):
    """A checkpoint's bytes (or its sidecar's metadata) do not match what was recorded for it."""


class CheckpointFormatError(ValueError):
    """A checkpoint file that is not safetensors (e.g. a torch.save pickle): forge never unpickles."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    metadata_path: Path
    sha256: str
    size_bytes: int
    parameter_count: int


def metadata_path_for(path: Path) -> Path:
    """The JSON sidecar that sits next to a checkpoint: model.safetensors -> model.json."""
    return Path(path).with_suffix(".json")


def file_sha256(path: Path) -> tuple[str, int]:
    """Stream a file through sha256; returns (hex digest, bytes read)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def check_sha256(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ValueError(f"{name} must be a 64-character lowercase hex sha256 digest, got {value!r}")
    return value


def _check_checkpoint_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"path must end in {SUFFIX} (checkpoints are safetensors only), got {path}")
    return path


def _prepare_tensors(state_dict: Any) -> tuple[dict, int]:
    """Detached, contiguous CPU tensors; tensors sharing storage (tied weights) are copied,
    because safetensors refuses shared storage. Returns (tensors, distinct parameter count)."""
    import torch

    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError("state_dict must be a non-empty dict of name -> torch.Tensor")
    tensors, seen, count = {}, set(), 0
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] must map a str to a torch.Tensor, "
                            f"got {type(tensor).__name__}")
        key = (str(tensor.device), tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        t = tensor.detach().to("cpu").contiguous()    # ties found on the source device: a GPU copy has new storage
        if key in seen:
            t = t.clone()
        else:
            seen.add(key)
            count += t.numel()
        tensors[name] = t
    return tensors, count


def _umask_mode() -> int:
    """The mode a plain new file gets under the process umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: Path, write) -> None:
    """write(tmp_path) then fsync and os.replace into path; the temp file never outlives a failure. The file
    gets the umask's mode (safetensors writes 0600 files, which other users of a shared run folder can't read)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(state_dict: dict[str, "Tensor"], path: Path, metadata: dict) -> CheckpointInfo:
    """Write state_dict to path (.safetensors) and metadata + sha256 + size to path.with_suffix(".json")."""
    from safetensors.torch import save_file

    path = _check_checkpoint_path(path)
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        metadata_text = json.dumps(metadata, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serializable without NaN/inf: {error}") from error
    tensors, parameter_count = _prepare_tensors(state_dict)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp)))
    sha256, size = file_sha256(path)
    sidecar = {"file": path.name, "format": "safetensors", "sha256": sha256, "size_bytes": size,
               "parameter_count": parameter_count, "metadata": json.loads(metadata_text)}
    meta_path = metadata_path_for(path)
    write_atomically(meta_path, lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True)))
    return CheckpointInfo(path, meta_path, sha256, size, parameter_count)


def read_sidecar(path: Path) -> dict | None:
    """The checkpoint's JSON sidecar as a dict, or None when there is none."""
    meta_path = metadata_path_for(path)
    if not meta_path.is_file():
        return None
    data = read_capped(meta_path, MAX_SIDECAR_BYTES, "checkpoint metadata file")
    try:
        sidecar = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{meta_path}: checkpoint metadata is not valid JSON: {error}") from None
    if not isinstance(sidecar, dict) or "sha256" not in sidecar:
        raise ValueError(f"{meta_path}: checkpoint metadata lacks a sha256 field")
    return sidecar


def load_checkpoint(path: Path, expected_sha256: str | None = None,
                    expected_metadata: dict | None = None) -> tuple[dict[str, "Tensor"], dict]:
    """Load (state_dict, metadata), refusing bytes whose sha256 differs from expected_sha256
    (e.g. the registry's record) or from the sidecar. With neither to check against it refuses.
    With expected_metadata (the registry's record), a sidecar holding other metadata is refused and
    the metadata returned is expected_metadata; without it, the sidecar's metadata is unverified."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    path = _check_checkpoint_path(path)
    if expected_sha256 is not None:
        check_sha256("expected_sha256", expected_sha256)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    sidecar = read_sidecar(path)
    if expected_sha256 is None and sidecar is None:
        raise FileNotFoundError(f"{path}: no expected_sha256 given and no metadata file "
                                f"{metadata_path_for(path).name} to verify it against")
    _check_sidecar_metadata(path, sidecar, expected_metadata)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    for source, expected in (("expected", expected_sha256), ("metadata file", (sidecar or {}).get("sha256"))):
        if expected is not None and actual != expected:
            raise ChecksumError(f"checkpoint {path} has sha256 {actual}, but the {source} sha256 is "
                                f"{expected}: the file is corrupted or was replaced")
    try:
        state_dict = load_bytes(data)
    except SafetensorError as error:
        raise CheckpointFormatError(f"{path} is not a safetensors file ({error}); forge loads safetensors "
                                    "only and never unpickles: convert a torch.save file with "
                                    "safetensors.torch.save_file") from None
    if expected_metadata is not None:
        return state_dict, expected_metadata
    return state_dict, (sidecar.get("metadata", {}) if sidecar else {})


def _check_sidecar_metadata(path: Path, sidecar: dict | None, expected: dict | None) -> None:
    """Refuse a sidecar whose metadata differs from the recorded one, compared as canonical JSON (a missing
    sidecar is fine: the record is the original and the sidecar a copy)."""
    if expected is None:
        return
    if not isinstance(expected, dict):
        raise TypeError(f"expected_metadata must be a dict, got {type(expected).__name__}")
    if sidecar is None:
        return
    if json.dumps(sidecar.get("metadata"), sort_keys=True) != json.dumps(expected, sort_keys=True):
        raise ChecksumError(f"{metadata_path_for(path)}: its metadata differs from the metadata recorded for "
                            f"{path.name}: the file was edited or damaged after saving; restore it, or delete it "
                            "(the registry keeps the original)")
