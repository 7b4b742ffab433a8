"""The `forge` command: the Agent Forge pipeline (`run`, `resume`, `status`, `phases`, `models`,
`rollback`, `clean`, `generate`), the dashboard (`ui`) and the kernel tools (`bench`, `backends`).

Errors print one `forge <command>: error: <reason>` line to stderr and exit non-zero: 2 for a bad
request (config, arguments, unknown session or phase), 1 when a run fails. A bad request writes
nothing: the config is validated before any folder or database is created.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_FAILED, EXIT_USAGE = 1, 2

# libgomp (torch's OpenMP on Linux) lets a thread that waits at a barrier spin 300,000 times before it sleeps. On an
# idle machine that saves wake-ups; beside other busy processes the spinning threads take the cores the working ones
# need. A Phase 1 training step on 2 threads beside 2 busy processes (benchmarks/under_load.py, medians of 3-5 runs on
# a 2-core EPYC; benchmarks/RESULTS.md, "Under load"): libgomp's default 4.1x the idle time, a spin count of 3,000
# 2.5x at no idle cost, OMP_WAIT_POLICY=PASSIVE 1.9x at +15% when idle (+60% on an AVX-512 Xeon).
OPENMP_SPIN_COUNT = "3000"


def busy_cores(interval: float = 0.2, stat: str = "/proc/stat") -> float | None:
    """Cores kept busy now: `busy_share` of /proc/stat over `interval` seconds times the cores it counts; None where
    /proc/stat is unreadable."""
    def sample() -> list[int]:
        with open(stat) as f:
            return [int(v) for v in f.readline().split()[1:]]
    try:
        first = sample()
        time.sleep(interval)
        second = sample()
        with open(stat) as f:
            cores = sum(1 for line in f if line.startswith("cpu") and line[3].isdigit())
    except (OSError, ValueError, IndexError):
        return None
    return cores * busy_share(first, second)


def busy_share(first: list[int], second: list[int]) -> float:
    """The busy share of the CPU time between two samples of /proc/stat's `cpu` line (all its fields but guest time):
    user, nice, system, irq, softirq and steal (a virtual CPU that wanted to run while its host ran another) against
    idle and iowait."""
    delta = [b - a for a, b in zip(first, second)]
    busy = sum(delta[i] for i in (0, 1, 2, 5, 6, 7) if i < len(delta))
    return busy / max(1, sum(delta[:8]))


def openmp_defaults(environ=os.environ, load: float | None = None, cores: int | None = None) -> None:
    """The OpenMP wait policy of the `forge` command and the torchrun ranks it starts, unless the user set
    GOMP_SPINCOUNT or OMP_WAIT_POLICY: PASSIVE when other processes keep at least half the cores busy now
    (`busy_cores`, where /proc/stat exists; else the 1-minute load average), else a short spin. Not the load average
    where there is a choice: it trails a finished job by minutes, and a run started in that time sleeps its threads
    for all of its life (Phase 5 runs of the same code 309-413 s with 47-54 s of system time against 168-236 s and
    6-8 s with the short spin, AVX2 EPYC; the policy those runs chose was inferred, not logged: benchmarks/RESULTS.md,
    "Sequence packing"). libgomp reads both once, when torch loads, so this runs before any torch import."""
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return
    if load is None:
        load = busy_cores()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load >= max(1.0, cores / 2):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


# glibc's malloc serves a block over 128 KiB with its own mmap and returns it on free (raising that bound as such
# blocks are freed, but trimming the heap's free top back to the OS beyond 2x it), so a training step of the pipeline's
# models, whose activations are 0.1-3 MB tensors made afresh every step, gets its pages zeroed and faulted in again
# and again: 2,300-4,000 page faults and 8-10 ms of system time per Phase 1 step (1 thread, AVX2 EPYC), all of it gone
# with these two settings, the step about 10% faster in three pairs of four (benchmarks/RESULTS.md, "Training step",
# its allocator table; the VM's own swings are as large). The heap then keeps
# up to MALLOC_TRIM_BYTES of freed memory for reuse instead of returning it; blocks over MALLOC_MMAP_BYTES (glibc's
# largest allowed bound) are still mapped and unmapped on their own.
MALLOC_MMAP_BYTES, MALLOC_TRIM_BYTES = 32 << 20, 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3    # glibc malloc.h
MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_MALLOC = "the C library's defaults (forge.cli.main not run)"


def malloc_defaults(environ=os.environ) -> str:
    """Fixed mmap and trim thresholds for glibc's malloc in the `forge` command (and the torchrun ranks it starts),
    unless the user set one of glibc's MALLOC_* tunables; returns what it did, as `forge backends` reports it.
    Setting the trim threshold alone would freeze the mmap bound at 128 KiB (measured 314 ms a step instead of 144),
    so both are set, the mmap bound first."""
    import platform

    if any(name in environ for name in MALLOC_VARIABLES):
        return "the user's MALLOC_* settings"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library's defaults (not glibc)"
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "the C library's defaults (no mallopt)"
    if not (mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES) and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES)):
        return "the C library's defaults (mallopt refused)"
    return f"mmap threshold {MALLOC_MMAP_BYTES >> 20} MiB, trim threshold {MALLOC_TRIM_BYTES >> 20} MiB"


def _backends(_args) -> int:
    from forge import _native
    from forge.ops import available_backends
    from forge.ops._dispatch import implemented

    usable = available_backends()
    for op, names in implemented().items():
        marks = [f"{n}{'' if n in usable[op] else ' (unavailable)'}" for n in names]
        print(f"{op:<16} {', '.join(marks)}")
    for module, why in _native.load_errors().items():
        print(f"forge.{module} not loaded: {why}")
    from forge.ops.precision import describe_cpu

    print(f"cpu: {describe_cpu()}")
    import torch

    policy = ", ".join(f"{k}={os.environ[k]}" for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ)
    print(f"threads: {torch.get_num_threads()} (OpenMP: {policy or 'libgomp defaults'})")
    print(f"malloc: {_MALLOC}")
    return 0


class UsageError(Exception):
    """A bad request: exits with EXIT_USAGE and the message."""


def _config(args):
    from forge.pipeline.config import ConfigError, load_config

    try:
        return load_config(args.config, args.set or ())
    except ConfigError as error:
        raise UsageError(str(error)) from None


def _registry(config, must_exist: bool):
    """The registry; with must_exist, a missing database is a clear error instead of a new file."""
    path = config.registry_path()
    if must_exist and not path.is_file():
        raise UsageError(f"no registry at {path} (nothing has run with this run_root yet)")
    from forge.registry import ModelRegistry

    return ModelRegistry(path, timeout=config.registry.timeout)


def _known_session(registry, session_id: str) -> dict:
    """The session's row; an unknown name or id is answered here, before torch or a model is loaded."""
    session = registry.get_session(session_id)
    if session is None:
        raise UsageError(f"unknown session {session_id!r}; `forge status` lists sessions")
    return session


def _pipeline(config, registry):
    from forge.pipeline.orchestrator import Pipeline

    return Pipeline(config, registry)


def _phases(args) -> int:
    from forge.pipeline.phases import PHASES, is_implemented, why_not_runnable

    config = _config(args)
    for number, (name, _) in PHASES.items():
        if not is_implemented(number):
            state = "not implemented yet"
        elif why_not_runnable(number, config):
            state = f"implemented, switched off: runs skip it (--set phases.phase{number}.enabled=true)"
        else:
            state = "implemented"
        print(f"{number}  {name:<12} {state}")
    return 0


def _dry_run(config, plan: list[int]) -> int:
    from forge.pipeline.estimate import estimate
    from forge.pipeline.handoff import validate_table
    from forge.pipeline.phases import is_implemented, phase_name, plan_text, runnable_phases, why_not_runnable

    runnable = runnable_phases(plan, config)
    print(f"config ok; plan: {plan_text(plan, config)}")
    for rule in validate_table(config):
        print(f"  handoff {rule}")
    seconds = estimate(config, runnable)
    for phase in plan:
        note = f"~{seconds[phase]:.0f} s" if phase in seconds else (
            "implemented" if phase in runnable else why_not_runnable(phase, config) or "not reached")
        if phase not in runnable and is_implemented(phase):
            note += ": skipped"
        print(f"  phase {phase} {phase_name(phase):<12} {note}")
    stop = next((p for p in plan if not is_implemented(p)), None)
    if not runnable:
        print("no phase of this plan can run")
    elif stop is not None:
        print(f"a run would stop after phase {runnable[-1]}")
    print(f"estimated total ~{sum(seconds.values()):.0f} s on a 2-core CPU like benchmarks/RESULTS.md's (counted work, "
          "not a timing: a faster or busier machine differs); nothing was written")
    return 0


def _run(args) -> int:
    from forge.pipeline.phases import make_plan

    config = _config(args)
    plan = make_plan(args.from_phase, args.only, args.to_phase)
    if args.dry_run:
        return _dry_run(config, plan)
    if args.nproc > 1:
        return _exec_torchrun(args)

    def body() -> int:
        with _registry(config, must_exist=False) as registry:
            pipeline = _pipeline(config, registry)
            _summary(pipeline, pipeline.run(args.from_phase, args.only, args.source_session, args.to_phase))
            if config.cleanup.auto_cleanup:
                _cleanup(config, registry)
        return 0

    return _on_ranks(config, body)


def _exec_torchrun(args) -> int:
    """`forge run|resume --nproc N`: replace this process by `torchrun --standalone --nproc-per-node N -m forge`
    with the same arguments, less --nproc."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--nproc under torchrun: torchrun has started the ranks already; leave --nproc out")
    rest, skip = [], False
    for arg in args.argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "forge", *rest]
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return EXIT_FAILED   # not reached


def _on_ranks(config, body) -> int:
    """`body` (a run or a resume) on this process; under torchrun rank 0 runs it and the other ranks follow
    (forge.pipeline.ranks), after joining the process group of hardware.distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:   # not under torchrun (told without loading torch)
        return body()
    from forge import distributed
    from forge.pipeline.orchestrator import pick_device
    from forge.pipeline.ranks import follow, release_followers, stop_on_sigterm

    here = distributed.init(config.hardware.distributed, pick_device(config.hardware.device))
    if here.is_main:
        stop_on_sigterm()
        try:
            code = body()
        except BaseException as error:
            release_followers(f"{type(error).__name__}: {distributed.explain(error)}")
            raise
        release_followers(None)
    else:
        code = follow(lambda: _registry(config, must_exist=True))
    if code == 0:   # a failed run leaves at once: a peer may be gone
        distributed.shutdown()
    return code


def _summary(pipeline, report) -> None:
    """The table a finished run ends with (forge.pipeline.report)."""
    from forge.pipeline.report import run_summary

    completed = pipeline.completed(report.session_id)
    print(run_summary(pipeline.registry, report.session_id, pipeline.config, completed, report.final_model_ids))


def _resume(args) -> int:
    config = _config(args)
    if args.nproc > 1:
        with _registry(config, must_exist=True) as registry:
            _known_session(registry, args.session)
        return _exec_torchrun(args)

    def body() -> int:
        with _registry(config, must_exist=True) as registry:
            _known_session(registry, args.session)
            pipeline = _pipeline(config, registry)
            _summary(pipeline, pipeline.resume(args.session))
            if config.cleanup.auto_cleanup:
                _cleanup(config, registry)
        return 0

    return _on_ranks(config, body)


def _rollback(args) -> int:
    config = _config(args)
    with _registry(config, must_exist=True) as registry:
        _known_session(registry, args.session)
        loaded = _pipeline(config, registry).rollback(args.session, args.phase)
        for item in loaded:
            print(f"reloaded {item.model_id} (sha256 {item.record['sha256'][:12]} verified)")
    return 0


def _generate(args) -> int:
    """Answer a prompt with a registered model (or a checkpoint path), as forge.load_model does."""
    from forge.pipeline.loading import UnknownModelError, load_model

    config = _config(args)
    try:
        model = load_model(args.model, registry_path=config.registry_path())
    except UnknownModelError as error:
        raise UsageError(str(error)) from None
    for prompt in args.prompt:
        print(model.generate(prompt, args.max_new_tokens) if args.raw else model.answer(prompt, args.max_new_tokens))
    return 0


def _reap(config, registry) -> None:
    """Sessions whose process died are shown (and cleaned) as interrupted, not running forever."""
    from forge.pipeline.state import reap_dead_sessions

    for session_id in reap_dead_sessions(registry, Path(config.run_root)):
        print(f"session {session_id}: its process died; marked interrupted (`forge resume {session_id}` continues it)")


def _status(args) -> int:
    config = _config(args)
    with _registry(config, must_exist=True) as registry:
        _reap(config, registry)
        if args.session is None:
            sessions = registry.list_sessions()
            for s in sessions:
                done = sorted(registry.completed_phases(s["id"]))
                ran = f"phases {done[0]}..{done[-1]} done" if len(done) > 1 else f"phase {done[0]} done" if done else ""
                print(f"{s['id']}  {s['status']:<11} phase {s['current_phase']}  {s['progress']:3.0f}%  {ran}".rstrip())
            if not sessions:
                print("no sessions")
            return 0
        session = _known_session(registry, args.session)
        print(f"{session['id']}  {session['status']}  phase {session['current_phase']}  {session['progress']:.0f}%"
              + (f"  ({session['error']})" if session.get("error") else ""))
        for phase, info in _pipeline(config, registry).completed(args.session).items():
            print(f"  phase {phase}: completed -> {', '.join(info['model_ids'])}")
    return 0


HEADLINE_METRICS = ("accuracy", "val_accuracy", "tool_accuracy", "thought_accuracy", "fitness", "val_loss",
                    "compression_ratio", "retention")


def _headline(metrics: dict) -> str:
    """Up to three of the model's recorded metrics, the most telling first."""
    shown = [f"{k} {metrics[k]:.3g}" for k in HEADLINE_METRICS
             if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)]
    return ", ".join(shown[:3]) or "-"


def _model_line(m: dict, superseded: bool) -> str:
    """id, phase, name, parameters, file size, headline metrics, lineage and tags (Phase 8's chain: each stage
    from the one it started from, kept / rolled-back / final), hash and path."""
    params = m.get("parameter_count")
    lineage = f"  from {', '.join(m['parent_ids'])}" if m.get("parent_ids") else ""
    tags = f"  [{', '.join(m['tags'])}]" if m.get("tags") else ""
    return (f"{m['id']}  phase {m['phase']}  {m['name']:<14} {params if params is not None else '?':>9} params"
            f"  {m['size_bytes'] / 1e3:>8.1f} kB  {_headline(m['metrics'])}{lineage}{tags}  sha256 {m['sha256'][:12]}"
            f"  {m['path']}{'  (superseded)' if superseded else ''}")


def _models(args) -> int:
    with _registry(_config(args), must_exist=True) as registry:
        models = registry.list_models(session_id=args.session, phase=args.phase)
        superseded = registry.superseded_ids()
        hidden = 0 if args.all else sum(m["id"] in superseded for m in models)
        for m in models:
            if m["id"] in superseded and not args.all:
                continue
            print(_model_line(m, m["id"] in superseded))
        if not models:
            print("no models")
        if hidden:
            print(f"({hidden} superseded model(s) not shown: a rerun of their phase replaced them; --all shows them)")
    return 0


def _clean(args) -> int:
    config = _config(args)
    with _registry(config, must_exist=True) as registry:
        _reap(config, registry)
        _cleanup(config, registry)
    return 0


def _cleanup(config, registry) -> None:
    """Apply the config's cleanup policy: rows, model files, then the deleted sessions' folders; say what went."""
    from forge.registry import CleanupPolicy

    c = config.cleanup
    policy = CleanupPolicy(max_session_age_days=c.max_session_age_days, max_sessions_total=c.max_sessions_total,
                           max_models_per_session=c.max_models_per_session,
                           keep_last_n_checkpoints=c.keep_last_n_checkpoints, remove_superseded=c.remove_superseded,
                           file_root=Path(config.run_root))
    result = registry.apply_cleanup(policy)
    freed = _remove_session_folders(Path(config.run_root), result["sessions_deleted"])
    for session_id in result["sessions_deleted"]:
        print(f"deleted session {session_id} and its folder")
    print(f"deleted {len(result['sessions_deleted'])} session(s), {len(result['models_deleted'])} model(s), "
          f"{len(result['files_deleted'])} checkpoint file(s), {freed / 1e6:.1f} MB of session folders")
    for reason in result["files_skipped"]:
        print(f"kept {reason}")


def _remove_session_folders(run_root: Path, session_ids: list[str]) -> int:
    """Remove each cleaned session's folder; returns the bytes freed (a folder still in use is reported, kept)."""
    from forge.pipeline.state import remove_session_folder

    freed = 0
    for session_id in session_ids:
        try:
            freed += remove_session_folder(run_root, session_id)
        except RuntimeError as error:
            print(f"kept the folder of session {session_id}: {error}")
    return freed


def _ui(args) -> int:
    from forge.ui.server import check_installed, serve

    missing = check_installed()
    if missing:
        raise UsageError(missing)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    return serve(args.run_root, args.port)


def _phase_number(text: str) -> int:
    from forge.phase_table import PHASES, phase_range_text

    if not text.isdigit() or int(text) not in PHASES:
        raise argparse.ArgumentTypeError(f"unknown phase {text!r}; phases are {phase_range_text()} (see `forge phases`)")
    return int(text)


NPROC_HELP = ("processes (ranks) to run on: N > 1 starts `torchrun --standalone --nproc-per-node N -m forge` with "
              "the same arguments; phases train data-parallel (hardware.distributed)")


def _nproc(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--nproc must be a whole number of processes >= 1, got {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forge", description="forge: kernels and the Agent Forge pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="time the kernels against their references and peers", add_help=False)
    sub.add_parser("backends", help="list each op's backends and which can run here")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="pipeline YAML (default: built-in defaults)")
    common.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config value")
    sub.add_parser("phases", parents=[common], help="list the pipeline phases, which are implemented and which the "
                   "config switches off")
    run = sub.add_parser("run", parents=[common], help="run the pipeline in a new session")
    run.add_argument("--from-phase", type=_phase_number, default=1)
    run.add_argument("--only", type=_phase_number)
    run.add_argument("--to-phase", type=_phase_number, help="the last phase to run (default: the last phase)")
    run.add_argument("--source-session", help="session whose models feed --from-phase/--only (default: newest)")
    run.add_argument("--dry-run", action="store_true", help="validate and estimate; run and write nothing")
    run.add_argument("--nproc", type=_nproc, default=1, help=NPROC_HELP)
    for name, text in (("resume", "continue a failed, killed or rolled-back session"),
                       ("rollback", "reload a phase's models and continue the session from there")):
        cmd = sub.add_parser(name, parents=[common], help=text)
        cmd.add_argument("session")
        if name == "resume":
            cmd.add_argument("--nproc", type=_nproc, default=1, help=NPROC_HELP)
        if name == "rollback":
            cmd.add_argument("phase", type=_phase_number)
    status = sub.add_parser("status", parents=[common], help="list sessions, or show one")
    status.add_argument("session", nargs="?")
    models = sub.add_parser("models", parents=[common], help="list registered models")
    models.add_argument("--phase", type=_phase_number)
    models.add_argument("--session")
    models.add_argument("--all", action="store_true", help="also list models a rerun of their phase superseded")
    sub.add_parser("clean", parents=[common], help="apply the config's cleanup policy")
    gen = sub.add_parser("generate", parents=[common], help="answer prompts with a model (id or .safetensors path)")
    gen.add_argument("model")
    gen.add_argument("prompt", nargs="+", help="e.g. \"12+7=\"")
    gen.add_argument("--raw", action="store_true", help="print everything written, thoughts, calls and markers")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    ui = sub.add_parser("ui", help="the dashboard: sessions, phases, models (Streamlit, on 127.0.0.1)")
    ui.add_argument("--run-root", type=Path, default=Path("runs/"), help="folder of the runs (default runs/)")
    ui.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")
    return parser


COMMANDS = {"backends": _backends, "phases": _phases, "run": _run, "resume": _resume, "rollback": _rollback,
            "status": _status, "models": _models, "clean": _clean, "generate": _generate, "ui": _ui}


def main(argv: list[str] | None = None) -> int:
    global _MALLOC
    openmp_defaults()
    _MALLOC = malloc_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from forge.bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    args.argv = argv
    from forge.pipeline.controller import PipelineError

    try:
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"forge {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except PipelineError as error:
        print(f"forge {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, RuntimeError, OSError) as error:   # e.g. a checkpoint whose hash changed
        print(f"forge {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
