"""Checkpointer in one process (no process group): round trip, commit protocol, keep-N, async
commit, damaged or unsafe files named in the error, `mnemo ckpt inspect|export`.

The multi-process behaviour (DDP / FSDP / DeepSpeed, crashes, resharding, Ray) is in
tests/distributed/test_checkpoint_resume.py, test_reshard.py and test_fault_tolerance.py.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import models
from system import checkpoint as C
from system import ckpt_tools, faults
from system.ckpt_files import checksum
from system.dist import DistEnv, seed_all
from system.strategies import build_strategy
from system.trainer import forward_loss, fused_loss
from tests._runs import tiny_config

ENV = DistEnv(rank=0, world=1, local_rank=0, device=torch.device("cpu"), launcher="single")


class Job:
    """One rank's model, loader, strategy and checkpointer, built like train_loop builds them."""

    def __init__(self, run: Path, **overrides) -> None:
        base = {"scaling.workers": 1, "train.steps": 8, "resume": "auto", "checkpoint.keep": 3}
        self.cfg = tiny_config(run, **{**base, **overrides})
        seed_all(self.cfg.train.seed)
        model = models.build(self.cfg.model.name, **self.cfg.model.args)
        model.block_attr = "layers"
        seed_all(self.cfg.train.seed * 1000)
        t = self.cfg.train
        self.loader = data.build_loader(
            self.cfg.data, seq_len=t.seq_len, batch_size=t.micro_batch, rank=0, world=1, seed=t.seed
        )
        self.accum = t.batch_tokens // (t.seq_len * t.micro_batch)
        self.strategy = build_strategy(self.cfg, model, ENV.device, 1, self.accum)
        self.ckpt = C.Checkpointer(self.cfg, ENV, run)
        self.step = 0
        restored = self.ckpt.restore(self.strategy, self.loader)
        if restored:
            self.step = restored["step"]
        self.it = iter(self.loader)

    def train(self, n: int) -> list[float]:
        losses = []
        for _ in range(n):
            for micro in range(self.accum):
                batch = next(self.it)
                loss = forward_loss(self.strategy.model, batch, fused_loss(self.strategy.module))
                self.strategy.micro_step(loss, micro == self.accum - 1)
            self.step += 1
            losses.append(float(loss.detach()))
        return losses

    def save(self) -> Path:
        tokens = self.step * self.cfg.train.batch_tokens
        return self.ckpt.save(
            self.step, self.strategy, self.loader, {"step": self.step, "tokens": tokens}
        )

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.strategy.module.state_dict().items()}


def _rewrite_manifest_entry(d: Path, rel: str) -> None:
    """What an attacker who can write the directory would do: make the manifest agree."""
    m = json.loads((d / C.MANIFEST).read_text())
    p = d / rel
    m["files"][rel] = {"size": p.stat().st_size, "crc32": checksum(p)}
    (d / C.MANIFEST).write_text(json.dumps(m))


def test_resume_continues_bit_identically(tmp_path):
    ref = Job(tmp_path / "ref")
    ref.train(2)
    ref.save()
    random.random(), np.random.rand(), torch.rand(1)  # advance the RNGs past the saved state
    expected = ref.train(3)
    job = Job(tmp_path / "ref")  # resume=auto picks step 2
    assert job.step == 2 and job.loader.state_dict() == {"next_index": 2 * 8}
    assert job.train(3) == expected
    for k, v in ref.weights().items():
        assert torch.equal(v, job.weights()[k]), k
    meta = json.loads((C.step_dir(tmp_path / "ref", 2) / C.TRAINER_STATE).read_text())
    assert meta["train_state"] == {"step": 2, "tokens": 2 * 1024}
    assert meta["scheduler"]["last_epoch"] == 2


def test_rng_state_round_trip(tmp_path):
    seed_all(5)
    st = C.rng_state()
    torch.save(st, tmp_path / "rng.pt")
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    C.set_rng_state(C.load_pt(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def test_interrupted_saves_are_ignored_and_cleaned(tmp_path):
    job = Job(tmp_path)
    job.train(1)
    good = job.save()
    # Leftovers of saves killed at each stage: shards only, rank manifests, MANIFEST, a tmp
    # COMMITTED: none carries COMMITTED, so none is resumable.
    stages = [
        ("dcp",),
        ("dcp", "manifest_rank0.json"),
        ("dcp", C.MANIFEST),
        (C.COMMITTED + ".tmp",),
    ]
    for i, names in enumerate(stages, start=2):
        d = C.step_dir(tmp_path, i)
        shutil.copytree(good, d)
        os.remove(d / C.COMMITTED)
        for name in set(os.listdir(d)) - set(names):
            p = d / name
            shutil.rmtree(p) if p.is_dir() else os.remove(p)
        (d / (C.COMMITTED + ".tmp")).write_text(f"{i}\n")
    assert C.committed_checkpoints(tmp_path) == [good]
    again = Job(tmp_path)
    assert again.step == 1
    again.train(5)  # step 6: the leftovers 2..5 are older than the new save and go
    again.save()
    assert [d.name for d in C.all_checkpoints(tmp_path)] == ["step_00000001", "step_00000006"]


def test_keep_newest_and_uncommit_before_delete(tmp_path):
    job = Job(tmp_path, **{"checkpoint.keep": 2})
    for _ in range(3):
        job.train(1)
        job.save()
    assert [d.name for d in C.committed_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    job.ckpt.finalize()  # the files of pruned checkpoints are deleted in the background
    assert not C.step_dir(tmp_path, 1).exists()


def test_prune_unreported_keeps_keep_counting_what_ray_never_knew(tmp_path):
    """Ray's snapshot lists steps 3 and 5 and keep=3: one of the orphans 1, 2, 4 may stay, the
    newest (4); 1 and 2 go; the uncommitted leftover stays; keep=10: nothing; no snapshot: no-op."""
    job = Job(tmp_path, **{"checkpoint.keep": 10})
    for _ in range(5):
        job.train(1)
        job.save()
    job.ckpt.finalize()
    leftover = C.step_dir(tmp_path, 0)
    leftover.mkdir()
    assert C.prune_unreported(tmp_path, keep=3) == []  # no snapshot: not a Ray run
    names = [C.step_dir(tmp_path, s).name for s in (3, 5)]
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n} for n in names]}
    (tmp_path / "checkpoints" / C.RAY_SNAPSHOT).write_text(json.dumps(snapshot))
    assert C.prune_unreported(tmp_path, keep=10) == []
    removed = C.prune_unreported(tmp_path, keep=3)
    assert [d.name for d in removed] == ["step_00000001", "step_00000002"]
    assert [d.name for d in C.all_checkpoints(tmp_path)] == [
        "step_00000000",
        "step_00000003",
        "step_00000004",
        "step_00000005",
    ]


def test_resume_never_moves_old_checkpoints_aside(tmp_path):
    job = Job(tmp_path)
    job.train(1)
    job.save()
    fresh = Job(tmp_path, resume="never")
    assert fresh.step == 0 and C.committed_checkpoints(tmp_path) == []
    moved = list(tmp_path.glob("checkpoints.superseded-*/step_00000001/COMMITTED"))
    assert len(moved) == 1


def test_resume_path_starts_there_unless_the_run_dir_is_further(tmp_path):
    src = Job(tmp_path / "src")
    src.train(1)
    one = src.save()
    shutil.copytree(one, tmp_path / "elsewhere")  # any name: the step comes from its state
    assert Job(tmp_path / "new", resume=str(tmp_path / "elsewhere")).step == 1
    src.train(1)
    src.save()
    # After a crash a restart must continue the run's own newer checkpoint, not PATH again.
    assert Job(tmp_path / "src", resume=str(one)).step == 2
    # ... also once PATH, one of the run's own, has been pruned (keep) since: no diagnosis of it.
    shutil.rmtree(one)
    assert Job(tmp_path / "src", resume=str(one)).step == 2


def test_async_save_commits_at_next_save_or_finalize(tmp_path):
    job = Job(tmp_path, **{"checkpoint.async_save": True})
    job.train(1)
    first = job.save()
    assert not (first / C.COMMITTED).exists(), "committed before the write was known finished"
    job.train(1)
    second = job.save()
    assert (first / C.COMMITTED).exists() and not (second / C.COMMITTED).exists()
    expected = job.train(2)
    job.ckpt.finalize()
    assert (second / C.COMMITTED).exists()
    C.verify(second)
    again = Job(tmp_path)
    assert again.step == 2 and again.train(2) == expected


def test_truncated_file_is_named(tmp_path):
    job = Job(tmp_path)
    job.train(1)
    d = job.save()
    shard = d / "dcp" / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(C.CheckpointError, match=rf"{shard}.*truncated"):
        Job(tmp_path)
    assert ckpt_tools.main(["inspect", str(d), "--verify"]) == 1


def test_modified_bytes_are_named(tmp_path):
    job = Job(tmp_path)
    job.train(1)
    d = job.save()
    shard = d / "dcp" / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(C.CheckpointError, match=rf"{shard}.*modified"):
        Job(tmp_path)


class _Payload:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/mnemo-pwned-by-checkpoint",))


def test_pickled_code_is_refused_even_with_a_matching_manifest(tmp_path):
    job = Job(tmp_path)
    job.train(1)
    d = job.save()
    rng = d / "rng_rank0.pt"
    torch.save({"python": _Payload()}, rng)
    _rewrite_manifest_entry(d, "rng_rank0.pt")
    with pytest.raises(C.CheckpointError, match=rf"{rng}.*not loadable safely"):
        Job(tmp_path)
    meta = d / "dcp" / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload()))
    _rewrite_manifest_entry(d, "dcp/.metadata")
    with pytest.raises(C.CheckpointError, match=rf"{meta}.*not allowed"):
        Job(tmp_path)
    assert not Path("/tmp/mnemo-pwned-by-checkpoint").exists()


def test_bad_json_and_missing_manifest_are_named(tmp_path):
    job = Job(tmp_path)
    job.train(1)
    d = job.save()
    (d / C.TRAINER_STATE).write_text("{not json")
    _rewrite_manifest_entry(d, C.TRAINER_STATE)
    with pytest.raises(C.CheckpointError, match=rf"{d / C.TRAINER_STATE}.*not valid JSON"):
        Job(tmp_path)
    os.remove(d / C.MANIFEST)
    with pytest.raises(C.CheckpointError, match=rf"{d / C.MANIFEST} is missing"):
        Job(tmp_path)


def test_inspect_and_export(tmp_path, capsys):
    job = Job(tmp_path)
    job.train(2)
    d = job.save()
    assert ckpt_tools.main(["inspect", str(tmp_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "step        2 " in out and "committed   yes" in out and "world size 1" in out
    assert "manifest ok" in out and "head.weight" in out and "[258, 64]" in out
    info = ckpt_tools.describe(d)
    assert info["strategy"] == "ddp" and info["tensors"]["embed.weight"] == ([258, 64], "float32")

    out_file = tmp_path / "model.safetensors"
    assert ckpt_tools.main(["export", str(d), "--out", str(out_file)]) == 0
    from safetensors.torch import load_file

    model = models.build("transformer-tiny")
    assert model.head.weight is model.embed.weight  # tied: both keys exported, both load
    model.load_state_dict(load_file(out_file))
    for k, v in job.weights().items():
        assert torch.equal(model.state_dict()[k], v), k

    os.remove(d / C.COMMITTED)
    assert ckpt_tools.main(["inspect", str(d)]) == 1  # an interrupted save is not resumable
    assert "committed   NO" in capsys.readouterr().out
    assert ckpt_tools.main(["export", str(d), "--out", str(out_file)]) == 2
    assert "no COMMITTED" in capsys.readouterr().err


def test_fault_env_is_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("MNEMO_FAULT_AT_STEP", "3")
    monkeypatch.setenv("MNEMO_FAULT_POINT", "commit")
    with pytest.raises(ValueError, match="MNEMO_FAULT_POINT='commit'"):
        faults.maybe_fail(3, 0, tmp_path)
    monkeypatch.setenv("MNEMO_FAULT_POINT", "save")
    faults.maybe_fail(3, 0, tmp_path, point="step")  # another point: no kill
    monkeypatch.setenv("MNEMO_FAULT_AT_STEP", "x")
    with pytest.raises(ValueError, match="MNEMO_FAULT_AT_STEP='x'"):
        faults.maybe_fail(3, 0, tmp_path)


# -- `mnemo ckpt inspect` and `--resume PATH`: one diagnosis, size checks always -------------
def _saved(run: Path) -> Path:
    """A real committed checkpoint (step 1) of a 1-rank job."""
    job = Job(run)
    job.train(1)
    d = job.save()
    job.ckpt.finalize()
    return d


def _inspect(capsys, *args: str) -> tuple[int, str]:
    rc = ckpt_tools.main(["inspect", *map(str, args)])
    return rc, capsys.readouterr().out


def test_inspect_checks_sizes_without_verify(tmp_path, capsys):
    d = _saved(tmp_path)
    rc, out = _inspect(capsys, d)
    assert rc == 0 and "resumable   yes" in out and "sizes match" in out
    shard = d / "dcp" / "__0_0.distcp"
    full = shard.stat().st_size
    original = shard.read_bytes()
    with open(shard, "r+b") as f:
        f.truncate(full // 2)
    rc, out = _inspect(capsys, d)
    assert rc == 1 and "resumable   NO (damaged)" in out
    assert f"{shard} is truncated or resized: {full // 2} bytes, {full} expected" in out
    os.remove(shard)
    rc, out = _inspect(capsys, d)
    assert rc == 1 and f"{shard} is missing: {full} bytes expected" in out
    rc, out = _inspect(capsys, d, "--json")
    info = json.loads(out)
    assert rc == 1 and info["resumable"] is False and info["kind"] == "damaged"
    assert any(str(shard) in x for x in info["problems"])
    shard.write_bytes(original)
    assert _inspect(capsys, d)[0] == 0


def _garbage(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "blob.bin").write_bytes(os.urandom(1000))
    (root / "sub").mkdir()
    (root / "sub" / "x.pt").write_bytes(b"\x00" * 10)
    return root


def test_inspect_exit_code_and_diagnosis_per_case(tmp_path, capsys):
    """0 only for a resumable checkpoint; 1 with the reason otherwise; garbage is 'not a
    checkpoint', a save without COMMITTED is an 'interrupted save'."""
    good = _saved(tmp_path / "run")
    assert _inspect(capsys, tmp_path / "run")[0] == 0  # a run dir: its newest committed
    assert _inspect(capsys, tmp_path / "run" / "checkpoints")[0] == 0  # its checkpoints dir

    cases: dict[str, tuple[Path, list[str]]] = {}
    d = shutil.copytree(good, tmp_path / "interrupted" / "checkpoints" / good.name)
    os.remove(d / C.COMMITTED)
    cases["interrupted"] = (d, ["interrupted save", f"no {C.COMMITTED} file"])
    d = shutil.copytree(good, tmp_path / "bad-manifest" / good.name)
    (d / C.MANIFEST).write_text("[1, 2]")
    cases["bad manifest"] = (d, [f"{d / C.MANIFEST} is not a valid manifest", "expected"])
    d = shutil.copytree(good, tmp_path / "bad-json" / good.name)
    (d / C.MANIFEST).write_text("{not json")
    cases["manifest not JSON"] = (d, [f"{d / C.MANIFEST} is not valid JSON"])
    d = shutil.copytree(good, tmp_path / "no-manifest" / good.name)
    os.remove(d / C.MANIFEST)
    cases["no manifest"] = (d, [f"{d / C.MANIFEST} is missing"])
    # Our shard files but no COMMITTED and any name: a save being written, not garbage.
    d = tmp_path / "shards-only"
    shutil.copytree(good / "dcp", d / "dcp")
    cases["shards only"] = (d, ["interrupted save"])
    g = _garbage(tmp_path / "garbage")
    cases["garbage"] = (g, [f"{g} is not a checkpoint (found: blob.bin, notes.txt, sub)"])
    e = tmp_path / "empty"
    e.mkdir()
    cases["empty"] = (e, [f"{e} is not a checkpoint (it is empty)"])
    m = tmp_path / "nowhere"
    cases["missing"] = (m, [f"{m} does not exist"])
    r = tmp_path / "run-uncommitted"
    shutil.copytree(tmp_path / "interrupted", r)
    cases["run dir, none committed"] = (r, ["holds no committed checkpoint", good.name])

    for name, (path, expect) in cases.items():
        rc, out = _inspect(capsys, path)
        assert rc == 1, (name, out)
        assert "resumable   NO" in out, (name, out)
        for text in expect:
            assert text in out, (name, text, out)
        if name in ("garbage", "empty", "missing"):
            assert "interrupted" not in out, (name, out)
        if name in ("garbage", "empty"):
            assert "expected a checkpoint dir (RUN_DIR/checkpoints/step_XXXXXXXX" in out
            assert "or a run dir (or its checkpoints/ dir) holding one" in out


def test_mnemo_ckpt_inspect_command(tmp_path):
    """As a user runs it: exit status 1 and the file named for a missing shard (no --verify);
    --help documents the exit codes."""
    from tests._runs import ROOT, env_for_subprocess

    d = _saved(tmp_path)
    shard = d / "dcp" / "__0_0.distcp"
    os.remove(shard)
    cmd = [sys.executable, "-m", "system.cli", "ckpt", "inspect"]
    run = {"cwd": ROOT, "env": env_for_subprocess(), "capture_output": True, "text": True}
    proc = subprocess.run([*cmd, str(d)], timeout=120, **run)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"problem     checkpoint file {shard} is missing" in proc.stdout
    helped = subprocess.run([*cmd, "--help"], timeout=120, **run)
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    assert "exit status: 0 = a committed checkpoint a run can resume from; 1 = cannot" in text
    assert "2 = bad command line" in text


def _resume_flag(capsys, value: str) -> tuple[int, str, str]:
    """The recipe's command line up to --print-config: no Ray is started."""
    import launch.transformer_lm  # noqa: F401  (registers the recipe)
    from system.cli import recipe_main

    rc = recipe_main("transformer_lm", ["--resume", value, "--print-config"])
    got = capsys.readouterr()
    resume = json.loads(got.out)["resume"] if rc == 0 else ""
    return rc, resume, got.err


def test_resume_flag_is_made_absolute_and_checked_before_ray(tmp_path, capsys, monkeypatch):
    good = _saved(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert _resume_flag(capsys, "auto")[:2] == (0, "auto")
    assert _resume_flag(capsys, "never")[:2] == (0, "never")
    # A relative path reaches the workers absolute; a run dir, as its newest committed one.
    assert _resume_flag(capsys, f"run/checkpoints/{good.name}")[:2] == (0, str(good.resolve()))
    assert _resume_flag(capsys, "run")[:2] == (0, str(good.resolve()))

    rc, _, err = _resume_flag(capsys, "sometimes")
    assert rc == 2
    assert f"--resume sometimes: {tmp_path.resolve() / 'sometimes'} does not exist" in err
    assert "--resume takes auto, never, or the path of a committed checkpoint" in err
    # Garbage and a damaged checkpoint: the message `mnemo ckpt inspect` prints.
    _garbage(tmp_path / "junk")
    rc, _, err = _resume_flag(capsys, "junk")
    assert rc == 2 and "is not a checkpoint (found: blob.bin, notes.txt, sub)" in err
    from system.ckpt_files import diagnose

    assert diagnose(tmp_path / "junk").message() in err
    shard = good / "dcp" / "__0_0.distcp"
    full = shard.stat().st_size
    os.remove(shard)
    rc, _, err = _resume_flag(capsys, str(good))
    assert rc == 2 and f"{shard} is missing: {full} bytes expected" in err


def test_resume_path_outside_cli_gets_the_same_diagnosis(tmp_path):
    """torchrun's config.json carries --resume unchecked: the Checkpointer applies it."""
    junk = _garbage(tmp_path / "junk")
    with pytest.raises(C.CheckpointError, match=r"--resume .*junk: .* is not a checkpoint"):
        Job(tmp_path / "new", resume=str(junk))
