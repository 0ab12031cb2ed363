"""mnemo: train long-context memory models (Titans, Miras, RetNet, ...) on Ray Train.

  mnemo train RECIPE [flags]   train a recipe (launch/RECIPE.py) with DDP / FSDP2 / DeepSpeed
  mnemo models                 the registered models: family, task, parameters, paper
  mnemo data ...               convert text and images to shards
  mnemo eval ...               evaluate checkpoints (loss, passkey / needle retrieval)
  mnemo ckpt ...               inspect / export checkpoints
  mnemo k8s ...                render KubeRay manifests

`mnemo COMMAND --help` describes each. Exit status: 0 done, 1 the run failed (its root error
is the last line, `error: Type: message (rank N)`), 2 bad input (a one-line `error: ...`
naming the flag, key or value), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

from system import config as C

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _interrupted() -> int:
    """What every entry point does on Ctrl-C: one short line, no traceback, status 130."""
    print("interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def recipe_parser(recipe: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line contract shared by launch/*.py and `mnemo train`."""
    names = C.presets(recipe)
    p = argparse.ArgumentParser(
        prog=prog or f"launch/{recipe}.py",
        description=f"Train the {recipe} recipe on Ray Train (embedded local Ray by default).",
    )
    preset_help = f"one of: {', '.join(names)}" if names else "a preset of the recipe"
    p.add_argument("--preset", default="smoke", help=f"{preset_help} (default smoke)")
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
    p.add_argument(
        "--address", default="auto", help=f"Ray cluster: {C.ADDRESS_FORMS} (default auto)"
    )
    p.add_argument("--workers", type=int, default=None, help="shortcut for scaling.workers")
    p.add_argument(
        "--strategy", choices=C.STRATEGIES, default=None, help="shortcut for scaling.strategy"
    )
    p.add_argument(
        "--zero",
        type=int,
        choices=(1, 2, 3),
        default=None,
        help="shortcut for scaling.zero_stage (with --strategy deepspeed)",
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
    """Preset + shortcuts + --set overrides (later wins) -> a validated JobConfig.

    Everything checkable without Ray is checked here (config.check_job), so a bad job stops
    before a cluster is asked for, `--print-config` included.
    """
    overrides: list[str] = []
    if args.workers is not None:
        overrides.append(f"scaling.workers={args.workers}")
    if args.strategy is not None:
        overrides.append(f"scaling.strategy={args.strategy}")
    if args.zero is not None:
        overrides.append(f"scaling.zero_stage={args.zero}")
    overrides += args.overrides
    cfg = C.load(recipe, args.preset, overrides)
    if args.zero is not None and cfg.scaling.strategy != "deepspeed":
        raise ValueError(
            f"--zero {args.zero} applies to DeepSpeed only, but scaling.strategy="
            f"{cfg.scaling.strategy!r}; expected --strategy deepspeed with --zero"
        )
    run_dir = args.run_dir or f"runs/{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    # auto | never | PATH made absolute and checked here: the workers run in another directory.
    # On a remote cluster (HOST:PORT, ray://) PATH names the cluster's files: left as typed.
    resume = args.resume
    if resume not in ("auto", "never") and args.address in ("auto", "local"):
        from system.ckpt_files import resume_target  # lazy: it imports torch (--print-config)

        resume = resume_target(resume)
    cfg = dataclasses.replace(
        cfg, run_dir=str(Path(run_dir).resolve()), resume=resume, address=args.address
    )
    cfg = C.absolute_paths(cfg)  # the workers run in another directory
    C.check_job(cfg, C.launch_world(_launcher(args), cfg.scaling.workers))
    return cfg


def _launcher(args: argparse.Namespace) -> str:
    """Which launcher runs the loop: "ray", or "none" (in this process: asked for with
    --launcher none, or already under torchrun / accelerate launch)."""
    under_torchrun = "LOCAL_RANK" in os.environ and "RAY_ADDRESS" not in os.environ
    return "none" if args.launcher == "none" or under_torchrun else "ray"


def recipe_main(recipe: str, argv: list[str] | None = None) -> int:
    """Entry point of every launch/<recipe>.py: 0 done, 1 failed, 2 bad input, 130 Ctrl-C."""
    try:
        return _recipe_main(recipe, argv)
    except KeyboardInterrupt:  # launcher.run has shut down an embedded cluster it started
        return _interrupted()


def _recipe_main(recipe: str, argv: list[str] | None) -> int:
    import json

    args = recipe_parser(recipe, _PROG.get(recipe)).parse_args(argv)
    try:
        cfg = resolve(recipe, args)
        C.check_local(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if _launcher(args) == "none":
        # Under torchrun / accelerate launch every process runs the loop itself.
        from system.trainer import train_loop

        train_loop(cfg.to_dict())
        return 0
    from system.launcher import RunFailed, run

    try:
        run(cfg)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    summary = Path(cfg.run_dir) / "summary.json"
    if summary.exists():
        print(f"[mnemo] summary: {summary}\n{summary.read_text()}")
    return 0


# recipe -> prog name of its parser when run as `mnemo train RECIPE` (set by _cmd_train).
_PROG: dict[str, str] = {}


def _launch_dir() -> Path:
    for cand in (Path.cwd() / "launch", Path(__file__).resolve().parent.parent / "launch"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("no launch/ directory next to the package or in the working directory")


def recipes() -> dict[str, str]:
    """Recipe name -> first line of its docstring, read without importing it (fast --help)."""
    out = {}
    for path in sorted(_launch_dir().glob("*.py")):
        if path.stem.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def _train_parser() -> argparse.ArgumentParser:
    """`mnemo train`: its help lists the recipes and the flags every recipe takes."""
    table = recipes()
    width = max(map(len, table), default=0)
    listing = "\n".join(f"  {n:<{width}}  {d}" for n, d in table.items())
    shared = recipe_parser("RECIPE", prog="mnemo train RECIPE").format_help()
    lines = shared.split("options:\n", 1)[-1].splitlines()
    flags = "\n".join(x for x in lines if not x.lstrip().startswith("-h, --help"))
    p = argparse.ArgumentParser(
        prog="mnemo train",
        usage="mnemo train RECIPE [flags]",
        description=f"Train a recipe on Ray Train.\n\nrecipes:\n{listing}",
        epilog=f"shared recipe flags (`mnemo train RECIPE --help` adds its presets):\n{flags}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="one of the recipes above")
    return p


def _cmd_train(argv: list[str]) -> int:
    """Run launch/RECIPE.py in this process, as `python launch/RECIPE.py FLAGS` would."""
    if not argv or argv[0].startswith("-"):
        p = _train_parser()
        p.parse_args(argv[:1])  # --help: prints, exits 0; another flag: usage error, exits 2
        p.error("a RECIPE is required (listed by `mnemo train --help`)")
    recipe, rest = argv[0], argv[1:]
    path = _launch_dir() / f"{recipe}.py"
    if not path.exists():
        known = ", ".join(recipes())
        print(
            f"error: no recipe {recipe!r} ({path} does not exist); expected one of: {known}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    _PROG[recipe] = f"mnemo train {recipe}"
    sys.argv = [str(path), *rest]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILED)
    return 0


def _models_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnemo models",
        description="The registered models: family, task, parameter count and paper. Counts "
        "come from building each on the meta device (no memory, milliseconds per model).",
    )
    p.add_argument("--family", default=None, help="only this family (e.g. titans, retnet)")
    p.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    return p


def model_rows(family: str | None = None) -> list[dict[str, Any]]:
    """One row per registered model; parameters counted on the meta device (no allocation)."""
    import torch

    import models

    rows = []
    for name in models.list_models():
        spec = models.get_spec(name)
        if family is not None and spec.family != family:
            continue
        with torch.device("meta"):
            model = models.build(name)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "task": spec.task,
                "params": sum(p.numel() for p in model.parameters()),
                "paper": getattr(spec, "paper", ""),
            }
        )
    return rows


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _cmd_models(argv: list[str]) -> int:
    import json

    import models

    args = _models_parser().parse_args(argv)
    families = sorted({models.get_spec(n).family for n in models.list_models()})
    if args.family is not None and args.family not in families:
        print(
            f"error: --family {args.family!r} is not a model family; expected one of: "
            f"{', '.join(families)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    rows = model_rows(args.family)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [(r["name"], r["family"], r["task"], _human(r["params"]), r["paper"]) for r in rows]
    head = ("NAME", "FAMILY", "TASK", "PARAMS", "PAPER")
    widths = [max(len(x[i]) for x in [head, *table]) for i in range(4)]
    for row in [head, *table]:
        cells = [c.ljust(w) if i != 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join([*cells, row[4]]).rstrip())
    return 0


# Subcommands whose parsers live in their own modules: "module:function(argv) -> int".
# Imported only when used: they pull in torch, deepspeed, yaml (start-up time).
_DELEGATED = {
    "data": ("data.convert:main", "convert text and images to shards"),
    "eval": ("system.evaluate:main", "evaluate checkpoints (loss, passkey / needle retrieval)"),
    "ckpt": ("system.ckpt_tools:main", "inspect / export checkpoints"),
    "k8s": ("system.k8s:main", "render KubeRay manifests (RayJob + RayCluster)"),
}


def parser() -> argparse.ArgumentParser:
    """The top-level `mnemo` parser: one subcommand per tool, each with a one-line help."""
    p = argparse.ArgumentParser(
        prog="mnemo",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.rstrip().rsplit("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # train and the delegated commands parse their own flags (add_help=False here; main()
    # hands them argv unparsed): these entries give `mnemo --help` and the unknown-command
    # error their names.
    sub.add_parser("train", help="train a recipe on Ray Train (launch/*.py)", add_help=False)
    sub.add_parser(
        "models",
        help="list the registered models (family, task, parameters, paper)",
        add_help=False,
    )
    for name, (_, line) in _DELEGATED.items():
        sub.add_parser(name, help=line, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """`mnemo COMMAND ...`: 0 done, 1 failed, 2 bad input, 130 interrupted."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:  # `mnemo models | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # stops the flush-at-exit error
        return 0


def _main(argv: list[str]) -> int:
    p = parser()
    try:
        p.parse_args(argv[:1])  # --help / no command / an unknown command (exits 0 or 2)
    except SystemExit as e:
        return int(e.code or 0)
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "train":
            return _cmd_train(rest)
        if cmd == "models":
            return _cmd_models(rest)
    except SystemExit as e:  # argparse's --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else EXIT_FAILED
    target, _ = _DELEGATED[cmd]
    mod, fn = target.split(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        print(f"error: `mnemo {cmd}` is not available ({e})", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(getattr(module, fn)(rest) or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILED)


if __name__ == "__main__":
    from system import cli  # the module the recipes import, not a second copy as __main__

    sys.exit(cli.main())
