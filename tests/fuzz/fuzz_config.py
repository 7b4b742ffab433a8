"""Fuzz target: the config loader, on a YAML file of any bytes and on `--set` values of any text."""
import atheris

with atheris.instrument_imports(include=["forge.pipeline.config"]):
    from forge.pipeline.config import ConfigError, load_config

from _harness import SCRATCH, run

PATH = SCRATCH / "config.yaml"


def check(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        load_config(overrides=(fdp.ConsumeUnicodeNoSurrogates(200),))
    else:
        PATH.write_bytes(fdp.ConsumeBytes(4096))
        load_config(PATH)


if __name__ == "__main__":
    run(check, (ConfigError,))
