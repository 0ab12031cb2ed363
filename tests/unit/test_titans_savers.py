"""The long-context savers of the Titans models change memory, not results.

With `mem_checkpoint` (segment scans recomputed in backward), `loss_chunk` (chunked loss with
the final norm inside the chunks) and block-level activation checkpointing on, the training
loss and every parameter gradient equal those of the plain model; the graph kept by forward does
not grow with the length.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from models.layers.loss import chunked_lm_loss
from models.layers.norms import RMSNorm
from system.strategies.fsdp import apply_activation_checkpointing
from tests._testing import (
    assert_close,
    autograd_graph_size,
    one_thread,  # noqa: F401  (autouse: this module runs on 1 thread)
)


def _step(name: str, ac: bool, length: int = 112, **kw):
    torch.manual_seed(0)
    model = models.build(name, **kw).train()
    if ac:
        apply_activation_checkpointing(model)
    tokens = torch.randint(0, 256, (2, length + 1), generator=torch.Generator().manual_seed(3))
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    out.loss.backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()
    }
    return out.loss.detach(), grads


@pytest.mark.parametrize("variant", ["mac", "lmm", "mag", "mal"])
@pytest.mark.parametrize("ac", [False, True])
def test_savers_match_plain(variant: str, ac: bool) -> None:
    # 112 = 3.5 pieces of 32: the last segment / checkpoint piece and loss chunk are partial.
    name, seg = f"titans-{variant}-tiny", {"segment_len": 32} if variant == "mac" else {}
    ref_loss, ref = _step(name, False, **seg)
    loss, got = _step(name, ac, mem_checkpoint=32, loss_chunk=48, **seg)
    assert_close("loss", ref_loss, loss, 1e-6)
    for n, g in ref.items():
        assert got[n] is not None, n
        assert_close(f"grad {n}", g, got[n], 1e-5)


def test_mac_forward_graph_does_not_grow() -> None:
    """Autograd nodes and saved-tensor holders kept from forward to backward cost ~1 KB each;
    per token (5 nodes / token with per-segment torch.utils.checkpoint) they were ~10 KB/token."""
    sizes = []
    for length in (64, 256):
        torch.manual_seed(0)
        model = models.build("titans-mac-tiny", segment_len=32, mem_checkpoint=32, loss_chunk=64)
        tokens = torch.randint(0, 256, (1, length + 1))
        sizes.append(autograd_graph_size(model.train()(tokens[:, :-1], targets=tokens[:, 1:]).loss))
    # Only the 3 extra loss chunks (a score of nodes each) add up with the length.
    assert sizes[1] - sizes[0] <= 3 * 25, sizes


def test_chunked_loss_with_norm_matches_plain() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    t = torch.randint(0, 50, (2, 37))
    mask = torch.rand(2, 37) > 0.3
    params = [h, w, norm.weight]

    ce = F.cross_entropy((norm(h) @ w.t()).flatten(0, 1), t.flatten(), reduction="none")
    ref = (ce * mask.flatten()).sum() / mask.sum()
    ref_grads = torch.autograd.grad(ref, params)
    got = chunked_lm_loss(h, w, t, mask, chunk=10, norm=norm)
    got_grads = torch.autograd.grad(got, params)
    assert_close("loss", ref.detach(), got.detach(), 1e-6)
    for name, a, b in zip(("hidden", "head", "norm"), ref_grads, got_grads):
        assert_close(f"grad {name}", a, b, 1e-6)


def test_training_step_does_not_import_dynamo() -> None:
    """A Titans training step (chunked loss, memory scan) in a fresh interpreter leaves
    torch._dynamo and triton unimported: torch.utils.checkpoint imported both (~150 MB RSS)."""
    code = (
        "import sys, torch\n"
        "import models\n"
        "m = models.build('titans-mac-tiny', vocab_size=64, loss_chunk=16, mem_checkpoint=32)\n"
        "t = torch.randint(0, 64, (1, 129))\n"
        "m.train()(t[:, :-1], targets=t[:, 1:]).loss.backward()\n"
        "print(sorted(n for n in ('torch._dynamo', 'triton') if n in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_chunked_loss_refuses_a_plain_callable_norm() -> None:
    h, w, t = torch.randn(1, 4, 8), torch.randn(5, 8), torch.randint(0, 5, (1, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        chunked_lm_loss(h, w, t, chunk=2, norm=lambda x: x)
