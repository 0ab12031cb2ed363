"""`mnemo eval niah`: passkey / needle retrieval accuracy by context length and depth.

    mnemo eval niah --checkpoint RUN_DIR/checkpoints/step_00000060 --lengths 1k,4k,16k \
        --depths 0,0.25,0.5,0.75,1 --samples 8 [--kind passkey|niah] [--out DIR]

A probe counts as retrieved when the model, reading the probe up to the answer, predicts every
answer digit (greedy, teacher-forced on the earlier digits: for a fixed-length digit answer this
equals greedy decoding when all digits are right). Prints a table and writes niah.png (heat map)
and niah.json into RUN_DIR/eval/niah-step_XXXXXXXX/ (or --out): beside the checkpoint, never
into it, so a committed checkpoint directory holds only what its save wrote. The probes' digit
count and alphabet default to the run's own (RUN_DIR/config.json), so a model trained on
3 digits of 0-3 is probed on that task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models
from data.synthetic import make_needle
from system.ckpt_files import CheckpointError, diagnose


def parse_lengths(text: str) -> list[int]:
    """'1k,4k,16k,1m' or plain integers -> token counts (k = 1024, m = 1024**2)."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        mult = {"k": 1024, "m": 1024**2}.get(p[-1], 1)
        num = p[:-1] if mult > 1 else p
        try:
            out.append(int(float(num) * mult))
        except ValueError:
            raise ValueError(f"--lengths entry {part!r}: expected e.g. 4k, 1m or 4096") from None
    if not out:
        raise ValueError("--lengths is empty")
    return out


def load_model(checkpoint: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the checkpoint's model on one CPU process from its consolidated weights."""
    from system.ckpt_tools import consolidated_state_dict  # DCP / DeepSpeed shards, verified

    sd, meta = consolidated_state_dict(checkpoint)
    model = models.build(meta["model"], **meta.get("model_args", {}))
    model.load_state_dict(sd)
    return model.eval(), meta


@torch.no_grad()
def probe_accuracy(
    model: torch.nn.Module,
    length: int,
    depth: float,
    samples: int,
    *,
    kind: str = "passkey",
    seed: int = 1234,
    batch: int = 4,
    digits: int = 5,
    alphabet: int = 10,
) -> float:
    """Share of `samples` probes of `length` tokens whose answer digits are all predicted."""
    rng = np.random.default_rng([seed, length, int(depth * 1000)])
    probes = [
        make_needle(rng, length, depth=depth, kind=kind, digits=digits, alphabet=alphabet)
        for _ in range(samples)
    ]
    hits = 0
    for i in range(0, samples, batch):
        group = probes[i : i + batch]
        toks = torch.as_tensor(np.stack([p.tokens for p in group]).astype(np.int64))
        logits = model(toks[:, :-1]).logits
        for j, p in enumerate(group):
            a0 = p.answer_start
            pred = logits[j, a0 - 1 : length - 1].argmax(-1)
            hits += int(torch.equal(pred, toks[j, a0:]))
    return hits / samples


def heatmap(acc: np.ndarray, lengths: list[int], depths: list[float], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)), dpi=100)
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [_fmt_len(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (r, c), v in np.ndenumerate(acc):
        ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt_len(n: int) -> str:
    if n % 1024**2 == 0:
        return f"{n // 1024**2}M"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def run_dir_of(checkpoint: Path) -> Path:
    """RUN_DIR of RUN_DIR/checkpoints/step_X; a checkpoint elsewhere counts its parent."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def default_out_dir(checkpoint: Path) -> Path:
    """RUN_DIR/eval/niah-<step dir name>: beside the checkpoint, not inside it."""
    return run_dir_of(checkpoint) / "eval" / f"niah-{checkpoint.resolve().name}"


def resolve_out_dir(checkpoint: Path, out: str | None) -> Path:
    """--out or the default; an existing file there is an error naming it (before any work)."""
    out_dir = Path(out) if out else default_out_dir(checkpoint)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(
            f"--out {out_dir} is an existing file; expected a directory (created if missing)"
        )
    return out_dir


def run_task(checkpoint: Path) -> dict[str, int]:
    """The passkey digits and alphabet the run trained on (its config.json), else 5 of 0-9."""
    task = {"digits": 5, "alphabet": 10}
    cfg_file = run_dir_of(checkpoint) / "config.json"
    if cfg_file.is_file():
        d = json.loads(cfg_file.read_text()).get("data", {})
        task["digits"] = int(d.get("passkey_digits", task["digits"]))
        task["alphabet"] = int(d.get("passkey_alphabet", task["alphabet"]))
    return task


def run_niah(args: argparse.Namespace) -> dict[str, Any]:
    lengths = parse_lengths(args.lengths)
    depths = [float(d) for d in args.depths.split(",")]
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"--depths entry {d}: expected a fraction in [0, 1]")
    # A run dir or its checkpoints/ dir means its newest committed step dir (as --resume takes
    # them): the output and the run's config.json are then found from that step dir.
    if args.out:
        resolve_out_dir(Path(args.checkpoint), args.out)  # a taken --out fails before anything
    diag = diagnose(args.checkpoint)
    if not diag.resumable or diag.checkpoint is None:
        raise CheckpointError(f"--checkpoint {args.checkpoint}: {diag.message()}")
    checkpoint = Path(diag.checkpoint)
    out_dir = resolve_out_dir(checkpoint, args.out)
    task = run_task(checkpoint)
    digits = args.digits if args.digits is not None else task["digits"]
    alphabet = args.alphabet if args.alphabet is not None else task["alphabet"]
    torch.manual_seed(0)
    model, meta = load_model(checkpoint)
    acc = np.zeros((len(depths), len(lengths)))
    for c, n in enumerate(lengths):
        for r, d in enumerate(depths):
            acc[r, c] = probe_accuracy(
                model,
                n,
                d,
                args.samples,
                kind=args.kind,
                batch=args.batch,
                digits=digits,
                alphabet=alphabet,
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "depth \\ length | " + " | ".join(f"{_fmt_len(n):>6}" for n in lengths)
    chance = float(alphabet) ** -digits
    print(
        f"{args.kind} retrieval accuracy (%), {meta['model']} at step {meta['step']}: "
        f"{digits}-digit keys of 0-{alphabet - 1} (chance {100 * chance:.2g}%), "
        f"{args.samples} probes per cell"
    )
    print(header)
    print("-" * len(header))
    for r, d in enumerate(depths):
        print(f"{d:>14.0%} | " + " | ".join(f"{100 * v:>6.0f}" for v in acc[r]))
    print(f"{'mean':>14} | " + " | ".join(f"{100 * v:>6.0f}" for v in acc.mean(0)))
    result = {
        "model": meta["model"],
        "step": meta["step"],
        "kind": args.kind,
        "digits": digits,
        "alphabet": alphabet,
        "chance": chance,
        "samples": args.samples,
        "lengths": lengths,
        "depths": depths,
        "accuracy": acc.tolist(),
    }
    (out_dir / "niah.json").write_text(json.dumps(result, indent=2))
    heatmap(acc, lengths, depths, out_dir / "niah.png", f"{meta['model']} {args.kind}")
    print(f"wrote {out_dir / 'niah.png'} and {out_dir / 'niah.json'}")
    return result


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mnemo eval", description="Evaluate checkpoints.")
    sub = ap.add_subparsers(dest="task", required=True)
    n = sub.add_parser("niah", help="passkey / needle retrieval by length and depth")
    n.add_argument("--checkpoint", required=True, help="a committed step_* directory")
    n.add_argument(
        "--lengths",
        default="1k,4k,16k",
        help="comma-separated probe lengths in tokens; k = 1024 and m = 1024**2, so 1k = 1024 "
        "tokens (default: %(default)s)",
    )
    n.add_argument(
        "--depths",
        default="0,0.25,0.5,0.75,1",
        help="comma-separated needle depths as fractions of the probe, 0 = start, 1 = just "
        "before the question (default: %(default)s)",
    )
    n.add_argument("--samples", type=int, default=8, help="probes per (length, depth) cell")
    n.add_argument("--kind", choices=("passkey", "niah"), default="passkey")
    n.add_argument("--batch", type=int, default=4, help="probes per forward pass")
    n.add_argument(
        "--digits",
        type=int,
        default=None,
        help="answer digits per probe (default: the run's data.passkey_digits, else 5)",
    )
    n.add_argument(
        "--alphabet",
        type=int,
        default=None,
        help="digits drawn from 0..N-1 (default: the run's data.passkey_alphabet, else 10)",
    )
    n.add_argument(
        "--out",
        default=None,
        help="output directory, created if missing (default: RUN_DIR/eval/niah-step_XXXXXXXX, "
        "beside the checkpoint)",
    )
    args = ap.parse_args(argv)
    try:
        run_niah(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=__import__("sys").stderr)
        return 2
    return 0
