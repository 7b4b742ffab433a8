"""Phase 8's VPTQ and hyper stages under other settings, on a real model: the table behind the defaults in
benchmarks/RESULTS.md ("Phase 8").

    python benchmarks/phase8_sweep.py runs/<session>/phase6_baking/baked.safetensors \
        "vptq_codebook_size=256 vptq_finetune_steps=0" "vptq_codebook_size=64 vptq_finetune_frozen=[embed,head]"

Each argument after the checkpoint is one variant: space-separated `phases.phase8` fields (as `--set` takes them).
SeedLM runs once with the defaults; every variant then runs VPTQ on SeedLM's model, and hyper-compression when VPTQ
is kept, through the phase's own code (`_Run`), and prints file bytes, bits per weight and held-out accuracy.
"""
import sys
import time
from types import SimpleNamespace

from forge.pipeline.config import load_config
from forge.pipeline.loading import load_model
from forge.pipeline.phases.phase8_compression.recipe import _Run


class _NoTracker:
    def log(self, *_args, **_kwargs):
        pass


def _row(name: str, row: dict) -> str:
    return (f"{name} bytes {row['file_bytes']} bits/weight {row['bits_per_weight']:.2f} accuracy {row['accuracy']:.3f}"
            f" kept {bool(row['kept'])}")


def main(path: str, variants: list[str]) -> None:
    loaded = load_model(path)
    ctx = SimpleNamespace(phase_config=load_config().phases.phase8, progress=lambda *_: None, tracker=_NoTracker())
    item = SimpleNamespace(model=loaded.model, metadata=loaded.metadata, record={"path": path}, model_id=None)
    run = _Run(ctx, item)
    print(f"incoming accuracy {run.input_accuracy:.3f}")
    run.stage(0, "seedlm")
    print(_row("seedlm", run.rows["seedlm"]))
    after_seedlm = run.kept
    for variant in variants:
        overrides = tuple(f"phases.phase8.{kv}" for kv in variant.split())
        run.cfg = ctx.phase_config = load_config(overrides=overrides).phases.phase8
        run.kept, run.finetune_losses, started = after_seedlm, [], time.perf_counter()
        run.stage(1, "vptq")
        line = f"[{variant}] " + _row("vptq", run.rows["vptq"])
        if run.rows["vptq"]["kept"]:
            run.stage(2, "hyper")
            line += " | " + _row("hyper", run.rows["hyper"])
        print(f"{line} ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
