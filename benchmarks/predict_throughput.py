"""predict.py's throughput per family on raw files at real size, in one run.

    python benchmarks/predict_throughput.py                    # every family (~3 min on 2 cores)
    python benchmarks/predict_throughput.py --only eeg,text    # some
    python benchmarks/predict_throughput.py --device cuda      # on a GPU

Each family's model is built at its real-data size (untrained weights: the speed is the same)
with the preprocessing its data module records, and ``zoo.inference.predict_path`` (the code
``predict.py`` runs after loading the model) reads, preprocesses, answers and writes:

- ``eeg``: one DEAP subject file as DEAP distributes it (``sXX.dat``: 40 trials x 40 channels
  x 8064 samples, a Python 2 pickle), the CNN-LSTM of ``eeg_cnn_lstm``: trials/s;
- ``text``: an SST-2-style TSV of sentences, MiniLM-L6 (6 layers, hidden 384) with its real
  WordPiece tokenizer (``sparsebert_minilm_dense``, max_length 128): sentences/s;
- ``pix2pix``: 256 x 256 facade-sized PNGs, the paper's U-Net-256 generator
  (``pix2pix_facades``): images/s;
- ``detection``: COCO-sized 640 x 480 JPEGs, GroupSoftmax Faster R-CNN ResNet-50-FPN with 800
  pixel short side (``detection_coco_cctsdb``): images/s.

The data is generated into a temporary folder and deleted.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = ("eeg", "text", "pix2pix", "detection")


def compose_cfg(overrides: list[str], data_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import zoo.config  # noqa: F401  (resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*overrides, "hydra.job.chdir=false", f"paths.data_dir={data_dir}"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    return cfg


def model_and_data(experiment: str, tmp: Path, *extra: str):
    from zoo.pipeline import build

    cfg = compose_cfg([f"experiment={experiment}", *extra], tmp / "data")
    return build(cfg.model, "model"), build(cfg.data, "data")


def eeg_inputs(folder: Path) -> None:
    from zoo.data.demo.deap import make_subject

    with (folder / "s01.dat").open("wb") as f:
        pickle.dump(make_subject(1, seed=0, n_trials=40), f, protocol=2)


def text_inputs(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    words = "the a model trains on data and reports what it learned from every batch".split()
    lines = ["sentence\tlabel"]
    for _ in range(n):  # SST-2's sentences: 2 to 50 words, mean about 10
        lines.append(" ".join(rng.choice(words, size=int(rng.integers(2, 50)))) + "\t1")
    (folder / "dev.tsv").write_text("\n".join(lines) + "\n")


def image_inputs(folder: Path, n: int, size: tuple[int, int], suffix: str) -> None:
    from PIL import Image

    from zoo.data.demo.pix2pix import load_photo

    photos = [load_photo(name) for name in ("astronaut", "coffee", "chelsea", "motorcycle")]
    for i in range(n):
        image = Image.fromarray(photos[i % len(photos)]).resize(size, Image.BICUBIC)
        image.save(folder / f"{i:04d}{suffix}", quality=90)


def prepare(family: str, tmp: Path, args):
    """(model with its preprocessing, input folder) of one family."""
    folder = tmp / family
    folder.mkdir()
    if family == "eeg":
        module, dm = model_and_data("eeg_cnn_lstm", tmp)
        module.preprocessing = dm.preprocessing_spec()
        eeg_inputs(folder)
    elif family == "text":
        text_inputs(folder, args.sentences)
        glue = tmp / "sst2"  # an SST-2 folder for the data module (its tokenizer: MiniLM's)
        glue.mkdir()
        for name in ("train.tsv", "dev.tsv"):
            (glue / name).write_text((folder / "dev.tsv").read_text())
        module, dm = model_and_data(
            "sparsebert_minilm_dense",
            tmp,
            "data.task=sst2",
            f"data.data_dir={glue}",
            "data.demo=null",
            "data.cache=off",
        )
        module.preprocessing = dm.preprocessing_spec()
        module.resolve()
    elif family == "pix2pix":
        module, dm = model_and_data("pix2pix_facades", tmp, "model.fid=off")
        module.preprocessing = dm.preprocessing_spec()
        image_inputs(folder, args.images, (256, 256), ".png")
    else:
        module, dm = model_and_data("detection_coco_cctsdb", tmp, "model.net.backbone_weights=null")
        module.preprocessing = dm.preprocessing_spec()
        image_inputs(folder, args.detection_images, (640, 480), ".jpg")
    return module, folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(FAMILIES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--detection-images", type=int, default=8)
    args = parser.parse_args()

    import torch

    from zoo.inference import predict_path

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    with tempfile.TemporaryDirectory(prefix="zoo-predict-bench-") as tmp:
        tmp = Path(tmp)
        for family in args.only.split(","):
            module, folder = prepare(family, tmp, args)
            module = module.to(args.device).eval()
            raw = module.raw_inputs()
            predict_path(raw, folder, tmp / f"{family}-warm", 2, progress=False)  # warm-up
            started = time.perf_counter()
            done = predict_path(raw, folder, tmp / f"{family}-out", raw.batch_size, progress=False)
            total = time.perf_counter() - started
            print(
                f"{family:9s} {done.items:5d} {done.kind:9s} "
                f"answered {done.rate():8.1f} {done.kind}/s  "
                f"(reading and writing included: {done.items / total:8.1f}/s; "
                f"batch {raw.batch_size})",
                flush=True,
            )


if __name__ == "__main__":
    main()
