"""`mnemo ckpt inspect|export`: read a checkpoint without the job, cluster or world size that
wrote it.

    mnemo ckpt inspect PATH [--verify] [--json]     step, world size, strategy, tensors, committed?
    mnemo ckpt export PATH --out model.safetensors  consolidated fp32 weights

PATH is a checkpoint directory (RUN_DIR/checkpoints/step_XXXXXXXX) or a run directory (its
newest committed checkpoint). The export loads with
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
    all_checkpoints,
    committed_checkpoints,
    dcp_load,
    deepspeed_safe_load,
    load_json,
    verify,
)


def resolve(path: str | Path) -> Path:
    """A checkpoint dir as given, or the newest committed one of a run dir."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        done = committed_checkpoints(p)
        if not done:
            names = [d.name for d in all_checkpoints(p)]
            raise CheckpointError(f"run dir {p} has no committed checkpoint (found: {names})")
        return done[-1]
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


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
    """Everything `inspect` prints, as a dict."""
    d = resolve(path)
    info: dict[str, Any] = {"path": str(d), "committed": (d / COMMITTED).exists()}
    try:
        meta = load_json(d / TRAINER_STATE)
    except CheckpointError as e:
        info["error"] = str(e)
        return info
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
    files = [p for p in d.rglob("*") if p.is_file()]
    info["files"] = len(files)
    info["bytes"] = sum(p.stat().st_size for p in files)
    if not (d / MANIFEST).exists():
        info["manifest"] = "missing (interrupted save)"
    elif check_hashes:
        try:
            verify(d)
            info["manifest"] = "ok (sizes and CRC-32 match)"
        except CheckpointError as e:
            info["manifest"] = f"FAILED: {e}"
    else:
        info["manifest"] = "present (not checked; --verify hashes every file)"
    info["tensors"] = model_tensors(d, meta["strategy"])
    return info


def consolidated_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full fp32 model weights of a committed, verified checkpoint, plus its trainer_state."""
    d = resolve(path)
    if not (d / COMMITTED).exists():
        raise CheckpointError(f"checkpoint {d} has no {COMMITTED} file (an interrupted save)")
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
    yes = "yes" if info["committed"] else "NO (interrupted save: never resumed from)"
    print(f"checkpoint  {info['path']}\ncommitted   {yes}")
    if "error" in info:
        print(f"error       {info['error']}")
        return
    zero = f", ZeRO-{info['zero_stage']}" if info.get("zero_stage") else ""
    print(f"step        {info['step']} (tokens {info['tokens']})")
    print(f"strategy    {info['strategy']}{zero}, world size {info['world_size']}")
    print(f"model       {info['model']} {json.dumps(info['model_args'])}")
    mib = info["bytes"] / 2**20
    print(f"files       {info['files']} ({mib:.1f} MiB); manifest {info['manifest']}")
    n = sum(_numel(shape) for shape, _ in info["tensors"].values())
    print(f"tensors     {len(info['tensors'])} ({n / 1e6:.2f}M values)")
    for name, (shape, dtype) in info["tensors"].items():
        print(f"  {name:<48} {dtype:<9} {shape}")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mnemo ckpt", description="Inspect or export checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("inspect", help="step, world size, strategy, tensors, committed or not")
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
            bad = "error" in info or str(info.get("manifest", "")).startswith("FAILED")
            return 1 if bad else 0
        out = export(args.path, args.out)
        print(f"wrote {out}")
        return 0
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
