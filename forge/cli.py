"""The `forge` command. Today: `forge bench` (kernel benchmarks) and `forge backends`.

The pipeline commands (`run`, `resume`, `status`, `phases`, `models`, `rollback`) arrive with the
pipeline; until then they exit with a message saying so.
"""
from __future__ import annotations

import argparse
import sys

PIPELINE_COMMANDS = ("run", "resume", "status", "phases", "models", "rollback")


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
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="forge", description="forge: kernels and the Agent Forge pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="time the kernels against their references and peers", add_help=False)
    sub.add_parser("backends", help="list each op's backends and which can run here")
    for name in PIPELINE_COMMANDS:
        sub.add_parser(name, help="(pipeline: not built yet)")
    if argv[:1] == ["bench"]:
        from forge.bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "backends":
        return _backends(args)
    print(f"forge {args.command}: the pipeline is not built yet; `forge bench` and `forge backends` work today.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
