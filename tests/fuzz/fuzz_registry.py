"""Fuzz target: opening a registry file of any bytes (forge.registry), half of them behind a real SQLite
header, then reading its sessions."""
import atheris

with atheris.instrument_imports(include=["forge.registry.schema", "forge.registry.registry"]):
    from forge.registry import ModelRegistry, RegistryFileError
    from forge.registry.schema import SQLITE_HEADER

from _harness import SCRATCH, run

PATH = SCRATCH / "registry.db"


def check(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    head = SQLITE_HEADER if fdp.ConsumeBool() else b""
    for leftover in SCRATCH.glob("registry.db-*"):
        leftover.unlink()
    PATH.write_bytes(head + fdp.ConsumeBytes(fdp.remaining_bytes()))
    with ModelRegistry(PATH, timeout=1.0) as registry:
        registry.list_sessions()


if __name__ == "__main__":
    run(check, (RegistryFileError,))
