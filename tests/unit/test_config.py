"""Config: presets, --set coercion, errors that name the key, value and what is allowed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from system import config as C
from system.cli import recipe_main
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
            "3",
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
        "workers": 3,
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
