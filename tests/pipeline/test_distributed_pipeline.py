"""The pipeline on two gloo ranks through the real command: `forge run --nproc 2` (torchrun) trains Phases 1 and 2
at test size to the models one process trains and registers each model once (with hardware.distributed.fsdp, Phase 1
to the models DDP trains); a rank killed with SIGKILL mid-phase ends the run with an error at once, and
`forge resume --nproc 2` completes the session."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _kill_resume import forge_command
from _small_model import SMALL_PHASES_1_2

from forge.registry import ModelRegistry, load_checkpoint

pytestmark = pytest.mark.distributed
TIMEOUT_S = 60   # hardware.distributed.timeout_s: a collective never waits longer


def _forge(tmp_path: Path, runs: Path, *args: str, output: Path | None = None):
    sets = [a for s in (f"run_root={runs}", "wandb.mode=disabled", f"hardware.distributed.timeout_s={TIMEOUT_S}.0",
                        *SMALL_PHASES_1_2) for a in ("--set", s)]
    command = [*forge_command(), *args, *sets]
    if output is None:
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    with output.open("w") as sink:
        return subprocess.Popen(command, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _models(runs: Path) -> dict[str, dict]:
    with ModelRegistry(runs / "registry.db") as registry:
        records = registry.list_models()
    return {f"{r['phase']}/{r['name']}": {**r, "state": load_checkpoint(Path(r["path"]))[0]} for r in records}


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp / f"runs{nproc}"
        done = _forge(tmp, runs[nproc], "run", "--to-phase", "2", "--nproc", str(nproc))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _models(runs[1]), _models(runs[2]), done


def test_two_ranks_train_the_models_one_process_trains(one_and_two):
    single, ranks, done = one_and_two
    assert "completed phases 1..2" in done.stdout
    # rank 0 alone registers: each model once, the same set as one process
    assert sorted(ranks) == sorted(single) == ["1/mix", "1/rev", "1/sort", "2/champion"]
    for name, record in ranks.items():
        # the same global batches: equal up to float summation order (DDP sums two halves), which 290 Muon steps
        # grow to about 1e-3 on weights of magnitude ~1.5 (measured); a different model differs by ~1
        for key, value in record["state"].items():
            torch.testing.assert_close(value, single[name]["state"][key], rtol=0, atol=5e-3, msg=f"{name} {key}")
        assert record["metrics"].get("val_accuracy") == pytest.approx(single[name]["metrics"].get("val_accuracy"),
                                                                        abs=2 / 128)
    assert ranks["2/champion"]["metadata"]["recipe"] == single["2/champion"]["metadata"]["recipe"]


@pytest.mark.slow
def test_phase1_with_fsdp_trains_the_models_ddp_trains(one_and_two, tmp_path):
    """hardware.distributed.fsdp=true: Phase 1 (trunk and three branches, evaluations between) trains FSDP2-sharded
    copies and registers the models DDP trains. Two ranks reduce by adding two numbers, in either order the same
    float, so the weights are equal (measured max |FSDP - DDP| = 0.0 after 370 steps)."""
    runs = tmp_path / "runs"
    done = _forge(tmp_path, runs, "run", "--to-phase", "1", "--nproc", "2", "--set", "hardware.distributed.fsdp=true")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp, fsdp = one_and_two[1], _models(runs)
    assert sorted(fsdp) == ["1/mix", "1/rev", "1/sort"]
    for name, record in fsdp.items():
        worst = max(float((value - ddp[name]["state"][key]).abs().max()) for key, value in record["state"].items())
        assert worst <= 1e-6, f"{name}: max |FSDP - DDP| = {worst:.3g}"
        assert record["metrics"]["val_accuracy"] == ddp[name]["metrics"]["val_accuracy"]


def _rank_pid(parent_marker: str, rank: int) -> int | None:
    """The pid of the torchrun worker whose environment says RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent_marker.encode() in cmdline and f"RANK={rank}".encode() in environ and b"-m\0forge" in cmdline:
            return int(entry.name)
    return None


def test_a_killed_rank_fails_the_run_at_once_and_resume_completes_it(tmp_path):
    runs, output = tmp_path / "runs", tmp_path / "killed.log"
    proc = _forge(tmp_path, runs, "run", "--to-phase", "2", "--nproc", "2", output=output)
    deadline = time.monotonic() + 300
    while "trunk step 120" not in output.read_text():
        assert proc.poll() is None, output.read_text()[-3000:]
        assert time.monotonic() < deadline, "Phase 1 never got to step 120"
        time.sleep(0.2)
    pid = _rank_pid(str(runs), 1)
    assert pid is not None, "no process with RANK=1"
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT_S + 60)
    log = output.read_text()
    assert proc.returncode != 0 and time.monotonic() - killed < TIMEOUT_S, log[-3000:]
    # whichever comes first ends it with a clear error: rank 0's collective failing ("a collective failed: another
    # rank of this run failed, was killed or hangs") or torchrun's SIGTERM ("stopped by torchrun (SIGTERM): another
    # rank of this run failed or was killed"; seen in a CI run on a busy machine)
    assert "another rank of this run failed" in log, log[-3000:]
    assert "Signal 9 (SIGKILL)" in log    # torchrun names the rank that died
    with ModelRegistry(runs / "registry.db") as registry:
        (session,) = registry.list_sessions()
        assert session["status"] == "failed" and registry.list_models() == []
    resumed = _forge(tmp_path, runs, "resume", session["id"], "--nproc", "2")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    with ModelRegistry(runs / "registry.db") as registry:
        assert registry.get_session(session["id"])["status"] == "completed"
        assert sorted(m["name"] for m in registry.list_models()) == ["champion", "mix", "rev", "sort"]
