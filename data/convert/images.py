"""`mnemo data images`: image folders -> WebDataset shards of raw image bytes (no decoding).

Two layouts. Class folders: `DIR/<class>/**/<image>` -> `<key>.png|jpg` (the file's own bytes)
and `<key>.cls` (class index, ASCII, classes sorted by name); samples are shuffled with a fixed
seed before writing, so a shard mixes classes. Super-resolution pairs: a low- and a
high-resolution folder (`--lr/--hr`, or the subfolders of `--input` whose names contain `lr` and
`hr`) matched by file name, or by stem with an `x<scale>` suffix dropped (DIV2K `0001x4.png`
pairs `0001.png`) -> `<key>.lr.png` and `<key>.hr.png`. Image type comes from the file's magic
bytes (PNG, JPEG); other files are skipped and counted.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.convert.text import _progress_bar, parse_size, staged_output
from data.shard_format import FORMAT, ShardWriter, write_index

_SCALE_SUFFIX = re.compile(r"x\d+$", re.IGNORECASE)


def image_kind(head: bytes) -> str | None:
    """`png`, `jpg` or None from a file's first bytes."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    return None


@dataclass
class ImageStats:
    images: int = 0
    image_bytes: int = 0
    skipped_non_image: int = 0
    skipped_non_image_bytes: int = 0
    unmatched_lr: int = 0
    unmatched_hr: int = 0


def _files(d: Path) -> list[Path]:
    return sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))


def _load(path: Path, stats: ImageStats) -> tuple[str, bytes] | None:
    data = path.read_bytes()
    kind = image_kind(data[:16])
    if kind is None:
        stats.skipped_non_image += 1
        stats.skipped_non_image_bytes += len(data)
        return None
    stats.images += 1
    stats.image_bytes += len(data)
    return kind, data


def find_pair_dirs(root: Path) -> tuple[Path, Path] | None:
    """(lr, hr) subfolders of `root` if exactly one name holds `lr` and one `hr`."""
    subs = [d for d in sorted(root.iterdir()) if d.is_dir()]
    lr = [d for d in subs if "lr" in d.name.lower()]
    hr = [d for d in subs if "hr" in d.name.lower()]
    return (lr[0], hr[0]) if len(lr) == 1 and len(hr) == 1 and lr[0] != hr[0] else None


def match_pairs(lr_files: list[Path], hr_files: list[Path]) -> list[tuple[Path, Path]]:
    """HR files paired with the LR file of the same name, else the same stem sans `x<scale>`."""
    by_name = {f.name: f for f in lr_files}
    by_stem = {_SCALE_SUFFIX.sub("", f.stem): f for f in lr_files}
    pairs = []
    for h in hr_files:
        lr = by_name.get(h.name) or by_stem.get(h.stem)
        if lr is not None:
            pairs.append((lr, h))
    return pairs


def convert_images(
    out: str | Path,
    *,
    input: str | None = None,
    lr: str | None = None,
    hr: str | None = None,
    mode: str = "auto",
    shard_size: str | int = "256MB",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write class-folder or LR/HR-pair shards under `out`; returns the index.json content."""
    if mode not in ("auto", "classes", "pairs"):
        raise ValueError(f"--mode {mode!r}; expected auto, classes or pairs")
    if (lr is None) != (hr is None):
        raise ValueError("--lr and --hr go together")
    if lr is None:
        if input is None:
            raise ValueError("give --input DIR (class folders or LR/HR folders) or --lr and --hr")
        root = Path(input)
        if not root.is_dir():
            raise FileNotFoundError(f"--input {input!r} is not a directory")
        pair_dirs = find_pair_dirs(root) if mode != "classes" else None
        if mode == "pairs" and pair_dirs is None:
            raise ValueError(f"--input {input}: expected one subfolder named *lr* and one *hr*")
    else:
        pair_dirs = (Path(lr), Path(hr))
        for d in pair_dirs:
            if not d.is_dir():
                raise FileNotFoundError(f"{d} is not a directory")
    out = Path(out)
    with staged_output(out, force) as stage:
        meta = _images_into(
            stage,
            input,
            lr,
            hr,
            root if lr is None else None,
            pair_dirs,
            shard_size,
            seed,
            progress,
        )
    return meta


def _images_into(
    stage: Path,
    input: str | None,
    lr: str | None,
    hr: str | None,
    root: Path | None,
    pair_dirs: tuple[Path, Path] | None,
    shard_size: str | int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Image shards and index.json under `stage`; the index content."""
    stats = ImageStats()
    meta: dict[str, Any] = {"format": FORMAT, "version": 1, "created_by": "mnemo data images"}
    with ShardWriter(stage, max_bytes=parse_size(shard_size)) as writer:
        if pair_dirs is not None:
            meta.update(_write_pairs(writer, *pair_dirs, stats, progress))
        else:
            assert root is not None
            meta.update(_write_classes(writer, root, seed, stats, progress))
    if not writer.shards:
        where = f"--input {input}" if lr is None else f"--lr {lr} --hr {hr}"
        raise ValueError(
            f"{where}: no images found ({stats.skipped_non_image} non-image file(s), "
            f"{stats.unmatched_lr} LR and {stats.unmatched_hr} HR file(s) unmatched); expected "
            "PNG or JPEG files"
        )
    shards = writer.shards
    for s in shards:
        s.pop("tokens", None)
    meta["shards"] = shards
    meta["totals"] = {
        "shards": len(shards),
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
    }
    meta["inputs"] = asdict(stats)
    write_index(stage, meta)
    return meta


def _write_classes(
    writer: ShardWriter, root: Path, seed: int, stats: ImageStats, progress: bool
) -> dict[str, Any]:
    classes = [d.name for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if not classes:
        raise ValueError(f"--input {root}: no class subfolders")
    items = [(f, c) for c, name in enumerate(classes) for f in _files(root / name)]
    order = np.random.default_rng(seed).permutation(len(items))
    counts = [0] * len(classes)
    bar = _progress_bar(len(items), progress)
    n = 0
    for i in order:
        path, c = items[int(i)]
        got = _load(path, stats)
        bar.update(1)
        if got is None:
            continue
        kind, data = got
        writer.add(f"{n:08d}", {kind: data, "cls": str(c).encode()})
        counts[c] += 1
        n += 1
    bar.close()
    return {"kind": "image_classes", "classes": classes, "class_counts": counts, "seed": seed}


def _write_pairs(
    writer: ShardWriter, lr_dir: Path, hr_dir: Path, stats: ImageStats, progress: bool
) -> dict[str, Any]:
    lr_files, hr_files = _files(lr_dir), _files(hr_dir)
    pairs = match_pairs(lr_files, hr_files)
    stats.unmatched_lr = len(lr_files) - len(pairs)
    stats.unmatched_hr = len(hr_files) - len(pairs)
    bar = _progress_bar(len(pairs), progress)
    n = 0
    for lo, hi in pairs:
        a, b = _load(lo, stats), _load(hi, stats)
        bar.update(1)
        if a is None or b is None:
            continue
        writer.add(f"{n:08d}", {f"lr.{a[0]}": a[1], f"hr.{b[0]}": b[1]})
        n += 1
    bar.close()
    return {"kind": "image_pairs", "lr": str(lr_dir), "hr": str(hr_dir), "pairs": n}


def summary(meta: dict[str, Any]) -> str:
    s, t = meta["inputs"], meta["totals"]
    what = (
        f"{len(meta['classes'])} classes"
        if meta["kind"] == "image_classes"
        else f"{meta['pairs']} LR/HR pairs ({s['unmatched_lr']} LR and {s['unmatched_hr']} "
        "HR files unmatched)"
    )
    return (
        f"read {s['images']} images ({s['image_bytes']:,} bytes); skipped "
        f"{s['skipped_non_image']} non-image file(s) ({s['skipped_non_image_bytes']:,} bytes)"
        f"\nwrote {t['samples']:,} samples, {what}, in {t['shards']} shard(s), "
        f"{t['bytes']:,} bytes"
    )
