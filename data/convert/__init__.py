"""`mnemo data ...`: convert inputs to WebDataset shards (text -> tokens, image folders)."""

from __future__ import annotations

import argparse
import sys

from data.convert.images import convert_images
from data.convert.images import summary as images_summary
from data.convert.text import convert_text
from data.convert.text import summary as text_summary

_SIZE_HELP = (
    "max bytes per shard: decimal units MB = 10^6 bytes (k/KB = 10^3, GB = 10^9) or binary "
    "MiB = 2^20 bytes (KiB = 2^10, GiB = 2^30); default 256MB"
)
_OUT_HELP = (
    "output folder: new, empty, or an earlier output of `mnemo data` (then --force); a folder "
    "holding anything else is refused"
)
_FORCE_HELP = "replace an earlier output of `mnemo data` in --out (never other files)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnemo data",
        description="Convert inputs to WebDataset shards (shard-NNNNNN.tar + index.json), "
        "readable by tar, webdataset and data.source=shards.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{text,images}")
    t = sub.add_parser(
        "text",
        help="text files, directories, .jsonl, .gz -> token shards",
        description="One sample per document (a text file or a jsonl line) as <key>.tokens.npy.",
    )
    t.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files or directories (recursive; binary files are skipped and counted)",
    )
    t.add_argument("--out", required=True, metavar="DIR", help=_OUT_HELP)
    t.add_argument("--tokenizer", default="byte", help="byte (default) or a tokenizer.json")
    t.add_argument("--shard-size", default="256MB", help=_SIZE_HELP)
    t.add_argument("--jsonl-field", default="text", help="field of .jsonl lines to tokenize")
    t.add_argument("--force", action="store_true", help=_FORCE_HELP)
    t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    i = sub.add_parser(
        "images",
        help="class folders or LR/HR folder pairs -> image shards",
        description="Raw image bytes (png/jpg) plus a class index (.cls), or .lr/.hr pairs.",
    )
    i.add_argument("--input", metavar="DIR", help="DIR/<class>/... or DIR with *lr* and *hr* dirs")
    i.add_argument("--lr", metavar="DIR", help="low-resolution folder (with --hr)")
    i.add_argument("--hr", metavar="DIR", help="high-resolution folder (with --lr)")
    i.add_argument("--mode", default="auto", choices=("auto", "classes", "pairs"))
    i.add_argument("--out", required=True, metavar="DIR", help=_OUT_HELP)
    i.add_argument("--shard-size", default="256MB", help=_SIZE_HELP)
    i.add_argument("--seed", type=int, default=0, help="shuffle seed of class samples")
    i.add_argument("--force", action="store_true", help=_FORCE_HELP)
    i.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `mnemo data ARGS`; returns the exit status (2 for bad input, named in the message)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse already printed
        return int(e.code or 0)
    try:
        if args.cmd == "text":
            summary = text_summary
            meta = convert_text(
                args.input,
                args.out,
                tokenizer=args.tokenizer,
                shard_size=args.shard_size,
                jsonl_field=args.jsonl_field,
                force=args.force,
                progress=not args.no_progress,
            )
        else:
            summary = images_summary
            meta = convert_images(
                args.out,
                input=args.input,
                lr=args.lr,
                hr=args.hr,
                mode=args.mode,
                shard_size=args.shard_size,
                seed=args.seed,
                force=args.force,
                progress=not args.no_progress,
            )
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"mnemo data {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    print(summary(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
