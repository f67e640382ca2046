"""pix2pix (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks"): a U-Net (or ResNet) generator G trained against a PatchGAN discriminator D that sees
the input concatenated with the real or generated output, with an L1 term.

Lightning manual optimisation, one D step then one G step per batch, as the authors' code:
    L_D = ½ [GAN(D(A, G(A)), fake) + GAN(D(A, B), real)]  (+ λ_gp · gradient penalty for wgangp)
    L_G = GAN(D(A, G(A)), real) + λ_L1 · |G(A) − B|₁
Adam (lr 2e-4, β = (0.5, 0.999)) for both; learning rate constant for ``n_epochs`` epochs, then
linearly to zero over ``n_epochs_decay`` (the reference's ``linear`` policy). Networks,
optimizer and schedule are injected from ``conf/model/pix2pix.yaml``. Both optimisers and
both schedulers live in Lightning checkpoints, so a resumed run continues with exactly the same
learning rate and Adam moments.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from zoo.inference import ImageInputs, Item, Writer
from zoo.models.base import OptimizerFactory, SchedulerFactory, ZooModule, scheduler_config
from zoo.models.components.pix2pix_nets import init_weights
from zoo.outputs import Figure, Section, Tag

log = logging.getLogger(__name__)

GAN_MODES = ("vanilla", "lsgan", "wgangp")
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID weights


class GANLoss(nn.Module):
    """`vanilla`: BCE on logits; `lsgan`: least squares; `wgangp`: Wasserstein critic (−mean
    for real, +mean for fake; use with the gradient penalty)."""

    def __init__(self, gan_mode: str):
        super().__init__()
        if gan_mode not in GAN_MODES:
            raise ValueError(f"gan_mode={gan_mode!r}: choose one of {GAN_MODES}")
        self.gan_mode = gan_mode
        self.loss = {"vanilla": nn.BCEWithLogitsLoss(), "lsgan": nn.MSELoss(), "wgangp": None}[
            gan_mode
        ]

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        if self.gan_mode == "wgangp":
            return -prediction.mean() if target_is_real else prediction.mean()
        target = torch.ones_like(prediction) if target_is_real else torch.zeros_like(prediction)
        return self.loss(prediction, target)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al.): E[(‖∇D(x̂)‖₂ − 1)²] on random interpolates x̂ of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = critic(interpolates)
    (grads,) = torch.autograd.grad(out, interpolates, torch.ones_like(out), create_graph=True)
    return ((grads.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def linear_decay(n_epochs: int, n_epochs_decay: int, epoch_count: int = 1):
    """The reference's `linear` LR policy as a LambdaLR factor of the epoch index."""

    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + epoch_count - n_epochs) / float(n_epochs_decay + 1)

    return factor


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (the range PSNR/SSIM and pictures use)."""
    return ((x + 1) / 2).clamp(0, 1)


class Pix2Pix(ZooModule):
    """pix2pix with the reference's option names (`netG`, `netD`, `n_layers_D`, `ngf`, `ndf`,
    `norm`, `gan_mode`, `lambda_L1`, `n_epochs`, `n_epochs_decay`, ...). The networks are
    ``self.generator`` and ``self.discriminator``.

    Logs ``train/loss_D``, ``train/loss_G``, ``train/loss_G_GAN``, ``train/loss_G_L1``,
    ``train/D_real``, ``train/D_fake`` (mean discriminator outputs), ``val/l1``, ``val/psnr``,
    ``val/ssim`` (+ ``val/fid`` when Inception weights are available locally), the same under
    ``test/``, and an input | generated | target image grid per validation epoch and for test.
    """

    @classmethod
    def upgrade_config(cls, node: dict) -> dict | None:
        """A model node logged with flat keys, in today's shape (``zoo.legacy``)."""
        return None if "generator" in node else upgrade_flat_config(node)

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None,
        init_gain: float,
        gan_mode: str,
        lambda_L1: float,
        lambda_gp: float,
        grid_images: int,
        grid_every_n_epochs: int,
        fid: str | bool,
    ):
        super().__init__()
        # plain values only: checkpoints load with weights_only=True
        self.save_hyperparameters(
            ignore=["generator", "discriminator", "optimizer", "scheduler"], logger=False
        )
        self.automatic_optimization = False
        self.generator = init_weights(generator, init_gain)
        self.discriminator = init_weights(discriminator, init_gain)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.criterion_gan = GANLoss(gan_mode)
        self.criterion_l1 = nn.L1Loss()
        self.train_means = nn.ModuleDict(
            {
                k: MeanMetric()
                for k in ("loss_D", "loss_G", "loss_G_GAN", "loss_G_L1", "D_real", "D_fake")
            }
        )
        image_metrics = MetricCollection(
            {
                "psnr": PeakSignalNoiseRatio(data_range=1.0),
                "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
            }
        )
        self.val_metrics = image_metrics.clone(prefix="val/")
        self.test_metrics = image_metrics.clone(prefix="test/")
        self.val_l1, self.test_l1 = MeanMetric(), MeanMetric()
        # FID's Inception network is built (its weights read) in configure_model, not here
        self.fid_setting, self.fid, self.fid_note = fid, None, None
        self._grid: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]] = []

    # ------------------------------------------------------------------ setup

    def configure_model(self) -> None:
        """Lightning's hook: FID's Inception network, when it is on and its weights are here."""
        if self.fid_note is None:
            self.fid, self.fid_note = self._make_fid(self.fid_setting)

    def _make_fid(self, fid: str | bool):
        if fid is False or fid == "off":
            return None, "off"
        reason = None
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            reason = "torch-fidelity is not installed"
        if reason is None:
            weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
            if not weights.is_file():
                reason = f"Inception weights not found at {weights}"
        if reason is None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            return FrechetInceptionDistance(feature=2048, normalize=True), "on"
        if fid is True or fid == "on":
            raise ValueError(f"model.fid=on but FID is unavailable: {reason}")
        return None, f"skipped: {reason}"

    def parameter_groups(self) -> dict[str, nn.Module]:
        """Logged as model/params/generator and model/params/discriminator."""
        return {"generator": self.generator, "discriminator": self.discriminator}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.emit(Tag("zoo.fid", self.fid_note))

    def configure_optimizers(self):
        """One optimizer (and schedule) per network, from the same injected factories (the
        reference's Adam(lr 2e-4, betas (0.5, 0.999)) and linear decay: conf/model/pix2pix.yaml)."""
        opts = [
            self.optimizer_factory(params=net.parameters())
            for net in (self.generator, self.discriminator)
        ]
        scheds = [scheduler_config(self.scheduler_factory, o) for o in opts]
        return opts, [s for s in scheds if s is not None]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.generator(a)

    # ------------------------------------------------------------------ training

    def training_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        opt_g, opt_d = self.optimizers()
        real_a, real_b = batch["A"], batch["B"]
        fake_b = self.generator(real_a)

        # D: real pairs -> real, generated pairs -> fake
        self.toggle_optimizer(opt_d)
        fake_ab = torch.cat([real_a, fake_b.detach()], 1)
        real_ab = torch.cat([real_a, real_b], 1)
        pred_fake, pred_real = self.discriminator(fake_ab), self.discriminator(real_ab)
        loss_d = 0.5 * (self.criterion_gan(pred_fake, False) + self.criterion_gan(pred_real, True))
        if self.hparams.gan_mode == "wgangp":
            loss_d = loss_d + self.hparams.lambda_gp * gradient_penalty(
                self.discriminator, real_ab, fake_ab
            )
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        # G: fool D (D's weights frozen by the toggle) and stay close to B
        self.toggle_optimizer(opt_g)
        loss_g_gan = self.criterion_gan(self.discriminator(torch.cat([real_a, fake_b], 1)), True)
        loss_g_l1 = self.criterion_l1(fake_b, real_b) * self.hparams.lambda_L1
        loss_g = loss_g_gan + loss_g_l1
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        values = {
            "loss_D": loss_d,
            "loss_G": loss_g,
            "loss_G_GAN": loss_g_gan,
            "loss_G_L1": loss_g_l1,
            "D_real": pred_real.mean(),
            "D_fake": pred_fake.mean(),
        }
        for name, value in values.items():
            self.train_means[name](value.detach())
            self.log(
                f"train/{name}",
                self.train_means[name],
                on_step=False,
                on_epoch=True,
                prog_bar=name in ("loss_D", "loss_G"),
            )
        # the losses by name (manual optimisation): zoo.faults stops on a non-finite one
        return {"loss_D": loss_d.detach(), "loss_G": loss_g.detach()}

    def on_train_epoch_end(self) -> None:
        # manual optimisation: the epoch-wise LR schedules are stepped here
        schedulers = self.lr_schedulers() or []
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, batch, metrics: MetricCollection, l1: MeanMetric) -> None:
        real_a, real_b = batch["A"], batch["B"]
        fake_b = self.generator(real_a)
        l1(self.criterion_l1(fake_b, real_b), weight=real_a.shape[0])
        fake_u, real_u = to_unit(fake_b), to_unit(real_b)
        metrics.update(fake_u, real_u)
        if self.fid is not None and fake_u.shape[1] == 3:
            self.fid.update(real_u, real=True)
            self.fid.update(fake_u, real=False)
        take = self.hparams.grid_images - len(self._grid)
        for i in range(min(max(take, 0), real_a.shape[0])):
            self._grid.append(
                (
                    to_unit(real_a[i]).cpu(),
                    fake_u[i].cpu(),
                    real_u[i].cpu(),
                    Path(batch["path"][i]).name,
                )
            )

    def on_validation_epoch_start(self) -> None:
        self._grid = []

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_l1)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val", self.val_metrics, self.val_l1)
        if self.epoch_due(self.hparams.grid_every_n_epochs):
            self._emit_grid(
                f"figures/val/grid_epoch{self.current_epoch:03d}.png",
                f"validation, epoch {self.current_epoch}",
            )

    def on_test_epoch_start(self) -> None:
        self._grid = []

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_l1)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test", self.test_metrics, self.test_l1)
        self._emit_grid("figures/test/grid.png", "test")
        section = Section("Test results").paragraph(
            f"{len(self._grid)} test images: input | generated | target. L1 in [-1, 1] pixel "
            f"units; PSNR and SSIM on [0, 1] images. FID: {self.fid_note}."
        )
        if self._grid:
            grid = list(self._grid)
            section.image(
                "test_grid",
                "test results: input | generated | target",
                lambda: grid_figure(grid, "test results"),
            )
        self.emit(section)

    def _log_epoch_metrics(
        self, split: str, metrics: MetricCollection, l1: MeanMetric
    ) -> dict[str, float]:
        values = {**metrics.compute(), f"{split}/l1": l1.compute()}
        if self.fid is not None:
            values[f"{split}/fid"] = self.fid.compute()
            self.fid.reset()
        metrics.reset()
        l1.reset()
        for name, value in values.items():
            self.log(name, value, prog_bar=True, sync_dist=True)
        return {k: float(v) for k, v in values.items()}

    def _emit_grid(self, path: str, title: str) -> None:
        if self._grid:
            grid = list(self._grid)
            self.emit(Figure(path, lambda: grid_figure(grid, title)))

    # ------------------------------------------------------------------ serving

    def serving_input(self, batch) -> np.ndarray:
        return batch["A"].detach().cpu().numpy()

    @torch.no_grad()
    def serve(self, inputs: np.ndarray) -> np.ndarray:
        """G(A) for input images A [B, input_nc, H, W] in [-1, 1]; outputs in [-1, 1]."""
        x = torch.as_tensor(inputs, device=self.device, dtype=torch.float32)
        return self.generator(x).cpu().numpy()

    def export_network(self):
        """The generator: images A [B, input_nc, H, W] in [-1, 1] -> G(A)."""
        return self.generator, ["A"], ["fake_B"], {"A": {0: "batch"}}

    def raw_inputs(self) -> Pix2PixImages:
        return Pix2PixImages(self)


class Pix2PixImages(ImageInputs):
    """Raw photos of the input domain, any size: each is resized (bicubic) to the size the
    generator was trained at and scaled to [-1, 1]; G's output is scaled back to uint8 and
    resized to the input's size. The answer is that image."""

    def __init__(self, module: Pix2Pix):
        super().__init__(module)
        self.size = int(self.spec["size"])
        self.channels = int(self.spec["input_nc"])
        self.out_channels = int(self.spec["output_nc"])

    def is_tensor_input(self, model_input: Any) -> bool:
        """[B, input_nc, H, W] floats in [-1, 1], as the generator takes them."""
        x = model_input
        return (
            isinstance(x, np.ndarray)
            and x.dtype.kind == "f"
            and x.ndim == 4
            and (x.shape[1] == self.channels)
        )

    def network_input(self, values: list[np.ndarray]) -> np.ndarray:
        """The images resized (bicubic) to the trained size, [B, C, size, size] in [-1, 1]."""
        from PIL import Image

        resized = [
            np.asarray(
                Image.fromarray(v.squeeze(-1) if v.shape[-1] == 1 else v).resize(
                    (self.size, self.size), Image.BICUBIC
                ),
                dtype=np.float32,
            ).reshape(self.size, self.size, -1)
            for v in values
        ]
        return (np.stack(resized) / 127.5 - 1.0).transpose(0, 3, 1, 2).astype(np.float32)

    @torch.no_grad()
    def answer(self, values: list[np.ndarray]) -> list[dict[str, Any]]:
        from PIL import Image

        x = torch.from_numpy(self.network_input(values)).to(self.module.device)
        fake = self.module.generator(x)
        out = ((fake.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        records = []
        for image, v in zip(out, values):
            pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
            pil = pil.resize((v.shape[1], v.shape[0]), Image.BICUBIC)
            records.append({"image": np.asarray(pil, dtype=np.uint8).reshape(*v.shape[:2], -1)})
        return records

    def table(self, records: list[dict[str, Any]]) -> Any:
        """One uint8 (B, H, W, C) array when the images share a size, else a list of them."""
        images = [r["image"] for r in records]
        if len({i.shape for i in images}) == 1:
            return np.stack(images)
        return images

    def writer(self, output: Path) -> ImageWriter:
        return ImageWriter(output)

    def output_spec(self) -> tuple[Any, tuple[int, ...]]:
        return np.uint8, (-1, -1, -1, self.out_channels)


class ImageWriter(Writer):
    """Each translated image as ``<input name>.png`` (lossless, whatever came in)."""

    def __init__(self, output: Path):
        self.output, self.written = output, []

    def add(self, items: list[Item], records: list[dict[str, Any]]) -> None:
        from PIL import Image

        for item, record in zip(items, records):
            path = self.output / f"{Path(item.name).stem}.png"
            image = record["image"]
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
            self.written.append(path)

    def close(self) -> list[Path]:
        return self.written


def grid_figure(grid, title: str):
    """input | generated | target rows of (A, G(A), B, file name) samples in [0, 1]."""
    from zoo.plotting import image_grid_figure

    rows = [[t.permute(1, 2, 0).squeeze(-1).numpy() for t in sample[:3]] for sample in grid]
    return image_grid_figure(
        rows,
        ["input (A)", "generated G(A)", "target (B)"],
        title,
        row_labels=[s[3] for s in grid],
    )


# --------------------------------------------------------------------------- earlier configs


def upgrade_flat_config(old: dict[str, Any]) -> dict[str, Any]:
    """A pix2pix model node with flat keys (``model.netG``, ``model.lr``, ...) in the injected
    shape, with the same values."""
    input_nc, output_nc, norm = old.get("input_nc", 3), old.get("output_nc", 3), old["norm"]
    return {
        "_target_": "zoo.models.pix2pix.Pix2Pix",
        "generator": {
            "_target_": "zoo.models.components.pix2pix_nets.define_generator",
            "netG": old["netG"],
            "input_nc": input_nc,
            "output_nc": output_nc,
            "ngf": old["ngf"],
            "norm": norm,
            "use_dropout": not old.get("no_dropout", False),
        },
        "discriminator": {
            "_target_": "zoo.models.components.pix2pix_nets.define_discriminator",
            "netD": old["netD"],
            "input_nc": input_nc + output_nc,
            "ndf": old["ndf"],
            "n_layers_D": old["n_layers_D"],
            "norm": norm,
        },
        "optimizer": {
            "_target_": "torch.optim.Adam",
            "_partial_": True,
            "_convert_": "all",
            "lr": old["lr"],
            "betas": [old["beta1"], 0.999],
        },
        "scheduler": {
            "_target_": "torch.optim.lr_scheduler.LambdaLR",
            "_partial_": True,
            "lr_lambda": {
                "_target_": "zoo.models.pix2pix.linear_decay",
                "n_epochs": old["n_epochs"],
                "n_epochs_decay": old["n_epochs_decay"],
                "epoch_count": old.get("epoch_count", 1),
            },
        },
        **{
            k: old[k]
            for k in (
                "init_gain",
                "gan_mode",
                "lambda_L1",
                "lambda_gp",
                "grid_images",
                "grid_every_n_epochs",
                "fid",
            )
        },
    }
