"""pix2pix: architecture faithful to the reference, aligned data, training mechanics, mlflow."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import build_model
from zoo.data.aligned import AlignedDataModule, AlignedDataset, list_images
from zoo.data.demo.pix2pix import make_input, write_demo_aligned
from zoo.errors import DataError
from zoo.models.components.pix2pix_nets import define_discriminator, define_generator
from zoo.models.pix2pix import Pix2Pix, linear_decay


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- networks


def test_parameter_counts_match_the_reference():
    assert n_params(define_generator("unet_256", 3, 3, 64, "batch", True)) == 54_413_955
    assert n_params(define_generator("unet_128", 3, 3, 64, "batch", True)) == 41_828_995
    assert n_params(define_discriminator("basic", 6, 64, 3, "batch")) == 2_768_705


def test_output_shapes_and_patch_map():
    with torch.no_grad():
        g128 = define_generator("unet_128", 3, 3, 64, "batch", True).eval()
        assert g128(torch.randn(1, 3, 128, 128)).shape == (1, 3, 128, 128)
        g256 = define_generator("unet_256", 3, 3, 64, "batch", True).eval()
        out = g256(torch.randn(1, 3, 256, 256))
        assert out.shape == (1, 3, 256, 256) and out.abs().max() <= 1.0  # tanh output
        d = define_discriminator("basic", 6, 64, 3, "batch")
        assert d(torch.randn(1, 6, 256, 256)).shape == (1, 1, 30, 30)
        assert d.receptive_field == 70
        assert define_discriminator("pixel", 6, 64, 3, "batch")(
            torch.randn(1, 6, 32, 32)
        ).shape == (1, 1, 32, 32)
        res = define_generator("resnet_9blocks", 3, 2, 8, "instance", False)
        assert res(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)


def test_unet_details_follow_the_reference():
    g = define_generator("unet_256", 3, 3, 64, "batch", True)
    dropouts = [m for m in g.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 3 and all(
        m.p == 0.5 for m in dropouts
    )  # the 3 innermost-but-one blocks
    assert (
        len(
            [
                m
                for m in define_generator("unet_128", 3, 3, 64, "batch", True).modules()
                if isinstance(m, torch.nn.Dropout)
            ]
        )
        == 2
    )
    assert not any(
        isinstance(m, torch.nn.Dropout)
        for m in define_generator("unet_256", 3, 3, 64, "batch", False).modules()
    )
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].bias is None  # batch norm: no conv bias
    g_inst = define_generator("unet_256", 3, 3, 64, "instance", True)
    assert all(m.bias is not None for m in g_inst.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="divisible by 256"):
        g(torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match="netG=unet_100: the U-Net size must be a power of two"):
        define_generator("unet_100", 3, 3, 64, "batch", True)


def test_linear_lr_rule():
    f = linear_decay(n_epochs=2, n_epochs_decay=2)
    assert [f(e) for e in range(4)] == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3])


# --------------------------------------------------------------------------- data


def write_pairs(folder: Path, n: int, size=(40, 30), same=True, seed=0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        b = a if same else rng.integers(0, 256, a.shape, dtype=np.uint8)
        Image.fromarray(np.concatenate([a, b], axis=1)).save(folder / f"{i:03d}.png")


def test_paired_augmentation_keeps_a_and_b_aligned(tmp_path):
    write_pairs(tmp_path / "train", 3)  # A == B in every file
    ds = AlignedDataset(
        list_images(tmp_path / "train"),
        preprocess="resize_and_crop",
        load_size=36,
        crop_size=32,
        flip=True,
        train=True,
    )
    crops = set()
    for _ in range(20):
        item = ds[0]
        assert item["A"].shape == (3, 32, 32) and torch.equal(item["A"], item["B"])
        assert -1.0 <= item["A"].min() and item["A"].max() <= 1.0
        crops.add(item["A"].sum().item())
    assert len(crops) > 3  # the crop/flip really is random
    # evaluation is deterministic (centred crop, no flip)
    val = AlignedDataset(
        ds.files, preprocess="resize_and_crop", load_size=36, crop_size=32, train=False
    )
    assert torch.equal(val[1]["A"], val[1]["A"])
    # BtoA swaps the halves
    write_pairs(tmp_path / "pairs", 1, same=False)
    ab = AlignedDataset(list_images(tmp_path / "pairs"), "AtoB", "none", train=False)[0]
    ba = AlignedDataset(list_images(tmp_path / "pairs"), "BtoA", "none", train=False)[0]
    assert torch.equal(ab["A"], ba["B"]) and torch.equal(ab["B"], ba["A"])


def test_bad_files_are_named(tmp_path):
    write_pairs(tmp_path / "train", 2)
    (tmp_path / "train" / "broken.png").write_bytes(b"this is not a png")
    dm = AlignedDataModule(str(tmp_path), crop_size=16, load_size=20)
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        dm.setup("fit")
    (tmp_path / "train" / "broken.png").unlink()
    Image.fromarray(np.zeros((10, 31, 3), np.uint8)).save(tmp_path / "train" / "odd.png")
    with pytest.raises(DataError, match=r"odd\.png: width 31 is odd"):
        AlignedDataModule(str(tmp_path), crop_size=8, load_size=10).setup("fit")
    (tmp_path / "train" / "odd.png").unlink()
    (tmp_path / "train" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: not an image file"):
        AlignedDataModule(str(tmp_path), crop_size=8, load_size=10).setup("fit")
    (tmp_path / "train" / "notes.txt").unlink()
    with pytest.raises(DataError, match=r"val: split folder not found"):
        AlignedDataModule(str(tmp_path), crop_size=8, load_size=10).setup("fit")
    write_pairs(tmp_path / "val", 1)
    (tmp_path / "val" / "000.png").write_bytes(
        Image.open(tmp_path / "train" / "000.png").tobytes()[:50]
    )
    with pytest.raises(DataError, match=r"000\.png"):
        AlignedDataModule(str(tmp_path), crop_size=8, load_size=10).setup("fit")


def test_demo_dataset_is_real_photos_in_aligned_format(tmp_path):
    out = write_demo_aligned(
        tmp_path / "demo", task="edges", size=48, n_train=16, n_val=8, n_test=8
    )
    assert [len(list((out / s).glob("*.png"))) for s in ("train", "val", "test")] == [16, 8, 8]
    spec = json.loads((out / "demo.json").read_text())
    assert spec["task"] == "edges" and "astronaut" in spec["photos"]
    ab = np.asarray(Image.open(sorted((out / "test").glob("*.png"))[0]))
    a, b = ab[:, :48], ab[:, 48:]
    assert ab.shape == (48, 96, 3) and b.std() > 10  # a real photo crop, not a flat image
    assert np.array_equal(a, make_input(b, "edges")) and set(np.unique(a)) <= {0, 255}
    before = (out / "demo.json").stat().st_mtime_ns
    write_demo_aligned(tmp_path / "demo", task="edges", size=48, n_train=16, n_val=8, n_test=8)
    assert (out / "demo.json").stat().st_mtime_ns == before  # reused, not rewritten
    gray = write_demo_aligned(
        tmp_path / "gray", task="colorize", size=32, n_train=8, n_val=8, n_test=8
    )
    ab = np.asarray(Image.open(sorted((gray / "train").glob("*.png"))[0]))
    assert np.array_equal(ab[:, :32, 0], ab[:, :32, 1])  # A is grayscale, B is colour
    assert not np.array_equal(ab[:, 32:, 0], ab[:, 32:, 1])


# --------------------------------------------------------------------------- training mechanics


def tiny_model(*overrides: str) -> Pix2Pix:
    return build_model(
        [
            "experiment=pix2pix_demo",
            "model.generator.netG=unet_32",
            "model.generator.ngf=4",
            "model.discriminator.ndf=4",
            "model.scheduler.lr_lambda.n_epochs=1",
            "model.scheduler.lr_lambda.n_epochs_decay=3",
            "model.fid=off",
            *overrides,
        ]
    )


def tiny_loader(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    items = [{"A": a[i], "B": a[i].flip(-1), "path": f"x{i}.png"} for i in range(n)]
    return DataLoader(items, batch_size=2)


@pytest.mark.parametrize("gan_mode", ["vanilla", "lsgan", "wgangp"])
def test_one_step_updates_generator_and_discriminator(gan_mode):
    torch.manual_seed(0)
    model = tiny_model(f"model.gan_mode={gan_mode}")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=tiny_loader())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("generator.") for n in changed)
    assert any(n.startswith("discriminator.") for n in changed)
    assert trainer.global_step == 2  # manual optimisation: one D step + one G step


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs: dict[int, tuple[float, float]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.lrs[trainer.current_epoch] = tuple(o.param_groups[0]["lr"] for o in trainer.optimizers)


def test_resume_restores_the_schedule_position(tmp_path):
    torch.manual_seed(0)
    straight = RecordLR()
    L.Trainer(
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[straight],
        limit_val_batches=0,
    ).fit(tiny_model(), tiny_loader())
    # n_epochs=1 at the initial rate, then 1 - k / (n_epochs_decay + 1) (the reference's rule)
    assert [straight.lrs[e][0] for e in range(4)] == pytest.approx([2e-4, 1.5e-4, 1e-4, 0.5e-4])
    assert all(g == d for g, d in straight.lrs.values())

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    L.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, callbacks=[ckpt], limit_val_batches=0
    ).fit(tiny_model(), tiny_loader())
    resumed = RecordLR()
    L.Trainer(
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[resumed],
        limit_val_batches=0,
    ).fit(tiny_model(), tiny_loader(), ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    assert set(resumed.lrs) == {2, 3}
    for epoch in (2, 3):
        assert resumed.lrs[epoch] == pytest.approx(straight.lrs[epoch])  # both optimisers


# --------------------------------------------------------------------------- end to end

# ------------------------------------------------- what test_experiments checks of this family


def check_experiment_run(cfg, run, arts, html, evaluated, client):
    """What only this family logs, checked after the shared checks of
    tests/test_experiments.py::test_experiment_end_to_end."""
    m, params = run.data.metrics, run.data.params
    for key in ("train/loss_D", "train/loss_G", "train/loss_G_L1", "val/psnr", "test/ssim"):
        assert key in m, key
    assert 0 < m["val/ssim"] <= 1 and m["val/psnr"] > 0
    assert int(params["model/params/generator"]) > 1_000_000
    assert int(params["model/params/discriminator"]) > 100_000
    assert params["model.generator.netG"] == "unet_64" and params["model.lambda_L1"] == "100.0"
    assert run.data.tags["zoo.fid"].startswith(("skipped", "on"))
    assert {"figures/val/grid_epoch000.png", "figures/test/grid.png"} <= arts
    assert "Test results" in html and "test/ssim" in html
