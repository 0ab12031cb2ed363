"""The on-disk format of a checkpoint and how to read it without trusting it.

Layout of RUN_DIR/checkpoints/step_<8 digits>/:
    dcp/                  model + optimizer as DCP shards (ddp, fsdp): reshardable to any world size
    ds/state/             DeepSpeed engine checkpoint (deepspeed)
    ds_universal/         derived on resume on another world size (deepspeed; not in the manifest)
    rng_rank<r>.pt        python / numpy / torch RNG states of rank r (tensors and ints only)
    trainer_state.json    step, tokens, LR schedule, loader position, strategy, world size
    manifest_rank<r>.json size + CRC-32 of the files rank r wrote
    MANIFEST.json         the merged manifest, written by rank 0 once every rank finished
    COMMITTED             written last (atomic rename), after MANIFEST.json

Reading unpickles nothing unrestricted: tensors via `torch.load(weights_only=True)`, DCP's
`.metadata` (a plain pickle in torch 2.13) through an allowlisting unpickler and DCP's
non-tensor values with `weights_only=True`, DeepSpeed's files with `torch.load` forced to
`weights_only=True` plus an allowlist of its four classes (DeepSpeed 0.19.8 itself loads with
`weights_only=False`). Each file is checked against MANIFEST.json (size, CRC-32) first, so a
truncated or modified file fails with its name. The manifest is a corruption check, not a
signature: whoever can rewrite the files can rewrite it, which is why loading stays safe anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

COMMITTED = "COMMITTED"
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
UNIVERSAL = "ds_universal"
_HASH_CHUNK = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, tampered with or unsafe; the message names it."""


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def step_of(d: Path) -> int:
    return int(d.name.split("_")[1])


def named_step(d: Path) -> int:
    """The step of a checkpoint dir from its name, or from its trainer_state.json."""
    if re.fullmatch(r"step_\d+", d.name):
        return step_of(d)
    return int(load_json(d / TRAINER_STATE)["step"])


def all_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run (committed or not), oldest first."""
    return _step_dirs(Path(run_dir) / "checkpoints")


def is_done(d: Path) -> bool:
    """Committed: every rank finished and the manifest is written."""
    return (d / COMMITTED).exists()


def committed_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoint directories of a run, oldest first."""
    return [d for d in all_checkpoints(run_dir) if is_done(d)]


# -- small durable writes -------------------------------------------------------------------
def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Write, fsync (unless the caller fsyncs later), rename: readers see the old file or the
    whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def uncommit(d: Path) -> None:
    """Remove COMMITTED durably: from here on `d` is never resumed from, whatever happens."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(d / COMMITTED)
        fsync_dir(d)


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON ({e})") from None


# -- manifest: size + CRC-32 of every file --------------------------------------------------
def checksum(path: Path, durable: bool = False) -> str:
    """CRC-32 of a file, 8 hex digits (`durable`: also fsync it). A corruption check, 2.3x
    sha256's speed here; the manifest is no signature anyway: whoever can rewrite the files
    can rewrite it too."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            crc = zlib.crc32(chunk, crc)
        if durable:
            os.fsync(f.fileno())
    return f"{crc:08x}"


def _owner(rel: str) -> int:
    """The rank that wrote a file: DCP `__<r>_*`, `rng_rank<r>`, DeepSpeed `zero_pp_rank_<r>`."""
    m = re.search(r"(?:^__|rank_?)(\d+)", Path(rel).name)
    return int(m.group(1)) if m else 0


def _payload_files(d: Path) -> list[str]:
    """Files that belong in the manifest (everything but bookkeeping and derived files)."""
    out = []
    for p in d.rglob("*"):
        rel = p.relative_to(d).as_posix()
        if not p.is_file() or rel.startswith(UNIVERSAL + "/") or rel.endswith(".tmp"):
            continue
        if rel in (COMMITTED, MANIFEST) or re.fullmatch(r"manifest_rank\d+\.json", rel):
            continue
        out.append(rel)
    return sorted(out)


def write_rank_manifest(d: Path, rank: int, world: int) -> None:
    """Checksum and fsync the files this rank wrote (files of ranks >= world fall to rank 0):
    once COMMITTED exists they must survive a node crash, not only a process crash."""
    entries = {}
    dirs = set()
    for rel in _payload_files(d):
        owner = _owner(rel)
        if (owner if owner < world else 0) == rank:
            p = d / rel
            entries[rel] = {"size": p.stat().st_size, "crc32": checksum(p, durable=True)}
            dirs.add(p.parent)
    for parent in dirs:
        fsync_dir(parent)
    write_atomic(d / f"manifest_rank{rank}.json", json.dumps(entries, indent=1))


def merge_manifests(d: Path, world: int) -> None:
    files: dict[str, Any] = {}
    for r in range(world):
        files.update(load_json(d / f"manifest_rank{r}.json"))
    missing = sorted(set(_payload_files(d)) - set(files))
    if missing:
        raise CheckpointError(
            f"checkpoint {d}: files {missing} were written but no rank hashed them"
        )
    write_atomic(d / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


def manifest_files(d: Path) -> dict[str, dict[str, Any]]:
    """MANIFEST.json's `files` table, its shape checked: a bad manifest is named, not a KeyError."""
    path = d / MANIFEST
    raw = load_json(path)
    files = raw.get("files") if isinstance(raw, dict) else None
    ok = isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("crc32"), str)
        for v in files.values()
    )
    if not ok:
        raise CheckpointError(
            f"checkpoint file {path} is not a valid manifest: expected "
            '{"files": {"<relative path>": {"size": <bytes>, "crc32": "<8 hex digits>"}}}'
        )
    return files


def size_errors(d: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """Each manifest file that is missing or of another size: costs one stat() per file."""
    errors = []
    for rel, want in sorted(files.items()):
        p = d / rel
        if not p.is_file():
            errors.append(
                f"checkpoint file {p} is missing: {want['size']} bytes expected "
                f"(recorded in {d / MANIFEST})"
            )
        elif p.stat().st_size != want["size"]:
            errors.append(
                f"checkpoint file {p} is truncated or resized: {p.stat().st_size} bytes, "
                f"{want['size']} expected (recorded in {d / MANIFEST})"
            )
    return errors


def verify(d: Path, rank: int = 0, world: int = 1) -> None:
    """Check every file against MANIFEST.json: sizes on every rank, hashes split over ranks."""
    manifest = manifest_files(d)
    errors = size_errors(d, manifest)
    for i, (rel, want) in enumerate(sorted(manifest.items())):
        p = d / rel
        if i % world != rank or not p.is_file() or p.stat().st_size != want["size"]:
            continue  # another rank's share, or already reported by size_errors
        if checksum(p) != want["crc32"]:
            errors.append(
                f"checkpoint file {p} was modified: its CRC-32 differs from {d / MANIFEST}"
            )
    if world > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, errors)
        errors = sorted({e for part in gathered for e in part})
    if errors:
        raise CheckpointError("; ".join(errors))


# -- what a path holds: `mnemo ckpt inspect` and `--resume PATH` share one diagnosis ----------
EXPECTED = (
    "expected a checkpoint dir (RUN_DIR/checkpoints/step_XXXXXXXX holding "
    f"{MANIFEST} and {COMMITTED}) or a run dir (or its checkpoints/ dir) holding one"
)
RESUME_VALUES = (
    "--resume takes auto, never, or the path of a committed checkpoint (a step_XXXXXXXX dir) "
    "or of a run dir / checkpoints dir holding one"
)
# Files and dirs only our saves write: their presence without COMMITTED is an interrupted save.
_OURS = (COMMITTED, COMMITTED + ".tmp", MANIFEST, TRAINER_STATE, "dcp", "ds")
_OURS_RE = re.compile(r"(manifest_rank\d+\.json|rng_rank\d+\.pt)(\.tmp)?")


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """Whether a path can be resumed from and, if not, why (each reason names its file).

    kind: "resumable", "interrupted" (a save that never committed), "damaged" (committed, but a
    file is missing, resized or the manifest is bad), "no-committed" (a run dir without a
    committed checkpoint), "not-a-checkpoint", "missing" (the path does not exist).
    """

    given: Path
    checkpoint: Path | None  # the step dir examined (a run dir's newest committed one)
    kind: str
    problems: tuple[str, ...] = ()

    @property
    def resumable(self) -> bool:
        return not self.problems

    def message(self) -> str:
        return "; ".join(self.problems)


def _looks_like_step_dir(p: Path) -> bool:
    """Named like ours, or holding a file only our saves write."""
    if re.fullmatch(r"step_\d+", p.name):
        return True
    return any((p / n).exists() for n in _OURS) or any(
        _OURS_RE.fullmatch(c.name) for c in p.iterdir()
    )


def _step_dirs(root: Path) -> list[Path]:
    """The step_<digits> dirs under `root`, oldest first ([] when root does not exist)."""
    dirs = [d for d in root.glob("step_*") if d.is_dir() and re.fullmatch(r"step_\d+", d.name)]
    return sorted(dirs, key=step_of)


def diagnose_step_dir(d: Path, given: Path | None = None) -> Diagnosis:
    """COMMITTED, a well-formed manifest, and every manifest file present at its size."""
    problems = []
    committed = (d / COMMITTED).exists()
    if not committed:
        problems.append(
            f"checkpoint {d} is an interrupted save: it has no {COMMITTED} file (written last, "
            "once every rank's files are on disk; a save without it is never resumed from)"
        )
    if (d / MANIFEST).exists() or committed:
        try:
            problems += size_errors(d, manifest_files(d))
        except CheckpointError as e:
            problems.append(str(e))
    kind = "resumable" if not problems else ("damaged" if committed else "interrupted")
    return Diagnosis(given or d, d, kind, tuple(problems))


def diagnose(path: str | Path) -> Diagnosis:
    """What `path` holds: a checkpoint (or a run dir's newest committed one) and whether it is
    resumable. Cheap (stat() calls only): CRC-32s are left to `verify`."""
    p = Path(path).expanduser().resolve()
    try:
        return _diagnose(p)
    except OSError as e:  # unreadable: a permission, a vanished file
        return Diagnosis(p, None, "not-a-checkpoint", (f"{p} cannot be read ({e}); {EXPECTED}",))


def _diagnose(p: Path) -> Diagnosis:
    """A step dir is judged as such; any other dir must hold step dirs (itself, or checkpoints/)
    or it is garbage: "interrupted save" is kept for what our saves leave behind."""
    if not p.exists():
        return Diagnosis(p, None, "missing", (f"{p} does not exist",))
    if not p.is_dir():
        return Diagnosis(
            p, None, "not-a-checkpoint", (f"{p} is a file, not a checkpoint: {EXPECTED}",)
        )
    if _looks_like_step_dir(p):
        return diagnose_step_dir(p)
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    dirs = _step_dirs(root)
    if not dirs and root == p:
        found = sorted(c.name for c in p.iterdir())
        seen = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")
        what = f"found: {seen}" if found else "it is empty"
        return Diagnosis(
            p, None, "not-a-checkpoint", (f"{p} is not a checkpoint ({what}); {EXPECTED}",)
        )
    done = [d for d in dirs if is_done(d)]
    if not done:
        names = [d.name for d in dirs] or "nothing"
        return Diagnosis(
            p, None, "no-committed", (f"{root} holds no committed checkpoint (found: {names})",)
        )
    return diagnose_step_dir(done[-1], given=p)


def resume_target(value: str) -> str:
    """`--resume` as every worker must see it: auto, never, or the absolute path of a resumable
    checkpoint (workers run in another working directory, so a relative path would not do)."""
    if value in ("auto", "never"):
        return value
    diag = diagnose(value)
    if not diag.resumable:
        hint = f"; {RESUME_VALUES}" if diag.kind in ("missing", "not-a-checkpoint") else ""
        raise CheckpointError(f"--resume {value}: {diag.message()}{hint}")
    assert diag.checkpoint is not None
    return str(diag.checkpoint)


# -- loading without unrestricted unpickling -------------------------------------------------
_DCP_META = "torch.distributed.checkpoint.metadata"
_DCP_GLOBALS = {
    (_DCP_META, n)
    for n in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a plain pickle: allow only DCP's dataclasses, Size and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata load allowlists globals (stock: plain pickle.load)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as f:
                md = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing") from None
        except Exception as e:
            raise CheckpointError(f"checkpoint file {path} is not loadable: {e}") from None
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner but non-tensor values (lr, betas, ...) load with weights_only=True."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load, even when told `no_dist=True`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_load(state_dict: dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """`dcp.load` through the safe reader and planner; a failure names the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = SafeFileSystemReader(str(path)), SafeLoadPlanner()
    try:
        with quiet_single_process():
            dcp.load(state_dict, storage_reader=reader, planner=planner, no_dist=no_dist)
    except CheckpointException as e:  # a BaseException: wraps each rank's error
        causes = "; ".join(f"rank {r}: {exc}" for r, (exc, _) in sorted(e.failures.items()))
        raise CheckpointError(f"DCP checkpoint {path} could not be loaded: {causes}") from None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"DCP checkpoint {path} could not be loaded: {e}") from e


def load_pt(path: Path) -> Any:
    """`torch.load(weights_only=True)`; a failure names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} is not loadable safely: {e}") from None


def _deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed 0.19.8 pickles into ZeRO 1-3 and universal checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def deepspeed_safe_load() -> Iterator[None]:
    """Force `weights_only=True` on DeepSpeed's own `torch.load` calls while loading.

    DeepSpeed's loaders (engine, ds_to_universal, zero_to_fp32) call `torch.load(...,
    weights_only=False)`; patching `torch.load` for the duration is the one seam they share.
    """
    orig = torch.load

    def safe(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            return orig(f, *args, **kwargs)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {f} is missing") from None
        except Exception as e:
            raise CheckpointError(f"checkpoint file {f} is not loadable safely: {e}") from None

    with torch.serialization.safe_globals(_deepspeed_globals()):
        torch.load = safe
        try:
            yield
        finally:
            torch.load = orig


def to_universal(d: Path) -> Path:
    """Convert d/ds/state to a DeepSpeed universal checkpoint once; returns its load dir."""
    from deepspeed.checkpoint import ds_to_universal

    out = d / UNIVERSAL
    if (out / "CONVERTED").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(d / "ds" / "state"),
        output_folder=str(out / "state"),
        num_extract_workers=1,  # >1 forks a pool, outside our safe-load patch
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our engine does not set universal_checkpoint_info
    )
    quiet = io.StringIO()  # its progress bars and prints
    with (
        deepspeed_safe_load(),
        contextlib.redirect_stdout(quiet),
        contextlib.redirect_stderr(quiet),
    ):
        ds_to_universal.main(args)
    write_atomic(out / "CONVERTED", "ds_to_universal\n")
    return out
