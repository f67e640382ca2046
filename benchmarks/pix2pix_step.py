"""pix2pix training speed on this machine.

    python benchmarks/pix2pix_step.py            # unet_256 step + demo throughput
    python benchmarks/pix2pix_step.py --steps 3  # fewer timed steps

Prints the time of one full training step (D step + G step, through Lightning's manual
optimisation) of the paper's configuration (unet_256 + 70x70 PatchGAN, batch 1, 256x256), and
the training throughput in samples/s of the `pix2pix_demo` experiment's model and data.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
from zoo.models.pix2pix import Pix2Pix  # noqa: E402


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times, self.samples = warmup, [], 0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t0)
            self.samples += batch["A"].shape[0]


DEVICE = "cpu"  # --device


def run(model: Pix2Pix, loader: DataLoader, steps: int, warmup: int = 2) -> StepTimer:
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="gpu" if DEVICE == "cuda" else "cpu",
        devices=1,
        max_steps=2 * (steps + warmup),
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, loader)
    return timer


def paper_step(steps: int) -> None:
    torch.manual_seed(0)
    from hydra.utils import instantiate

    # the paper's configuration: conf/model/pix2pix.yaml's defaults on 3-channel images
    cfg = compose_cfg(["model=pix2pix", "data=aligned", "model.fid=off"])
    model = instantiate(cfg.model)
    a = torch.rand(steps + 2, 3, 256, 256) * 2 - 1
    items = [{"A": a[i], "B": a[i].flip(-1), "path": f"{i}"} for i in range(len(a))]
    timer = run(model, DataLoader(items, batch_size=1), steps)
    med = statistics.median(timer.times)
    print(
        f"unet_256 + basic PatchGAN, batch 1, 256x256: {med * 1e3:.0f} ms per training step "
        f"(median of {len(timer.times)}; {1 / med:.2f} samples/s)"
    )


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import zoo.config  # noqa: F401  (resolvers)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*overrides, "hydra.job.chdir=false"], return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)
    return cfg


def demo_throughput(batches: int) -> None:
    from hydra.utils import instantiate

    cfg = compose_cfg(["experiment=pix2pix_demo"])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    model = instantiate(cfg.model)
    timer = run(model, dm.train_dataloader(), batches)
    total = sum(timer.times)
    gen = cfg.model.generator
    print(
        f"pix2pix_demo ({gen.netG}, ngf {gen.ngf}, {cfg.data.crop_size}px, batch "
        f"{cfg.data.batch_size}): {timer.samples / total:.1f} samples/s "
        f"({len(dm.datasets['train'])} training images: "
        f"{len(dm.datasets['train']) / (timer.samples / total):.0f} s per epoch)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    paper_step(args.steps)
    demo_throughput(max(10, 4 * args.steps))


if __name__ == "__main__":
    main()
