"""The training loop: one function per worker, the same under Ray Train, torchrun and alone.

batch -> forward -> loss -> backward (accumulated to train.batch_tokens) -> step -> metrics ->
checkpoint. Everything distributed sits behind `system.strategies`; everything about where the
samples come from behind `data.build_loader`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import data
import models
from system import faults
from system.checkpoint import Checkpointer
from system.config import JobConfig, from_dict
from system.dist import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    gather_lists,
    init_distributed,
    seed_all,
)
from system.metrics import MetricsWriter, console_line, memory_gb, peak_flops, plot_loss
from system.strategies import build_strategy


@dataclass
class TrainState:
    """What the loop itself carries between steps (checkpointed beside model and optimizer)."""

    step: int = 0
    tokens: int = 0


def accum_steps(cfg: JobConfig, world: int) -> int:
    """Micro-steps per optimizer step so one step sees exactly train.batch_tokens tokens."""
    t = cfg.train
    per_micro = t.seq_len * t.micro_batch * world
    if t.batch_tokens % per_micro:
        raise ValueError(
            f"train.batch_tokens={t.batch_tokens} is not a multiple of seq_len*micro_batch*workers"
            f" = {t.seq_len}*{t.micro_batch}*{world} = {per_micro}"
        )
    return t.batch_tokens // per_micro


def lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy (over `loss_mask` positions when the batch has one)."""
    targets = batch["tokens"][:, 1:]
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    mask = batch.get("loss_mask")
    if mask is None:
        return ce.mean()
    m = mask.flatten().float()
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def forward_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], fused: bool
) -> torch.Tensor:
    """The batch's training loss; `fused` models compute it inside forward in chunks."""
    inputs = batch["tokens"][:, :-1]
    if fused:
        out = model(inputs, targets=batch["tokens"][:, 1:], loss_mask=batch.get("loss_mask"))
        loss = out.loss
    else:
        out = model(inputs)
        loss = lm_loss(out.logits, batch)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + out.aux_loss
    return loss


def fused_loss(model: torch.nn.Module) -> bool:
    """Whether the model takes `targets=` and returns `out.loss` (chunked loss configured)."""
    return bool(getattr(getattr(model, "cfg", None), "loss_chunk", 0))


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


PASSKEY_SOURCES = ("passkey", "niah")


def passkey_hits(logits: torch.Tensor, tokens: torch.Tensor, digits: int) -> tuple[int, int, int]:
    """(keys whose every digit is predicted, digits predicted, keys) of a probe batch.

    The answer is the last `digits` tokens; the model reads the probe up to each answer digit
    (teacher-forced, greedy), as `mnemo eval niah` scores it.
    """
    n = tokens.shape[1]
    pred = logits[:, n - digits - 1 : n - 1].argmax(-1)
    right = pred == tokens[:, n - digits :]
    return int(right.all(-1).sum()), int(right.sum()), int(tokens.shape[0])


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: JobConfig, env: DistEnv, strategy) -> dict[str, float]:
    """Held-out loss over eval.batches micro-batches per rank, the same batches each time, and
    on passkey / NIAH sources the held-out retrieval accuracy (key and digit) over them.

    Why the accuracy: the loss falls on the predictable filler long before the model retrieves
    anything, so a falling loss alone does not show memory. Fused-loss models (loss_chunk > 0,
    built for lengths whose full logits would not fit) report the loss only.
    """
    loader = data.build_loader(
        cfg.data,
        seq_len=cfg.train.seq_len,
        batch_size=cfg.train.micro_batch,
        rank=env.rank,
        world=env.world,
        seed=cfg.train.seed,
        split="eval",
    )
    fused = fused_loss(model)
    probe = cfg.data.source in PASSKEY_SOURCES and not fused
    was_training = model.training
    model.eval()
    losses = []
    keys = digits = count = 0
    it = iter(loader)
    for _ in range(cfg.eval.batches):
        batch = _to(next(it), env.device)
        with strategy.autocast():
            if probe:
                logits = strategy.model(batch["tokens"][:, :-1]).logits
                losses.append(float(lm_loss(logits, batch)))
                k, d, c = passkey_hits(logits, batch["tokens"], cfg.data.passkey_digits)
                keys, digits, count = keys + k, digits + d, count + c
            else:
                losses.append(float(forward_loss(strategy.model, batch, fused)))
    model.train(was_training)
    out = {"eval_loss": all_reduce_mean([sum(losses) / len(losses)], env.world, env.device)[0]}
    if probe:
        keys, digits, count = all_reduce_sum([keys, digits, count], env.world, env.device)
        n_dig = cfg.data.passkey_digits
        out["eval_passkey_acc"] = keys / count
        out["eval_digit_acc"] = digits / (count * n_dig)
        out["eval_probes"] = int(count)
    return out


def passkey_chance(cfg: JobConfig) -> dict[str, float]:
    """What guessing scores on this run's probes: 1/alphabet per digit, its power per key."""
    a, k = cfg.data.passkey_alphabet, cfg.data.passkey_digits
    return {"digit": 1.0 / a, "key": float(a) ** -k}


def eval_line(m: dict[str, Any], total_steps: int, cfg: JobConfig) -> str:
    """The console line of one in-training eval (held-out probes), chance printed beside it."""
    line = f"eval {m['step']:>6}/{total_steps} | eval loss {m['eval_loss']:.4f}"
    if "eval_passkey_acc" in m:
        ch = passkey_chance(cfg)
        n = m["eval_probes"]
        hits = round(m["eval_passkey_acc"] * n)
        line += (
            f" | passkey {100 * m['eval_passkey_acc']:.1f}% ({hits}/{n} held-out keys, chance "
            f"{100 * ch['key']:.2g}%) | digits {100 * m['eval_digit_acc']:.1f}% "
            f"(chance {100 * ch['digit']:.0f}%)"
        )
    return line


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Train one run described by a JobConfig dict; returns the summary (on every rank)."""
    cfg = from_dict(config)
    env = init_distributed(cfg.scaling.use_gpu)
    run_dir = Path(cfg.run_dir)
    is_main = env.rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
    if env.device.type == "cpu":
        n = int(cfg.scaling.cpus_per_worker) or 1
        torch.set_num_threads(max(1, n))

    # Same init on every rank (FSDP2 does not broadcast), then per-rank RNG streams.
    seed_all(cfg.train.seed)
    with torch.device(env.device):
        model = models.build(cfg.model.name, **cfg.model.args)
    spec = models.get_spec(cfg.model.name)
    model.block_attr = spec.block_attr
    seed_all(cfg.train.seed * 1000 + env.rank)

    accum = accum_steps(cfg, env.world)
    loader = data.build_loader(
        cfg.data,
        seq_len=cfg.train.seq_len,
        batch_size=cfg.train.micro_batch,
        rank=env.rank,
        world=env.world,
        seed=cfg.train.seed,
    )
    strategy = build_strategy(cfg, model, env.device, env.world, accum)
    ckpt = Checkpointer(cfg, env, run_dir)
    state = TrainState()
    restored = ckpt.restore(strategy, loader)
    if restored is not None:
        state = TrainState(**restored)
    writer = MetricsWriter(
        run_dir, enabled=is_main, log=cfg.log, config=cfg.to_dict(), start_step=state.step
    )

    n_params = sum(p.numel() for p in model.parameters())
    fpt = (
        model.flops_per_token(cfg.train.seq_len)
        if hasattr(model, "flops_per_token")
        else 6.0 * n_params
    )
    peak = peak_flops(env.device)
    if is_main:
        print(
            f"[mnemo] {cfg.recipe}/{cfg.preset}: {cfg.model.name} {n_params / 1e6:.2f}M params | "
            f"{cfg.scaling.strategy} x{env.world} ({env.launcher}, {env.device.type}) | "
            f"accum {accum} | start step {state.step} | run dir {run_dir}",
            flush=True,
        )

    fused = fused_loss(model)
    model.train()
    t_start = time.perf_counter()
    t_last, tok_last, step_last = t_start, state.tokens, state.step
    loss_sum, loss_n = 0.0, 0
    last: dict[str, Any] = {}
    skipped_seen, named_seen = 0, 0  # skips already in metrics.jsonl: count, named examples
    it = iter(loader)
    tokens_per_step = cfg.train.batch_tokens
    while state.step < cfg.train.steps:
        faults.maybe_fail(state.step + 1, env.rank, run_dir)
        grad_norm = None
        for micro in range(accum):
            batch = _to(next(it), env.device)
            is_last = micro == accum - 1
            with strategy.accumulate(is_last), strategy.autocast():
                loss = forward_loss(strategy.model, batch, fused)
            grad_norm = strategy.micro_step(loss, is_last)
            loss_sum += float(loss.detach())
            loss_n += 1
        state.step += 1
        state.tokens += tokens_per_step
        step = state.step

        log_now = step % cfg.log.every == 0 or step == cfg.train.steps
        eval_now = cfg.eval.every > 0 and (step % cfg.eval.every == 0 or step == cfg.train.steps)
        if log_now or eval_now:
            now = time.perf_counter()
            mean_loss, gnorm = all_reduce_mean(
                [loss_sum / max(loss_n, 1), grad_norm or 0.0], env.world, env.device
            )
            skipped = int(all_reduce_sum([loader.info.skipped_samples], env.world, env.device)[0])
            dt = max(now - t_last, 1e-9)
            tps = (state.tokens - tok_last) / dt
            steps_done = step - step_last
            m: dict[str, Any] = {
                "step": step,
                "loss": mean_loss,
                "lr": strategy.lr(),
                "tokens": state.tokens,
                "tokens_per_s": tps,
                "mfu": (fpt * tps / (peak * env.world)) if peak else None,
                "mem_gb": memory_gb(env.device),
                "world_size": env.world,
                "skipped_samples": skipped,
                "grad_norm": gnorm,
                "step_time_s": dt / max(steps_done, 1),
                "eta_s": (cfg.train.steps - step) * dt / max(steps_done, 1),
            }
            if skipped > skipped_seen:  # the same on every rank (summed): all join the gather
                new = loader.info.skipped_examples[named_seen:]
                named_seen += len(new)
                named = gather_lists([{"rank": env.rank, **x} for x in new], env.world)
                if named:  # past the loaders' first 10 names the count alone grows
                    m["skipped_examples"] = named
                skipped_seen = skipped
            if eval_now:
                m.update(evaluate(model, cfg, env, strategy))
            writer.write(m)
            if is_main:
                print(console_line(m, cfg.train.steps), flush=True)
                if eval_now:
                    print(eval_line(m, cfg.train.steps, cfg), flush=True)
            last = m
            loss_sum, loss_n = 0.0, 0
            t_last, tok_last, step_last = time.perf_counter(), state.tokens, step

        if ckpt.due(step):
            ckpt.save(
                step, strategy, loader, {"step": state.step, "tokens": state.tokens}, metrics=last
            )

    ckpt.finalize()
    wall = time.perf_counter() - t_start
    summary = {
        "recipe": cfg.recipe,
        "preset": cfg.preset,
        "model": cfg.model.name,
        "final_step": state.step,
        "final_loss": last.get("loss"),
        "final_eval_loss": last.get("eval_loss"),
        "final_passkey_acc": last.get("eval_passkey_acc"),
        "final_digit_acc": last.get("eval_digit_acc"),
        "eval_probes": last.get("eval_probes"),
        "tokens": state.tokens,
        "wall_time_s": wall,
        "world_size": env.world,
        "strategy": cfg.scaling.strategy,
        "checkpoint": str(ckpt.latest()) if ckpt.latest() else None,
    }
    if "eval_passkey_acc" in last:
        chance = passkey_chance(cfg)
        summary["passkey_chance"] = chance["key"]
        summary["digit_chance"] = chance["digit"]
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if writer.history:
            plot_loss(writer.history, run_dir / "loss.png", f"{cfg.recipe} ({cfg.model.name})")
    writer.close()
    barrier(env.world)
    return summary


def main() -> None:
    """`torchrun --nproc-per-node 2 -m system.trainer RUN_DIR/config.json`."""
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m system.trainer CONFIG.json  (under torchrun/accelerate)")
    cfg = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("MNEMO_LAUNCHER", "torchrun")
    train_loop(cfg)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
