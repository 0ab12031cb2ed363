"""Transformer++ language model on passkey data (or text / shards via --set data.*).

python launch/transformer_lm.py --preset smoke          # 2 CPU workers, < 2 min
python launch/transformer_lm.py --preset full --address auto --workers 8
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from system.cli import recipe_main  # noqa: E402
from system.config import JobConfig, ModelConfig, preset, smoke_base  # noqa: E402

RECIPE = "transformer_lm"


@preset(RECIPE, "smoke")
def smoke() -> JobConfig:
    """transformer-tiny, passkey probes of 128 bytes, 2 CPU workers under DDP."""
    base = smoke_base()
    return dataclasses.replace(base, model=ModelConfig(name="transformer-tiny"))


@preset(RECIPE, "full")
def full() -> JobConfig:
    """Transformer++ 340M at 4K context (the Titans baseline), 0.5M-token batches, FSDP2."""
    base = JobConfig()
    return dataclasses.replace(
        base,
        model=ModelConfig(name="transformer-340m"),
        train=dataclasses.replace(
            base.train,
            steps=30_000,
            seq_len=4096,
            batch_tokens=524_288,
            micro_batch=8,
            dtype="bf16",
        ),
        optim=dataclasses.replace(base.optim, lr=4e-4, warmup_steps=1000),
        scaling=dataclasses.replace(
            base.scaling, workers=8, strategy="fsdp", use_gpu="true", cpus_per_worker=8
        ),
        checkpoint=dataclasses.replace(base.checkpoint, every=1000, keep=3),
        log=dataclasses.replace(base.log, every=10),
    )


if __name__ == "__main__":
    sys.exit(recipe_main(RECIPE))
