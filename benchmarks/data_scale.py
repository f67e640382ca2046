"""Detection and text at real size: every figure of the "At real size" table, in one run.

    python benchmarks/data_scale.py                         # everything (~15 min on 2 cores)
    python benchmarks/data_scale.py --only text,loader      # some sections
    python benchmarks/data_scale.py --images 20000          # a smaller COCO file

Sections (data generated at real size, in the real on-disk format, into a temporary folder;
nothing is committed):

- ``annotations``: a train2017-sized COCO file (118,287 images, ~860k boxes, polygons) read by
  pycocotools' ``COCO()`` and by ``zoo.data.detection.load_coco``; the cache; the PSS of 4
  DataLoader workers over the records (``benchmarks/coco_annotations.py``).
- ``text``: an MNLI-sized TSV (393k sentence pairs, MNLI's 12 columns, premise/hypothesis
  lengths like MNLI's) encoded by ``GlueDataModule`` against ``tokenizers``' own
  ``encode_batch`` on the same pairs (MiniLM's real BERT WordPiece tokenizer.json, max_length
  128), then a cache-hit setup.
- ``loader``: COCO-sized JPEGs (640×480 and 480×640 mixed, 7 boxes each) through the zoo's train
  loader against torchvision's reference pipeline (``datasets.CocoDetection`` wrapped for
  ``transforms.v2``, the reference's ``hflip`` preset: PILToTensor, RandomHorizontalFlip,
  ToDtype(float, scale), ConvertBoundingBoxFormat, SanitizeBoundingBoxes, ToPureTensor); 4
  workers, batch 2, images/s, best of ``--repeat`` epochs each, interleaved.
- ``step``: one training step (forward, backward, SGD; batch 2; 800-pixel short side) of the
  GroupSoftmax Faster R-CNN against torchvision's ``fasterrcnn_*(weights=None)`` with the same
  inputs and trainable layers, for ResNet-50-FPN and MobileNetV3-FPN; median of ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MNLI_PAIRS = 392_702
TOKENIZER = "pkg:all_minilm_l6_v2/model.zip/tokenizer.json"


# --------------------------------------------------------------------------- text


def write_mnli(folder: Path, n: int, seed: int = 0) -> Path:
    """An MNLI-shaped train.tsv and dev_matched.tsv: words drawn (Zipf) from the tokenizer's
    whole-word vocabulary, premises ~22 words and hypotheses ~11 (MNLI's means)."""
    from zoo.data.text import load_tokenizer
    from zoo.pretrained import resolve

    vocab = load_tokenizer(resolve(TOKENIZER)).get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and len(w) > 1)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    header = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse"
    header += "\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
    labels = ("contradiction", "entailment", "neutral")

    def sentences(count: int, mean: float) -> list[str]:
        lengths = np.clip(rng.poisson(mean, count), 3, 120)
        ranks = np.minimum(rng.zipf(1.3, int(lengths.sum())), len(words)) - 1
        flat = np.array(words, dtype=object)[rng.permutation(len(words))][ranks]
        out, k = [], 0
        for n_words in lengths:
            out.append(" ".join(flat[k : k + n_words]).capitalize() + ".")
            k += n_words
        return out

    for name, count in (("train.tsv", n), ("dev_matched.tsv", 9815)):
        s1, s2 = sentences(count, 22), sentences(count, 11)
        with open(folder / name, "w", encoding="utf-8") as fh:
            fh.write(header + "\n")
            for i in range(count):
                label = labels[i % 3]
                fh.write(f"{i}\t{i}\t{i}n\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t")
                fh.write(f"{s1[i]}\t{s2[i]}\t{label}\t{label}\n")
    return folder


def text_section(tmp: Path, pairs: int) -> None:
    from zoo.data.text import GLUE_TASKS, GlueDataModule, load_tokenizer, read_glue_tsv
    from zoo.pretrained import resolve

    t = time.perf_counter()
    folder = write_mnli(tmp / "MNLI", pairs)
    print(f"generated MNLI-sized train.tsv ({pairs:,} pairs) in {time.perf_counter() - t:.0f} s")
    texts, _ = read_glue_tsv(folder / "train.tsv", GLUE_TASKS["mnli"])
    tok = load_tokenizer(resolve(TOKENIZER))
    tok.enable_truncation(128)
    t = time.perf_counter()
    encodings = tok.encode_batch(texts)
    raw = time.perf_counter() - t
    tokens = sum(len(e.ids) for e in encodings)
    del encodings, texts

    def setup():
        dm = GlueDataModule(str(folder), task="mnli", tokenizer={"vocab": TOKENIZER})
        t0 = time.perf_counter()
        dm.setup()
        return dm, time.perf_counter() - t0

    miss, miss_s = setup()
    ours = miss.timings["tokenize/train"]
    hit, hit_s = setup()
    assert hit.timings["cache_hits"] == 2 and len(hit.datasets["train"]) == pairs
    size = sum(f.stat().st_size for f in (folder / ".zoo-cache").glob("mnli-train-*.npy"))
    print(f"\n| MNLI-sized ({pairs:,} pairs, {tokens:,} tokens) | time | pairs/s |")
    print("|---|---|---|")
    print(f"| tokenizers encode_batch (one call) | {raw:.1f} s | {pairs / raw:,.0f} |")
    print(
        f"| GlueDataModule, tokenizing (chunked, to flat arrays) | {ours:.1f} s "
        f"| {pairs / ours:,.0f} |"
    )
    print(f"| GlueDataModule.setup, cache miss (read, tokenize, write) | {miss_s:.1f} s | |")
    print(f"| GlueDataModule.setup, cache hit | {hit_s:.2f} s | |")
    print(
        f"rate ratio (ours / encode_batch): {raw / ours:.2f}× (target ≥ 0.9×); cache hit "
        f"{hit_s:.2f} s (target ≤ 3 s; before: no cache, every job tokenized: the miss); "
        f"cache entry {size / 2**20:.0f} MiB"
    )


# --------------------------------------------------------------------------- loader


def write_jpeg_coco(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs (quality 90; 70% 640×480, 30% 480×640) cut from scikit-image's photographs
    with noise, 7 boxes each, and their COCO file."""
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = [
        np.asarray(Image.fromarray(f()).convert("RGB").resize((800, 800)))
        for f in (skdata.astronaut, skdata.chelsea, skdata.coffee, skdata.rocket)
    ]
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        w, h = (640, 480) if rng.random() < 0.7 else (480, 640)
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, 800 - h), rng.integers(0, 800 - w)
        crop = photo[y : y + h, x : x + w].astype(np.int16) + rng.integers(-8, 9, (h, w, 3))
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(crop.clip(0, 255).astype(np.uint8)).save(
            folder / "images" / name, quality=90
        )
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for _ in range(7):
            bw, bh = rng.uniform(16, w / 2), rng.uniform(16, h / 2)
            bx, by = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 81)),
                    "bbox": [bx, by, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                    "segmentation": [[bx, by, bx + bw, by, bx + bw, by + bh, bx, by + bh]],
                }
            )
    from zoo.data.detection import COCO_CLASSES

    categories = [{"id": k + 1, "name": c} for k, c in enumerate(COCO_CLASSES)]
    ann = folder / "instances.json"
    ann.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return ann


def _epoch(loader) -> float:
    """Images per second over one epoch, timed from the first batch (worker start-up left out)."""
    it = iter(loader)
    first = next(it)
    n, t = len(first[0]), time.perf_counter()
    for batch in it:
        n += len(batch[0])
    return (n - len(first[0])) / (time.perf_counter() - t)


def loader_section(tmp: Path, n: int, repeat: int) -> None:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, tv_tensors
    from torchvision.transforms import v2 as T

    from zoo.data.detection import COCO_CLASSES, DetectionDataModule, DetectionDataset

    t = time.perf_counter()
    ann = write_jpeg_coco(tmp / "coco", n)
    print(f"\ngenerated {n} JPEGs with their COCO file in {time.perf_counter() - t:.0f} s")
    dm = DetectionDataModule(
        list(COCO_CLASSES),
        {
            "coco": {
                "format": "coco",
                "label_map": {c: c for c in COCO_CLASSES},
                "train": {"annotations": str(ann), "images": str(ann.parent / "images")},
            }
        },
        batch_size=2,
        num_workers=4,
        cache="off",
    )
    dm.datasets["train"] = DetectionDataset(dm.records("train"), train=True)  # as setup("fit")
    ours = dm.train_dataloader()
    preset = T.Compose(
        [
            T.PILToTensor(),
            T.RandomHorizontalFlip(p=0.5),
            T.ToDtype(torch.float, scale=True),
            T.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY),
            T.SanitizeBoundingBoxes(),
            T.ToPureTensor(),
        ]
    )
    with open(os.devnull, "w") as quiet, _redirect(quiet):  # pycocotools prints its progress
        reference = datasets.wrap_dataset_for_transforms_v2(
            datasets.CocoDetection(str(ann.parent / "images"), str(ann), transforms=preset),
            target_keys=["boxes", "labels", "image_id"],
        )
    ref = DataLoader(
        reference, batch_size=2, shuffle=True, num_workers=4, collate_fn=lambda b: tuple(zip(*b))
    )
    rates = {"ours": [], "reference": []}
    for _ in range(repeat):
        rates["reference"].append(_epoch(ref))
        rates["ours"].append(_epoch(ours))
    a, b = max(rates["ours"]), max(rates["reference"])
    sample = next(iter(ours))[0][0]
    print(
        "\n| input pipeline (4 workers, batch 2) | images/s (best epoch) | what crosses the queue |"
    )
    print("|---|---|---|")
    print(f"| torchvision reference (CocoDetection + v2 hflip preset) | {b:.1f} | float32 |")
    print(f"| zoo DetectionDataModule (decode_image, v2, grouped) | {a:.1f} | {sample.dtype} |")
    print(
        f"ratio (ours / reference): {a / b:.2f}× (target ≥ 1.0×); "
        f"epochs: ours {[round(r, 1) for r in rates['ours']]}, "
        f"reference {[round(r, 1) for r in rates['reference']]}"
    )


class _redirect:
    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        self.old, sys.stdout = sys.stdout, self.fh

    def __exit__(self, *exc):
        sys.stdout = self.old


# --------------------------------------------------------------------------- training step


def step_section(steps: int, device: str = "cpu", amp: str = "off") -> None:
    import torch
    from torchvision.models import detection as tvd

    from zoo.boxes import derive_group_table
    from zoo.models.detection import build_faster_rcnn

    dev = torch.device(device)
    classes = [f"c{i}" for i in range(10)]
    label_maps = [{c: c for c in classes[:6]}, {c: c for c in classes[4:]}]  # two sources
    table = derive_group_table(label_maps, classes)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 480, 640, generator=g), torch.rand(3, 640, 480, generator=g)]
    targets = []
    for k, im in enumerate(images):
        h, w = im.shape[1:]
        xy = torch.rand(6, 2, generator=g) * torch.tensor([w / 2, h / 2])
        wh = 20 + torch.rand(6, 2, generator=g) * torch.tensor([w / 3, h / 3])
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh], 1).to(dev),
                "source": torch.tensor(k, device=dev),
                "labels": (torch.randint(1, 7, (6,), generator=g) + 4 * k).to(dev),
            }
        )
    images = [im.to(dev) for im in images]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def stepper(net, bf16: bool):
        net = net.to(dev)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.001, momentum=0.9)
        net.train()

        def step() -> float:
            sync()
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = sum(net(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync()
            return time.perf_counter() - t

        return step

    def timed_pair(ours_net, ref_net, bf16: bool) -> tuple[float, float]:
        """Median step of each, interleaved and in alternating order, after one warm-up step
        each (timed one after the other, the same ResNet-50 model took 31.1 s when it ran
        first and 24.6 s when it ran second here)."""
        a, b = stepper(ours_net, bf16), stepper(ref_net, bf16)
        a(), b()
        times = {"a": [], "b": []}
        for i in range(steps):
            order = (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))
            for name, step in order:
                times[name].append(step())
        return float(np.median(times["a"])), float(np.median(times["b"]))

    modes = {"off": [False], "on": [True], "both": [False, True]}[amp]
    print(
        f"\n| training step on {device} (batch 2, 800-px short side, median of {steps}, "
        "interleaved) "
        "| bf16 autocast | GroupSoftmax | torchvision | ratio | images/s (ours) |"
    )
    print("|---|---|---|---|---|---|")
    builders = (
        ("resnet50_fpn", tvd.fasterrcnn_resnet50_fpn),
        ("mobilenet_v3_large_fpn", tvd.fasterrcnn_mobilenet_v3_large_fpn),
    )
    for backbone, builder in builders:
        for bf16 in modes:
            torch.manual_seed(0)
            ours_net = build_faster_rcnn(backbone, len(classes) + 1, 2, table)
            torch.manual_seed(0)
            ref_net = builder(weights=None, weights_backbone=None, num_classes=len(classes) + 1)
            ours, ref = timed_pair(ours_net, ref_net, bf16)
            del ours_net, ref_net
            print(
                f"| {backbone} | {'on' if bf16 else 'off'} | {ours:.3f} s | {ref:.3f} s "
                f"| {ours / ref:.2f}× | {len(images) / ours:.1f} |"
            )
    print("(target ≤ 1.05×; the issue measured 0.90× for ResNet-50-FPN at 512 px on this CPU)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="annotations,text,loader,step")
    parser.add_argument("--images", type=int, default=118_287, help="COCO file size")
    parser.add_argument("--pairs", type=int, default=MNLI_PAIRS)
    parser.add_argument("--jpegs", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="step section")
    parser.add_argument("--amp", default="off", choices=["off", "on", "both"], help="bf16 autocast")
    args = parser.parse_args()
    only = set(args.only.split(","))
    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers, 2 CPUs
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="zoo-data-scale-") as tmp:
        if "annotations" in only:
            import coco_annotations

            coco_annotations.section(args.images, repeat=args.repeat)
        if "text" in only:
            text_section(Path(tmp), args.pairs)
        if "loader" in only:
            loader_section(Path(tmp), args.jpegs, args.repeat)
        if "step" in only:
            step_section(args.steps, args.device, args.amp)


if __name__ == "__main__":
    main()
