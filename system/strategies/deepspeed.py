"""DeepSpeed ZeRO 1/2/3 from a generated config, with our AdamW and LR schedule as clients.

Client optimizer/scheduler (not ones named in the DS config) because DS JIT-compiles its own
optimizers (45-52 s here, docs/environment.md) and so the LR curve is identical across strategies.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from torch import nn

from system.strategies.base import Strategy, make_optimizer, make_scheduler
from system.strategies.fsdp import apply_activation_checkpointing


def import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed with the CPU accelerator when there is no GPU, minus its shm op build."""
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # deepspeed.initialize JIT-compiles the shm comm op on CPU (26-62 s); gloo needs none of it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def ds_config(cfg, world: int, accum: int, dtype: torch.dtype, num_params: int) -> dict[str, Any]:
    """The DeepSpeed JSON config generated from the job config.

    Bucket sizes follow the model: DS's default 5e8-element buckets are allocated afresh each
    micro-step, which on a small CPU model costs seconds of page faults per step.
    """
    mb = cfg.train.micro_batch
    bucket = int(min(5e8, max(2**20, num_params)))
    conf: dict[str, Any] = {
        "train_batch_size": mb * accum * world,
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {
            "stage": cfg.scaling.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.scaling.zero_stage == 3:
        conf["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    if dtype == torch.bfloat16:
        conf["bf16"] = {"enabled": True}
    return conf


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(self, cfg, model: nn.Module, device: torch.device, world: int, accum: int) -> None:
        super().__init__(cfg, model, device, world, accum)
        deepspeed = import_deepspeed(device)
        if cfg.scaling.activation_checkpointing:
            apply_activation_checkpointing(model)
        opt = make_optimizer(model, cfg, device)
        sched = make_scheduler(opt, cfg)
        n = sum(p.numel() for p in model.parameters())
        self.ds_config = ds_config(cfg, world, accum, self.compute_dtype(), n)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=self.ds_config
        )
        self.engine = engine
        self.model = engine
        self.optimizer = optimizer
        self.scheduler = scheduler

    def micro_step(self, loss: torch.Tensor, is_last: bool) -> float | None:
        # The engine scales by 1/accum and steps only at the accumulation boundary.
        self.engine.backward(loss)
        self.engine.step()
        if not is_last:
            return None
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])
