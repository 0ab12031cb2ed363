"""`mnemo eval niah`: the accuracy metric on known models, then the CLI on a real checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.outputs import SeqOutput
from system.cli import main as mnemo
from system.evaluate import parse_lengths, probe_accuracy
from tests._runs import check, run_torchrun, tiny_config


class _Copycat(torch.nn.Module):
    """Predicts the true next token when `oracle`, else always token 0."""

    def __init__(self, oracle: bool) -> None:
        super().__init__()
        self.oracle = oracle
        self.full: torch.Tensor | None = None

    def forward(self, tokens):
        b, n = tokens.shape
        logits = torch.zeros(b, n, 258)
        if self.oracle:
            # The probe's answer is the repeated passkey: find it in the needle and copy it.
            for i in range(b):
                text = bytes(tokens[i].tolist()).decode("latin-1")
                key = text.split("The pass key is ")[1][:5]
                nxt = torch.tensor(list((text[1:] + key[-1]).encode("latin-1")))
                q = text.rindex("It is ") + len("It is ")
                nxt[q - 1 : q - 1 + 5] = torch.tensor(list(key.encode()))
                logits[i, torch.arange(n), nxt[:n]] = 1.0
        return SeqOutput(logits)


def test_metric_on_known_models():
    assert probe_accuracy(_Copycat(True), 300, 0.5, 4) == 1.0
    assert probe_accuracy(_Copycat(False), 300, 0.5, 4) == 0.0


def test_parse_lengths():
    assert parse_lengths("1k,4k,2m,300") == [1024, 4096, 2 * 1024**2, 300]
    with pytest.raises(ValueError, match="--lengths entry 'x1'"):
        parse_lengths("1k,x1")


def test_help_explains_lengths_and_depths(capsys):
    try:  # argparse exits; the mnemo entry point may turn that into a return code
        rc = mnemo(["eval", "niah", "--help"])
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    assert "1k = 1024 tokens" in text
    assert "needle depths as fractions" in text


def test_out_naming_an_existing_file_is_an_error(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    rc = mnemo(["eval", "niah", "--checkpoint", str(ckpt), "--out", str(taken)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--out {taken} is an existing file" in err
    assert taken.read_text() == "{}"  # left as it was


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A real 6-step transformer-tiny run (torchrun, 1 process) and its last checkpoint."""
    run = tmp_path_factory.mktemp("niah") / "run"
    cfg = tiny_config(run)
    check(run_torchrun(cfg, nproc=1))
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def _files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.slow
def test_cli_on_a_trained_checkpoint(trained_checkpoint, tmp_path, capsys):
    ckpt = trained_checkpoint
    out = tmp_path / "eval"
    rc = mnemo(
        [
            "eval",
            "niah",
            "--checkpoint",
            str(ckpt),
            "--lengths",
            "128,256",
            "--depths",
            "0,0.5,1",
            "--samples",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads((out / "niah.json").read_text())
    acc = np.array(res["accuracy"])
    assert acc.shape == (3, 2) and ((acc >= 0) & (acc <= 1)).all()
    assert (res["digits"], res["alphabet"]) == (5, 10)  # the run's data config
    assert (out / "niah.png").read_bytes()[:4] == b"\x89PNG"
    assert "depth \\ length" in capsys.readouterr().out
    assert mnemo(["eval", "niah", "--checkpoint", str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_cli_writes_beside_the_checkpoint_by_default(trained_checkpoint, capsys):
    ckpt = trained_checkpoint
    before = _files(ckpt)
    args = ["eval", "niah", "--checkpoint", str(ckpt), "--lengths", "128", "--depths", "0.5"]
    assert mnemo([*args, "--samples", "1"]) == 0
    out = ckpt.parent.parent / "eval" / f"niah-{ckpt.name}"
    assert json.loads((out / "niah.json").read_text())["step"] == int(ckpt.name.split("_")[1])
    assert (out / "niah.png").exists()
    assert _files(ckpt) == before, "mnemo eval wrote into the checkpoint directory"
    assert str(out / "niah.json") in capsys.readouterr().out
    # The run dir names its newest committed checkpoint: the same output place, not runs/eval.
    shutil.rmtree(out)
    run_dir = ckpt.parent.parent
    assert mnemo(["eval", "niah", "--checkpoint", str(run_dir), *args[4:], "--samples", "1"]) == 0
    assert (out / "niah.json").exists() and not (run_dir.parent / "eval").exists()
