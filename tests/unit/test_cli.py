"""`mnemo` as a user runs it: a real subprocess of the console entry point, its exit status,
its help and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests._runs import ROOT, env_for_subprocess

COMMANDS = ("train", "models", "data", "eval", "ckpt", "k8s")


def mnemo(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """What the `mnemo` console script runs (system.cli:main), from this checkout."""
    code = "import sys; from system.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_command_with_one_line():
    proc = mnemo("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: mnemo [-h] COMMAND ...")
    lines = proc.stdout.splitlines()
    for cmd in COMMANDS:
        (line,) = [x for x in lines if x.split()[:1] == [cmd]]
        assert len(line.split()) > 2, f"`{cmd}` has no help line: {line!r}"
    assert "130 interrupted" in proc.stdout


def test_no_command_and_unknown_command_are_usage_errors():
    proc = mnemo()
    assert proc.returncode == 2 and "required: COMMAND" in proc.stderr
    proc = mnemo("trian")
    assert proc.returncode == 2
    assert "invalid choice: 'trian'" in proc.stderr and "'train'" in proc.stderr


def test_train_help_lists_recipes_and_shared_flags():
    proc = mnemo("train", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: mnemo train RECIPE [flags]")
    assert "transformer_lm  Transformer++" in out and "titans_2m" in out
    for flag in ("--preset", "--set KEY=VALUE", "--run-dir", "--resume", "--address", "--workers"):
        assert flag in out, flag
    proc = mnemo("train")
    assert proc.returncode == 2 and "a RECIPE is required" in proc.stderr


def test_train_recipe_help_shows_its_presets():
    proc = mnemo("train", "transformer_lm", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: mnemo train transformer_lm")
    assert "one of: full, smoke" in proc.stdout
    proc = mnemo("train", "nope")
    assert proc.returncode == 2
    assert "no recipe 'nope'" in proc.stderr and "titans_2m, transformer_lm" in proc.stderr


def test_bad_config_is_one_error_line_and_exit_2():
    proc = mnemo("train", "transformer_lm", "--print-config", "--set", "model.name=titan")
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: model.name='titan' is not a registered model")


def test_models_table_has_family_task_params_paper():
    proc = mnemo("models", "--family", "retnet")
    assert proc.returncode == 0, proc.stderr
    head, *rows = proc.stdout.splitlines()
    assert head.split() == ["NAME", "FAMILY", "TASK", "PARAMS", "PAPER"]
    by_name = {r.split()[0]: r for r in rows}
    assert set(by_name) == {"retnet-tiny", "retnet-1.3b", "retnet-2.7b", "retnet-6.7b"}
    assert " 6.7B " in by_name["retnet-6.7b"] and "arXiv:2307.08621" in by_name["retnet-6.7b"]


def test_models_json_every_model_has_a_paper_and_a_count():
    proc = mnemo("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert {"transformer-tiny", "titans-mac-tiny", "retnet-6.7b", "moneta-1.3b"} <= set(rows)
    for r in rows.values():
        assert r["paper"].count("arXiv:") == 1 and r["params"] > 0, r
        assert r["task"] == "lm", r  # every model registered today is a language model
    assert 6.6e9 < rows["retnet-6.7b"]["params"] < 6.8e9  # counted on the meta device


def test_models_help_and_bad_family():
    proc = mnemo("models", "--help")
    assert proc.returncode == 0 and "--family" in proc.stdout and "--json" in proc.stdout
    proc = mnemo("models", "--family", "gpt")
    assert proc.returncode == 2
    assert "--family 'gpt' is not a model family; expected one of: aaren," in proc.stderr


@pytest.mark.parametrize(
    "cmd,expect", [("data", "text"), ("eval", "niah"), ("ckpt", "inspect"), ("k8s", "render")]
)
def test_delegated_commands_show_their_own_help(cmd, expect):
    proc = mnemo(cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ") and expect in proc.stdout
