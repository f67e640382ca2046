"""Sparse 3-D convolution benchmark: zoo.sparse against spconv 2.3.8 (CPU) and against our own
pure-PyTorch reference, on a full-size generated LiDAR scan, as ratios measured in this run.

    python benchmarks/sparse_conv.py            # ~120k points, ~100k voxels (SemanticKITTI size)
    python benchmarks/sparse_conv.py --quick    # a smaller scan, a smoke run
    python benchmarks/sparse_conv.py --device cuda   # on a GPU: ours against spconv's CUDA build

Measured (each the median of repeated calls after a warm-up):

1. kernel-map construction (submanifold 3x3x3 over the scan): ``zoo.kernels.sparse_kernel_map``
   against ``spconv.pytorch.ops.get_indice_pairs``;
2. the forward of the network of spconv's docs/BENCHMARK.md (14 SubM layers and 6 max-pools,
   3 -> 64 -> ... -> 256 channels, no bias), kernel maps included (a new sparse tensor per call);
3. that network's forward + backward against the same layers run on the reference (gather,
   ``mm``, ``index_add_``) — spconv's CPU build cannot run a backward on torch's CUDA wheel
   without a GPU (it calls ``torch.cuda.current_stream()``);
4. GFLOP/s of the convolutions (2 x pairs x C_in x C_out) against this machine's float32 GEMM;
5. the peak memory of a MinkUNet-W32 training step on the scan, against its features plus
   kernel maps (in a fresh process, from ``ru_maxrss``);
6. the SemanticKITTI loader on a generated sequence of full-size scans (``.bin`` + ``.label``,
   read, learning-mapped, augmented and batched) and a MinkUNet-W32 training step on them.

The scan is written by the SemanticKITTI demo generator (zoo.data.demo.semantickitti) into a
temporary folder and read back as a ``.bin``, as the loader reads it.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kernel_bench  # noqa: E402  (benchmarks/kernels.py)

import zoo.kernels as K  # noqa: E402
import zoo.sparse as zs  # noqa: E402
from zoo.data.demo.semantickitti import make_scan  # noqa: E402
from zoo.data.semantickitti import read_scan  # noqa: E402

RANGE = (-51.2, -51.2, -4.0, 51.2, 51.2, 2.4)  # mmdetection3d's SemanticKITTI range
CHANNELS = [64, 96, 128, 160, 192, 224, 256]  # spconv's benchmark network


# the kernel benchmark's timer (median after warm-up calls), with a longer default budget
timeit = functools.partial(kernel_bench.timeit, min_time=1.0, max_reps=20)


def scan_voxels(quick: bool, folder: Path, voxel: float) -> tuple[np.ndarray, np.ndarray, list]:
    """A generated scan written as a .bin and read back; (voxel features xyz [N, 3], indices
    int32 [N, 4], spatial shape)."""
    density = 30.0 if quick else 140.0
    points, _ = make_scan(0, 0, extent=51.2, density=density)
    path = folder / "000000.bin"
    points.astype("<f4").tofile(path)
    points = torch.from_numpy(read_scan(path))
    vox = zs.voxelize(points, voxel, RANGE)
    t = vox.tensor
    print(f"scan: {len(points):,} points -> {len(t.indices):,} voxels of {voxel} m")
    print(f"  grid {t.spatial_shape}")
    return t.features[:, :3].contiguous().numpy(), t.indices.numpy(), t.spatial_shape


def zoo_net() -> nn.Module:
    layers: list[nn.Module] = []
    c = 3
    for i, width in enumerate(CHANNELS):
        layers += [
            zs.SubMConv3d(c, width, 3, bias=False),
            zs.SubMConv3d(width, width, 3, bias=False),
        ]
        if i < len(CHANNELS) - 1:
            layers.append(zs.SparseMaxPool3d(2, 2))
        c = width
    return zs.SparseSequential(*layers)


def spconv_net(ours: nn.Module) -> nn.Module:
    """spconv's benchmark network with our weights (spconv 2 keeps [out, kz, ky, kx, in])."""
    import spconv.pytorch as sp

    layers, i = [], 0
    for layer in ours:
        if isinstance(layer, zs.SubMConv3d):
            conv = sp.SubMConv3d(
                layer.in_channels, layer.out_channels, 3, bias=False, indice_key=f"c{i // 2}"
            )
            with torch.no_grad():
                conv.weight.copy_(layer.weight.permute(0, 2, 3, 4, 1))
            layers.append(conv)
            i += 1
        else:
            layers.append(sp.SparseMaxPool3d(2, 2))
    return sp.SparseSequential(*layers)


def conv_flops(net: nn.Module, x: zs.SparseTensor) -> float:
    """2 x pairs x C_in x C_out over the network's convolutions (pairs: the maps' entries)."""
    flops = 0.0
    for layer in net:
        before = x
        x = layer(x) if isinstance(layer, zs.SparseModule) else x
        if isinstance(layer, zs.SubMConv3d):
            key = ("subm", before.coord_key, (3, 3, 3), (1, 1, 1))
            nbr = before.maps.maps[key][1]
            flops += 2.0 * int((nbr >= 0).sum()) * layer.in_channels * layer.out_channels
    return flops


def gemm_gflops(device: str) -> float:
    a = torch.randn(8192, 256, device=device)
    b = torch.randn(256, 256, device=device)
    t = timeit(lambda: a @ b, device, 0.5, 50)
    return 2 * 8192 * 256 * 256 / t / 1e9


def memory_step(scan: Path, voxel: float) -> dict:
    """In a fresh process: max RSS before and after a MinkUNet-W32 training step."""
    code = f"""
import json, resource, torch
import zoo.sparse as zs
from zoo.data.semantickitti import read_scan
from zoo.models.components.minkunet import MinkUNet
torch.manual_seed(0)
points = torch.from_numpy(read_scan({str(scan)!r}))
net = MinkUNet(4, 19, 32, (32, 64, 128, 256), (256, 128, 96, 96))
vox = zs.voxelize(points, {voxel}, {RANGE!r})
warm = zs.voxelize(points[:2000], {voxel}, {RANGE!r})
net(warm.tensor).sum().backward()  # allocator and library warm-up on a small input
net.zero_grad()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = vox.tensor
logits = net(x)
loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))
loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
maps = x.maps.nbytes()
print(json.dumps({{"voxels": len(x.indices), "before_kib": before, "after_kib": after,
                  "maps_bytes": maps, "input_bytes": x.features.numel() * 4}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--voxel", type=float, default=0.05)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    K.set_backend("compiled")
    K.backend()
    device = args.device
    try:
        import spconv

        have_spconv = True
        spconv_version = spconv.__version__
    except ImportError:
        have_spconv, spconv_version = False, "not installed (pip install 'spconv==2.3.8')"
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, device {device}, spconv {spconv_version}"
    )
    with tempfile.TemporaryDirectory(prefix="zoo-sparse-bench-") as tmp:
        feats, coords, shape = scan_voxels(args.quick, Path(tmp), args.voxel)
        features = torch.from_numpy(feats).to(device)
        indices = torch.from_numpy(coords).to(device)

        # 1. kernel maps
        ours_map = timeit(
            lambda: K.sparse_kernel_map(indices, shape, 3, 1, 1, 1, subm=True), device
        )
        if have_spconv:
            from spconv.core import ConvAlgo
            from spconv.pytorch import ops

            algo = ConvAlgo.Native

            def spconv_map():
                ops.get_indice_pairs(
                    indices, 1, shape, algo, [3] * 3, [1] * 3, [1] * 3, [1] * 3, [0] * 3, subm=True
                )

            theirs = timeit(spconv_map, device)
            print(
                f"kernel map (subm 3x3x3): ours {ours_map * 1e3:.1f} ms, spconv "
                f"{theirs * 1e3:.1f} ms: {theirs / ours_map:.2f}x faster (target >= 3x)"
            )
        else:
            print(f"kernel map (subm 3x3x3): ours {ours_map * 1e3:.1f} ms (spconv not installed)")

        # 2. the network's forward, maps included
        torch.manual_seed(0)
        net = zoo_net().to(device).eval()

        def ours_forward():
            with torch.no_grad():
                return net(zs.SparseTensor(features, indices, shape, 1, _checked=True))

        t_ours = timeit(ours_forward, device)
        out = ours_forward()
        print(
            f"network forward (14 SubM + 6 max-pool, maps included): ours {t_ours * 1e3:.0f} ms, "
            f"{len(out.indices):,} output voxels"
        )
        if have_spconv:
            import spconv.pytorch as sp

            theirs_net = spconv_net(net).to(device).eval()

            def spconv_forward():
                with torch.no_grad():
                    return theirs_net(sp.SparseConvTensor(features, indices, shape, 1))

            t_sp = timeit(spconv_forward, device)
            ref = spconv_forward()
            same = torch.equal(
                torch.sort(zs_keys(out.indices, out.spatial_shape)).values,
                torch.sort(zs_keys(ref.indices.int(), out.spatial_shape)).values,
            )
            print(
                f"  spconv {t_sp * 1e3:.0f} ms: ours is {t_sp / t_ours:.2f}x faster "
                f"(target >= 3x); same output sites: {same}"
            )
        # 3. forward + backward, against the reference
        train_net = zoo_net().to(device)
        train_net.load_state_dict(net.state_dict())
        feats_grad = features.clone().requires_grad_()

        def fwd_bwd():
            train_net.zero_grad()
            y = train_net(zs.SparseTensor(feats_grad, indices, shape, 1, _checked=True))
            y.features.square().mean().backward()

        t_fb = timeit(fwd_bwd, device)
        with K.backend_as("reference"):
            t_ref = timeit(fwd_bwd, device, min_time=0.0, max_reps=3)
        print(
            f"network forward+backward: ours {t_fb * 1e3:.0f} ms, reference "
            f"{t_ref * 1e3:.0f} ms: {t_ref / t_fb:.2f}x faster (target >= 5x)"
        )

        # 4. GFLOP/s
        x = zs.SparseTensor(features, indices, shape, 1, _checked=True)
        with torch.no_grad():
            flops = conv_flops(net, x)
        gemm = gemm_gflops(device)
        print(
            f"convolutions: {flops / 1e9:.1f} GFLOP per forward -> {flops / t_ours / 1e9:.1f} "
            f"GFLOP/s over the whole forward (maps and pools included); machine float32 GEMM "
            f"(8192x256 @ 256x256) {gemm:.0f} GFLOP/s"
        )

        # 6. the loader and a training step at full size
        if device == "cpu":
            loader_and_step(Path(tmp), args.quick, args.voxel)

        # 5. memory
        if device == "cpu":
            scan = Path(tmp) / "000000.bin"
            m = memory_step(scan, args.voxel)
            step = (m["after_kib"] - m["before_kib"]) / 1024
            print(
                f"memory: MinkUNet-W32 training step on {m['voxels']:,} voxels: peak RSS grew "
                f"{step:.0f} MiB; input features {m['input_bytes'] / 2**20:.1f} MiB, kernel "
                f"maps {m['maps_bytes'] / 2**20:.1f} MiB"
            )


def loader_and_step(tmp: Path, quick: bool, voxel: float) -> None:
    from zoo.data.demo.semantickitti import write_demo_semantickitti
    from zoo.data.semantickitti import SemanticKITTIDataModule
    from zoo.models.components.minkunet import MinkUNet

    n = 4 if quick else 20
    density = 30.0 if quick else 140.0
    t0 = time.perf_counter()
    root = write_demo_semantickitti(tmp / "kitti", {0: n, 8: 1}, extent=51.2, density=density)
    written = time.perf_counter() - t0
    dm = SemanticKITTIDataModule(
        str(root), {"train": [0], "val": [8], "test": [8]}, voxel_size=voxel, batch_size=2
    )
    dm.setup("fit")
    sizes = [f.stat().st_size // 16 for f in dm.datasets["train"].files]
    t0 = time.perf_counter()
    batches = list(dm.train_dataloader())
    read = time.perf_counter() - t0
    print(
        f"loader: {n} scans of {np.mean(sizes):,.0f} points on average (written in {written:.1f} s)"
        f": {n / read:.1f} scans/s read, mapped, augmented and batched in one process "
        f"({read / n * 1e3:.0f} ms per scan)"
    )
    torch.manual_seed(0)
    net = MinkUNet(4, 19, 32, (32, 64, 128, 256), (256, 128, 96, 96))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step(batch):
        vox = zs.voxelize(batch["points"], voxel, RANGE, batch["batch"], batch["batch_size"])
        logits = zs.devoxelize(net(vox.tensor), vox.point_voxel)
        labels = torch.where(vox.point_voxel >= 0, batch["labels"], -1)
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up
    times = []
    for batch in batches[1:4]:
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    print(
        f"training step, MinkUNet-W32, batch of 2 full-size scans (voxelize, forward, backward, "
        f"AdamW): {statistics.median(times):.2f} s (median of {len(times)})"
    )


def zs_keys(indices: torch.Tensor, shape) -> torch.Tensor:
    from zoo.kernels.reference import coordinate_keys

    return coordinate_keys(indices, shape)


if __name__ == "__main__":
    main()
