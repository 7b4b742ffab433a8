"""Fuzz target: the checkpoint loader on any weights bytes and any sidecar bytes (forge.registry.checkpoint);
half the inputs come with the weights' true sha256, so the parser behind the hash check is reached too."""
import hashlib

import atheris

with atheris.instrument_imports(include=["forge.registry.checkpoint"]):
    from forge.registry.checkpoint import load_checkpoint

from _harness import SCRATCH, run

WEIGHTS, SIDECAR = SCRATCH / "model.safetensors", SCRATCH / "model.json"


def check(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    with_hash, with_sidecar = fdp.ConsumeBool(), fdp.ConsumeBool()
    weights = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    WEIGHTS.write_bytes(weights)
    SIDECAR.unlink(missing_ok=True)
    if with_sidecar:
        SIDECAR.write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
    load_checkpoint(WEIGHTS, expected_sha256=hashlib.sha256(weights).hexdigest() if with_hash else None)


if __name__ == "__main__":
    run(check, (ValueError, FileNotFoundError))
