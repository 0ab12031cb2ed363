"""Command line: the flags every recipe shares, and the `mnemo` entry point.

mnemo train RECIPE [--preset NAME] [--set k=v ...] [--run-dir DIR] [--resume ...] ...
mnemo data ...      convert inputs to shards / stores
mnemo eval ...      evaluate checkpoints
mnemo ckpt ...      inspect / export checkpoints
mnemo k8s ...       render KubeRay manifests
mnemo models        list registered models
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import runpy
import sys
import time
from pathlib import Path

from system import config as C


def recipe_parser(recipe: str) -> argparse.ArgumentParser:
    """DESIGN.md's command-line contract, shared by launch/*.py and `mnemo train`."""
    p = argparse.ArgumentParser(
        prog=f"launch/{recipe}.py",
        description=f"Train the {recipe} recipe on Ray Train (embedded local Ray by default).",
    )
    p.add_argument("--preset", default="smoke", help=f"one of: {', '.join(C.presets(recipe))}")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)",
    )
    p.add_argument("--run-dir", default=None, help="default runs/<recipe>-<time>")
    p.add_argument("--resume", default="auto", help="auto | never | PATH of a checkpoint")
    p.add_argument("--address", default="auto", help="auto | local | HOST:PORT (Ray cluster)")
    p.add_argument("--workers", type=int, default=None, help="shortcut for scaling.workers")
    p.add_argument(
        "--strategy", choices=C.STRATEGIES, default=None, help="shortcut for scaling.strategy"
    )
    p.add_argument(
        "--zero", type=int, choices=(1, 2, 3), default=None, help="shortcut for scaling.zero_stage"
    )
    p.add_argument(
        "--launcher",
        choices=("ray", "none"),
        default="ray",
        help="none = run the loop in this process (torchrun / accelerate launch)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    return p


def resolve(recipe: str, args: argparse.Namespace) -> C.JobConfig:
    """Preset + shortcuts + --set overrides (later wins) -> a validated JobConfig."""
    overrides: list[str] = []
    if args.workers is not None:
        overrides.append(f"scaling.workers={args.workers}")
    if args.strategy is not None:
        overrides.append(f"scaling.strategy={args.strategy}")
    if args.zero is not None:
        overrides.append(f"scaling.zero_stage={args.zero}")
    overrides += args.overrides
    cfg = C.load(recipe, args.preset, overrides)
    run_dir = args.run_dir or f"runs/{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    from system.ckpt_files import resume_target  # lazy: it imports torch

    # auto | never | PATH made absolute and checked here: the workers run in another directory.
    resume = resume_target(args.resume)
    return dataclasses.replace(
        cfg, run_dir=str(Path(run_dir).resolve()), resume=resume, address=args.address
    )


def recipe_main(recipe: str, argv: list[str] | None = None) -> int:
    """Entry point of every launch/<recipe>.py."""
    import json
    import os

    args = recipe_parser(recipe).parse_args(argv)
    try:
        cfg = resolve(recipe, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if args.launcher == "none" or "LOCAL_RANK" in os.environ and "RAY_ADDRESS" not in os.environ:
        # Under torchrun / accelerate launch every process runs the loop itself.
        from system.trainer import train_loop

        train_loop(cfg.to_dict())
        return 0
    from system.launcher import run

    run(cfg)
    summary = Path(cfg.run_dir) / "summary.json"
    if summary.exists():
        print(f"[mnemo] summary: {summary}\n{summary.read_text()}")
    return 0


def _launch_dir() -> Path:
    for cand in (Path.cwd() / "launch", Path(__file__).resolve().parent.parent / "launch"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("no launch/ directory next to the package or in the working directory")


def _cmd_train(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        names = sorted(p.stem for p in _launch_dir().glob("*.py") if not p.stem.startswith("_"))
        print(f"usage: mnemo train RECIPE [flags]; recipes: {', '.join(names)}")
        return 2
    recipe, rest = argv[0], argv[1:]
    path = _launch_dir() / f"{recipe}.py"
    if not path.exists():
        print(f"error: no recipe {recipe!r} ({path} does not exist)", file=sys.stderr)
        return 2
    sys.argv = [str(path), *rest]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _cmd_models(argv: list[str]) -> int:
    import models

    for name in models.list_models():
        print(name)
    return 0


# Subcommands implemented elsewhere: "module:function(argv) -> int".
_SUBCOMMANDS = {
    "data": "data.convert:main",
    "eval": "system.evaluate:main",
    "ckpt": "system.ckpt_tools:main",
    "k8s": "system.k8s:main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = ["train", "models", *_SUBCOMMANDS]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return _cmd_train(rest)
    if cmd == "models":
        return _cmd_models(rest)
    if cmd in _SUBCOMMANDS:
        mod, fn = _SUBCOMMANDS[cmd].split(":")
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            print(f"error: `mnemo {cmd}` is not available ({e})", file=sys.stderr)
            return 2
        return int(getattr(module, fn)(rest) or 0)
    print(f"error: unknown command {cmd!r}; expected one of {', '.join(cmds)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
