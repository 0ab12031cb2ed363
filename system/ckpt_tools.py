"""`mnemo ckpt inspect|export`: read a checkpoint without the job, cluster or world size that
wrote it.

    mnemo ckpt inspect PATH [--verify] [--json]     step, world size, strategy, tensors, committed?
    mnemo ckpt export PATH --out model.safetensors  consolidated fp32 weights

PATH is a checkpoint directory (RUN_DIR/checkpoints/step_XXXXXXXX) or a run directory (its
newest committed checkpoint). `inspect` always checks COMMITTED and every file's size against
MANIFEST.json (stat() only; `--verify` adds the CRC-32s) and exits 0 only for a checkpoint a
run can resume from: the same diagnosis `--resume PATH` applies before Ray starts. The export
loads with
`models.build(name, **args).load_state_dict(safetensors.torch.load_file(out))`; tied weights
(transformer `embed.weight` / `head.weight`) are written as two equal tensors, because
safetensors refuses shared storage and a strict `load_state_dict` wants both keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from system.ckpt_files import (
    COMMITTED,
    MANIFEST,
    TRAINER_STATE,
    CheckpointError,
    _MetadataUnpickler,
    dcp_load,
    deepspeed_safe_load,
    diagnose,
    load_json,
    verify,
)

# Exit status of `mnemo ckpt inspect` (also in its --help).
EXIT_RESUMABLE, EXIT_NOT_RESUMABLE, EXIT_USAGE = 0, 1, 2


def resolve(path: str | Path) -> Path:
    """The checkpoint dir `path` names (a run dir's newest committed one), resumable or not."""
    diag = diagnose(path)
    if diag.checkpoint is None:
        raise CheckpointError(diag.message())
    return diag.checkpoint


def _dcp_metadata(d: Path) -> Any:
    path = d / "dcp" / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} is not loadable: {e}") from None


def model_tensors(d: Path, strategy: str) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype) of the model's tensors, read from metadata only."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if strategy != "deepspeed":
        md = _dcp_metadata(d)
        return {
            k.removeprefix("model."): (list(v.size), str(v.properties.dtype).removeprefix("torch."))
            for k, v in sorted(md.state_dict_metadata.items())
            if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
        }
    _import_deepspeed()
    files = sorted((d / "ds" / "state").glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"no DeepSpeed model states file under {d / 'ds' / 'state'}")
    with deepspeed_safe_load():
        sd = torch.load(files[0], map_location="cpu")
    out: dict[str, tuple[list[int], str]] = {}
    for group in sd.get("param_shapes") or []:
        for name, shape in group.items():
            out[name] = (list(shape), "float32")
    for name, t in (sd.get("module") or {}).items():
        if name not in out or t.numel() == 0:
            continue
        out[name] = (list(t.shape), str(t.dtype).removeprefix("torch."))
    for name, other in (sd.get("shared_params") or {}).items():
        out.setdefault(name, out.get(other, ([], "?")))
    return dict(sorted(out.items()))


def describe(path: str | Path, check_hashes: bool = False) -> dict[str, Any]:
    """Everything `inspect` prints, as a dict; `resumable` is False with `problems` naming why."""
    diag = diagnose(path)
    if diag.checkpoint is None:  # not a checkpoint, missing, or a run dir without a committed one
        return {
            "path": str(diag.given),
            "kind": diag.kind,
            "resumable": False,
            "problems": list(diag.problems),
        }
    d = diag.checkpoint
    problems = list(diag.problems)
    info: dict[str, Any] = {
        "path": str(d),
        "kind": diag.kind,
        "committed": (d / COMMITTED).exists(),
        "resumable": False,
        "problems": problems,
    }
    files = [p for p in d.rglob("*") if p.is_file()]
    info["files"] = len(files)
    info["bytes"] = sum(p.stat().st_size for p in files)
    if not (d / MANIFEST).exists():
        info["manifest"] = "missing"
    elif any(str(d / MANIFEST) in e for e in problems):
        info["manifest"] = "FAILED (see problems)"
    elif check_hashes:
        try:
            verify(d)
            info["manifest"] = "ok (sizes and CRC-32 match)"
        except CheckpointError as e:
            problems.append(str(e))
            info["manifest"] = "FAILED (see problems)"
    else:
        ok = "sizes match" if not problems else "checked"
        info["manifest"] = f"{ok} (CRC-32 not checked; --verify hashes every file)"
    try:
        meta = load_json(d / TRAINER_STATE)
        info.update(
            step=meta["step"],
            tokens=meta.get("train_state", {}).get("tokens"),
            strategy=meta["strategy"],
            zero_stage=meta.get("zero_stage"),
            world_size=meta["world_size"],
            model=meta["model"],
            model_args=meta.get("model_args", {}),
            loader=meta.get("loader"),
        )
        info["tensors"] = model_tensors(d, meta["strategy"])
    except CheckpointError as e:  # a file the size check already named is not named twice
        named = str(e).split(" is ", 1)[0] + " is "
        if not any(x.startswith(named) for x in problems):
            problems.append(str(e))
    except (KeyError, TypeError) as e:
        problems.append(f"checkpoint file {d / TRAINER_STATE} lacks a field: {e}")
    info["kind"] = diag.kind if diag.problems or not problems else "damaged"
    info["resumable"] = not problems
    return info


def consolidated_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full fp32 model weights of a committed, verified checkpoint, plus its trainer_state."""
    diag = diagnose(path)
    if not diag.resumable or diag.checkpoint is None:
        raise CheckpointError(diag.message())
    d = diag.checkpoint
    verify(d)
    meta = load_json(d / TRAINER_STATE)
    if meta["strategy"] == "deepspeed":
        _import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with deepspeed_safe_load():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(d / "ds"), tag="state")
        return dict(sd), meta
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _dcp_metadata(d)
    model = {
        k.removeprefix("model."): torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    dcp_load({"model": model}, d / "dcp", no_dist=True)
    return model, meta


def export(path: str | Path, out: str | Path) -> Path:
    """Write the consolidated weights as safetensors (tied tensors stored twice)."""
    from safetensors.torch import save_file

    sd, meta = consolidated_state_dict(path)
    seen: set[int] = set()
    tensors = {}
    for k, t in sd.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in seen else t  # safetensors refuses shared storage
        seen.add(ptr)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "step": str(meta["step"]),
        "model": meta["model"],
        "model_args": json.dumps(meta.get("model_args", {})),
        "source": str(resolve(path)),
    }
    save_file(tensors, str(out), metadata=info)
    return out


def _import_deepspeed() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _print_info(info: dict[str, Any]) -> None:
    print(f"checkpoint  {info['path']}")
    if "committed" in info:
        yes = "yes" if info["committed"] else "NO (interrupted save: never resumed from)"
        print(f"committed   {yes}")
    kinds = {"not-a-checkpoint": "not a checkpoint", "missing": "does not exist"}
    why = kinds.get(info["kind"], info["kind"].replace("-", " "))
    print(f"resumable   {'yes' if info['resumable'] else f'NO ({why})'}")
    for problem in info["problems"]:
        print(f"problem     {problem}")
    if "manifest" in info:
        mib = info["bytes"] / 2**20
        print(f"files       {info['files']} ({mib:.1f} MiB); manifest {info['manifest']}")
    if "step" not in info:
        return
    zero = f", ZeRO-{info['zero_stage']}" if info.get("zero_stage") else ""
    print(f"step        {info['step']} (tokens {info['tokens']})")
    print(f"strategy    {info['strategy']}{zero}, world size {info['world_size']}")
    print(f"model       {info['model']} {json.dumps(info['model_args'])}")
    tensors = info.get("tensors", {})
    n = sum(_numel(shape) for shape, _ in tensors.values())
    print(f"tensors     {len(tensors)} ({n / 1e6:.2f}M values)")
    for name, (shape, dtype) in tensors.items():
        print(f"  {name:<48} {dtype:<9} {shape}")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnemo ckpt", description="Inspect or export checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser(
        "inspect",
        help="step, world size, strategy, tensors; whether a run can resume from it",
        description="Diagnose a checkpoint: COMMITTED present, MANIFEST.json well-formed, every "
        "file it lists present at its recorded size (always; --verify also compares CRC-32s).",
        epilog=f"exit status: {EXIT_RESUMABLE} = a committed checkpoint a run can resume from; "
        f"{EXIT_NOT_RESUMABLE} = cannot be resumed from: an interrupted save (no COMMITTED), a "
        "missing or resized file, a bad manifest or trainer_state.json, a CRC-32 mismatch "
        "(--verify), a run dir without a committed checkpoint, a path that is not a "
        f"checkpoint or does not exist; {EXIT_USAGE} = bad command line. The reasons are "
        "printed as `problem` lines (or in the JSON's `problems`).",
    )
    i.add_argument("path", help="checkpoint dir or run dir (newest committed checkpoint)")
    i.add_argument("--verify", action="store_true", help="hash every file against MANIFEST.json")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    e = sub.add_parser("export", help="consolidated weights as safetensors")
    e.add_argument("path", help="checkpoint dir or run dir (newest committed checkpoint)")
    e.add_argument("--out", required=True, help="output .safetensors file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "inspect":
            info = describe(args.path, check_hashes=args.verify)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_info(info)
            return EXIT_RESUMABLE if info["resumable"] else EXIT_NOT_RESUMABLE
        out = export(args.path, args.out)
        print(f"wrote {out}")
        return 0
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
