"""Config: presets, --set coercion, errors that name the key, value and what is allowed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from system import config as C
from system.cli import recipe_main, recipe_parser, resolve
from tests._runs import ROOT


def test_override_coerces_types():
    cfg = C.apply_overrides(
        C.JobConfig(),
        [
            "optim.lr=1e-3",
            "train.steps=7",
            "scaling.activation_checkpointing=true",
            "model.args.dim=32",
            "model.args.window=null",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.scaling.activation_checkpointing is True
    assert cfg.model.args == {"dim": 32, "window": None}


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ValueError, match=r"unknown config key 'optim.lrr'.*allowed here: lr"):
        C.apply_overrides(C.JobConfig(), ["optim.lrr=1"])
    with pytest.raises(ValueError, match=r"unknown config key 'nope.x'"):
        C.apply_overrides(C.JobConfig(), ["nope.x=1"])


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("train.steps=ten", r"train.steps='ten': expected a value of type int"),
        ("scaling.strategy=horovod", r"scaling.strategy='horovod' is not allowed; expected one of"),
        ("scaling.zero_stage=4", r"zero_stage=4 is not allowed"),
        ("optim.lr=-1", r"optim.lr=-1.0 is not allowed; expected a number > 0"),
        ("data.on_error=ignore", r"data.on_error='ignore'"),
        ("train.batch_tokens=1000", r"batch_tokens=1000 is not a multiple of train.seq_len"),
        ("scaling.activation_checkpointing=maybe", r"expected a value of type bool"),
        ("train=1", r"names a section"),
        ("optim.lr", r"expected KEY=VALUE"),
    ],
)
def test_bad_values_are_named(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        C.apply_overrides(C.JobConfig(), [override])


def test_roundtrip_through_json(tmp_path):
    cfg = C.apply_overrides(C.smoke_base(), ["model.args.dim=48", "scaling.strategy=fsdp"])
    cfg.save(tmp_path / "config.json")
    back = C.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert back == cfg
    bad = cfg.to_dict()
    bad["train"]["stepz"] = 3
    with pytest.raises(ValueError, match=r"train.stepz"):
        C.from_dict(bad)


def test_presets_build_on_base():
    import launch.transformer_lm  # noqa: F401  (registers its presets)

    assert {"smoke", "full"} <= set(C.presets("transformer_lm"))
    smoke = C.load("transformer_lm", "smoke")
    assert smoke.scaling.workers == 2 and smoke.recipe == "transformer_lm"
    with pytest.raises(ValueError, match=r"no preset 'huge'; known: \['full', 'smoke'\]"):
        C.load("transformer_lm", "huge")


def test_cli_flags_resolve(tmp_path, capsys):
    import launch.transformer_lm  # noqa: F401

    rc = recipe_main(
        "transformer_lm",
        [
            "--preset",
            "smoke",
            "--workers",
            "4",
            "--set",
            "train.micro_batch=4",
            "--strategy",
            "deepspeed",
            "--zero",
            "3",
            "--set",
            "optim.lr=0.01",
            "--run-dir",
            str(tmp_path / "r"),
            "--resume",
            "never",
            "--address",
            "local",
            "--print-config",
        ],
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scaling"] == {
        **out["scaling"],
        "workers": 4,
        "strategy": "deepspeed",
        "zero_stage": 3,
    }
    assert out["optim"]["lr"] == 0.01 and out["resume"] == "never" and out["address"] == "local"
    assert out["run_dir"] == str((tmp_path / "r").resolve())


def test_cli_rejects_unknown_key_with_exit_2():
    proc = subprocess.run(
        [sys.executable, "launch/transformer_lm.py", "--set", "train.stepps=3", "--print-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.stepps'" in proc.stderr


def test_overrides_validate_after_all_are_applied():
    cfg = C.apply_overrides(C.JobConfig(), ["data.source=shards", "data.path=/tmp/x"])
    assert (cfg.data.source, cfg.data.path) == ("shards", "/tmp/x")
    with pytest.raises(ValueError, match="data.path is empty; data.source='shards' needs a path"):
        C.apply_overrides(C.JobConfig(), ["data.source=shards"])


# -------------------------------------------------------------------------------------------
# Checks made at load time (before Ray starts), so `--print-config` refuses these too.


def _print_config(capsys, *flags: str) -> tuple[int, str]:
    import launch.transformer_lm  # noqa: F401  (registers its presets)

    rc = recipe_main("transformer_lm", ["--print-config", "--run-dir", "/tmp/unused", *flags])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,pattern",
    [
        (
            ["--set", "model.name=titans-mac-tni"],
            r"model.name='titans-mac-tni' is not a registered model; did you mean "
            r"'titans-mac-tiny'",
        ),
        (
            ["--set", "model.name=gpt5"],
            r"model.name='gpt5' is not a registered model; expected one of: aaren-small, .*"
            r"transformer-tiny",
        ),
        (["--set", "model.args.dimm=3"], r"model 'transformer-tiny' has no config field.*dimm"),
        (["--set", "model.args.dim=wide"], r"model.args.dim='wide': expected a value of type int"),
        (["--set", "model.args.dim=30"], r"dim=30 is not divisible by n_heads=4"),
        (
            ["--workers", "3"],
            r"train.batch_tokens=2048 is not a multiple of .* 128 \* 8 \* 3 = 3072; .*"
            r"must be one of \[1, 2\]",
        ),
        (["--zero", "3"], r"--zero 3 applies to DeepSpeed only, but scaling.strategy='ddp'"),
        (
            ["--set", "train.seq_len=32", "--set", "train.batch_tokens=512"],
            r"train.seq_len=32 is too short for data.source='passkey' probes.*>= 87",
        ),
        (
            ["--set", "model.args.vocab_size=100"],
            r"token ids go up to 257 but model.name='transformer-tiny' has vocab_size=100",
        ),
        (["--set", "data.source=shards"], r"data.path is empty; data.source='shards'"),
        (
            ["--set", "data.source=shards", "--set", "data.path=/nonexistent/ds"],
            r"data.path='/nonexistent/ds': /nonexistent/ds/index.json does not exist",
        ),
        (
            ["--set", "data.source=shards", "--set", "data.path=/nonexistent/s-{0..3}.tar"],
            r"4 of 4 shard file\(s\) do not exist \(first: '/nonexistent/s-0.tar'\)",
        ),
        (
            ["--set", "data.source=text", "--set", "data.path=/nonexistent.txt"],
            r"data.path entry '/nonexistent.txt' does not exist",
        ),
        (
            ["--set", "data.source=text", "--set", f"data.path={ROOT / 'README.md'}"]
            + ["--set", "data.tokenizer=/nonexistent/tokenizer.json"],
            r"data.tokenizer='/nonexistent/tokenizer.json' does not exist",
        ),
        (["--address", "foo"], r"address='foo' is not a Ray address; expected auto \| local"),
        (["--address", "head:99999"], r"address='head:99999' is not a Ray address"),
        (["--address", "http://head:8265"], r"is a Ray dashboard / Jobs API URL"),
        (
            ["--address", "local", "--set", "scaling.use_gpu=true", "--workers", "1"]
            + ["--set", "scaling.gpus_per_worker=64"],
            r"scaling.use_gpu=true asks for 64 GPUs",
        ),
    ],
)
def test_print_config_refuses_what_would_fail_in_the_workers(capsys, flags, pattern):
    rc, err = _print_config(capsys, *flags)
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err


@pytest.mark.parametrize(
    "address", ["auto", "local", "10.0.0.5:6379", "head-0.svc:6379", "ray://head:10001", "[::1]:1"]
)
def test_good_addresses_pass(capsys, address):
    rc, err = _print_config(capsys, "--address", address)
    assert rc == 0, err


def test_remote_address_skips_local_path_checks(capsys):
    """On a remote cluster data.path names the cluster's files, which this machine lacks."""
    flags = ["--set", "data.source=shards", "--set", "data.path=/mnt/cluster/ds"]
    assert _print_config(capsys, "--address", "ray://head:10001", *flags)[0] == 0
    assert _print_config(capsys, *flags)[0] == 2


def test_existing_shard_dir_passes(tmp_path, capsys):
    (tmp_path / "index.json").write_text(json.dumps({"vocab_size": 258}))
    flags = ["--set", "data.source=shards", "--set", f"data.path={tmp_path}"]
    assert _print_config(capsys, *flags)[0] == 0
    (tmp_path / "index.json").write_text(json.dumps({"vocab_size": 50000}))
    rc, err = _print_config(capsys, *flags)
    assert rc == 2 and "token ids go up to 49999" in err, err


def test_torchrun_world_size_is_the_one_checked(capsys, monkeypatch):
    """Under torchrun the loop's world is WORLD_SIZE, not scaling.workers."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc, err = _print_config(capsys, "--launcher", "none")
    assert rc == 2 and "128 * 8 * 3 = 3072" in err, err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _print_config(capsys, "--launcher", "none")[0] == 0


def test_config_json_with_another_world_still_loads():
    """from_dict (workers, torchrun, tools) does not apply the launch-time world check."""
    cfg = C.apply_overrides(C.smoke_base(), ["scaling.workers=3"])
    assert C.from_dict(cfg.to_dict()).scaling.workers == 3
    with pytest.raises(ValueError, match="128 \\* 8 \\* 3"):
        C.check_job(cfg)


def test_relative_data_paths_are_made_absolute(tmp_path, capsys, monkeypatch):
    """Ray workers run in another directory: a data.path typed relative to the shell's cwd
    reaches them absolute (the README's `--set data.path=runs/docs-shards` failed in them)."""
    (tmp_path / "runs" / "shards").mkdir(parents=True)
    (tmp_path / "runs" / "shards" / "index.json").write_text(json.dumps({"vocab_size": 258}))
    monkeypatch.chdir(tmp_path)
    flags = ["--set", "data.source=shards", "--set", "data.path=runs/shards"]
    assert _print_config(capsys, *flags)[0] == 0
    args = recipe_parser("transformer_lm").parse_args(flags)
    assert resolve("transformer_lm", args).data.path == str(tmp_path / "runs" / "shards")
    remote = recipe_parser("transformer_lm").parse_args([*flags, "--address", "ray://head:10001"])
    assert resolve("transformer_lm", remote).data.path == "runs/shards"  # the cluster's path


def test_eval_on_held_out_data_is_checked_at_load(tmp_path, capsys):
    """Eval on text or shards needs held-out data: refused at load, not in the workers."""
    meta = {"vocab_size": 258, "shards": [{"name": "shard-000000.tar"}]}
    (tmp_path / "index.json").write_text(json.dumps(meta))
    flags = ["--set", "data.source=shards", "--set", f"data.path={tmp_path}"]
    rc, err = _print_config(capsys, *flags, "--set", "eval.every=5")
    assert rc == 2 and "eval.every=5 evaluates on held-out shards" in err, err
    rc, err = _print_config(
        capsys, *flags, "--set", "eval.every=5", "--set", "data.eval_fraction=0.5"
    )
    assert rc == 2 and "holds out all 1 shard(s)" in err, err
    assert _print_config(capsys, *flags, "--set", "eval.every=0")[0] == 0


def test_resume_path_on_a_remote_cluster_is_the_clusters(capsys):
    """Like data.path, --resume PATH names the cluster's files on a remote address: not checked
    (nor made absolute) against this machine's disk."""
    path = "/mnt/cluster/run/checkpoints/step_00000010"
    flags = ["--address", "ray://head:10001", "--resume", path]
    assert _print_config(capsys, *flags)[0] == 0
    assert (
        resolve("transformer_lm", recipe_parser("transformer_lm").parse_args(flags)).resume == path
    )
    rc, err = _print_config(capsys, "--resume", path)
    assert rc == 2 and "does not exist" in err, err


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("passkey_digits", "0", r"data.passkey_digits=0; expected >= 1"),
        ("passkey_alphabet", "12", r"data.passkey_alphabet=12; expected 2..10"),
        (
            "filler_loss_weight",
            "-3",
            r"data.filler_loss_weight=-3.0; expected a weight in \[0, 1\]",
        ),
    ],
)
def test_passkey_fields_are_checked(capsys, field, value, pattern):
    rc, err = _print_config(capsys, "--set", f"data.{field}={value}")
    assert rc == 2 and re.search(pattern, err), err
