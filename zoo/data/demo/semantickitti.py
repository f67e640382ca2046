"""Write generated street scenes in SemanticKITTI's exact on-disk format.

Each scan is what a roof-mounted LiDAR (1.73 m up, as on KITTI's car) sees of a street: road,
lane markings, sidewalks, terrain, building facades, parked and moving cars, poles with traffic
signs, trees (trunk and crown), bushes, fences and people. Points are drawn on each surface with
a density that falls off with distance as a LiDAR's does, plus range noise; remission differs by
material. Labels are SemanticKITTI's raw ids (the learning map folds lane markings into road and
moving cars into car), with instance ids in the upper 16 bits for objects. The classes are
learnable from geometry (height, shape, size) and remission.

    <data_dir>/sequences/00/velodyne/000000.bin, labels/000000.label, ...   training
    <data_dir>/sequences/08/...                                             validation
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zoo.data.demo import manifest_matches, publish, staging_dir

GENERATOR_VERSION = 1
SENSOR_HEIGHT = 1.73

# raw SemanticKITTI ids and each material's remission (mean, sd)
RAW = {
    "road": 40,
    "lane": 60,
    "sidewalk": 48,
    "terrain": 72,
    "building": 50,
    "car": 10,
    "moving_car": 252,
    "pole": 80,
    "sign": 81,
    "trunk": 71,
    "vegetation": 70,
    "fence": 51,
    "person": 30,
    "unlabeled": 0,
}
REMISSION = {
    "road": (0.18, 0.04),
    "lane": (0.75, 0.08),
    "sidewalk": (0.32, 0.05),
    "terrain": (0.42, 0.08),
    "building": (0.36, 0.06),
    "car": (0.12, 0.06),
    "moving_car": (0.12, 0.06),
    "pole": (0.55, 0.07),
    "sign": (0.92, 0.04),
    "trunk": (0.30, 0.05),
    "vegetation": (0.50, 0.10),
    "fence": (0.45, 0.06),
    "person": (0.25, 0.06),
    "unlabeled": (0.2, 0.15),
}


class _Scene:
    def __init__(self, rng: np.random.Generator, extent: float, density: float):
        self.rng, self.extent, self.density = rng, extent, density
        self.parts: list[tuple[np.ndarray, int]] = []
        self.instances = 0

    def add(self, xyz: np.ndarray, kind: str, instance: bool = False) -> None:
        """Surface points of one class; kept with a LiDAR's distance fall-off."""
        r = np.linalg.norm(xyz[:, :2], axis=1)
        keep = self.rng.random(len(xyz)) < np.minimum(1.0, (6.0 / np.maximum(r, 1.0)) ** 2)
        keep &= r < self.extent
        xyz = xyz[keep]
        inst = 0
        if instance:
            self.instances += 1
            inst = self.instances
        mean, sd = REMISSION[kind]
        rem = np.clip(self.rng.normal(mean, sd, len(xyz)), 0, 1)
        label = np.full(len(xyz), RAW[kind] | (inst << 16), dtype=np.uint32)
        self.parts.append((np.column_stack([xyz, rem]).astype(np.float32), label))

    def n(self, area: float) -> int:
        return max(1, int(area * self.density))

    def plane(self, x0, x1, y0, y1, z=-SENSOR_HEIGHT, noise=0.02) -> np.ndarray:
        n = self.n((x1 - x0) * (y1 - y0))
        x, y = self.rng.uniform(x0, x1, n), self.rng.uniform(y0, y1, n)
        return np.column_stack([x, y, z + self.rng.normal(0, noise, n)])

    def box(self, cx, cy, z0, lx, ly, lz, yaw=0.0, top=True) -> np.ndarray:
        """Points on a box's sides (and top)."""
        faces = []
        for sx, ly_, lz_ in ((lx, ly, lz), (ly, lx, lz)):
            n = self.n(2 * ly_ * lz_)
            u, w = self.rng.uniform(-ly_ / 2, ly_ / 2, n), self.rng.uniform(0, lz_, n)
            side = self.rng.choice([-1, 1], n) * sx / 2
            faces.append(
                np.column_stack([side, u, w]) if sx == lx else np.column_stack([u, side, w])
            )
        if top:
            n = self.n(lx * ly)
            faces.append(
                np.column_stack(
                    [
                        self.rng.uniform(-lx / 2, lx / 2, n),
                        self.rng.uniform(-ly / 2, ly / 2, n),
                        np.full(n, lz),
                    ]
                )
            )
        p = np.concatenate(faces)
        c, s = np.cos(yaw), np.sin(yaw)
        x, y = c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]
        return np.column_stack([x + cx, y + cy, p[:, 2] + z0])

    def cylinder(self, cx, cy, z0, radius, height) -> np.ndarray:
        n = self.n(2 * np.pi * radius * height * 4)
        a, h = self.rng.uniform(0, 2 * np.pi, n), self.rng.uniform(0, height, n)
        return np.column_stack([cx + radius * np.cos(a), cy + radius * np.sin(a), z0 + h])

    def ellipsoid(self, cx, cy, cz, rx, ry, rz) -> np.ndarray:
        n = self.n(4 * np.pi * (rx * ry + ry * rz + rx * rz) / 3)
        v = self.rng.normal(size=(n, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v *= self.rng.uniform(0.85, 1.0, (n, 1))  # a crown is leafy, not a shell
        return v * [rx, ry, rz] + [cx, cy, cz]


def make_scan(seed: int, index: int, extent: float = 24.0, density: float = 14.0):
    """One scan: (points float32 [N, 4], labels uint32 [N]), with the sensor at the origin on a
    street along x."""
    rng = np.random.default_rng([seed, index])
    sc = _Scene(rng, extent, density)
    g = -SENSOR_HEIGHT
    e = extent
    road, walk = rng.uniform(3.5, 5.0), rng.uniform(1.8, 3.0)
    sc.add(sc.plane(-e, e, -road, road), "road")
    for side in (-1, 1):
        sc.add(sc.plane(-e, e, side * 1.7 - 0.06, side * 1.7 + 0.06, g + 0.005), "lane")
        y0, y1 = sorted((side * road, side * (road + walk)))
        sc.add(sc.plane(-e, e, y0, y1, g + 0.15), "sidewalk")
        t0, t1 = sorted((side * (road + walk), side * e))
        sc.add(sc.plane(-e, e, t0, t1, g + 0.05, noise=0.08), "terrain")
        # building facades set back from the sidewalk, with gaps between them
        x = -e
        while x < e:
            length = rng.uniform(6, 16)
            if rng.random() < 0.75:
                depth, height = rng.uniform(6, 10), rng.uniform(5, 14)
                cy = side * (road + walk + rng.uniform(3, 7) + depth / 2)
                sc.add(sc.box(x + length / 2, cy, g, length, depth, height, top=False), "building")
            else:  # a fence in the gap
                fy = side * (road + walk + rng.uniform(0.5, 2))
                n = sc.n(length * 1.2)
                fence = np.column_stack(
                    [
                        rng.uniform(x, x + length, n),
                        fy + rng.normal(0, 0.03, n),
                        g + rng.uniform(0, 1.2, n),
                    ]
                )
                sc.add(fence, "fence")
            x += length + rng.uniform(1, 5)
        # poles (some with a sign), trees and people on and beside the sidewalk
        for px in rng.uniform(-e, e, rng.integers(2, 5)):
            py = side * (road + 0.4)
            height = rng.uniform(4, 7)
            sc.add(sc.cylinder(px, py, g + 0.15, 0.09, height), "pole", instance=True)
            if rng.random() < 0.6:
                n = sc.n(0.6 * 0.6 * 12)
                plate = np.column_stack(
                    [
                        px + rng.normal(0, 0.01, n),
                        py + rng.uniform(-0.3, 0.3, n),
                        g + height - rng.uniform(0, 0.6, n),
                    ]
                )
                sc.add(plate, "sign", instance=True)
        for tx in rng.uniform(-e, e, rng.integers(3, 7)):
            ty = side * (road + walk + rng.uniform(0.5, 3))
            trunk_h = rng.uniform(1.5, 3)
            sc.add(sc.cylinder(tx, ty, g, rng.uniform(0.12, 0.25), trunk_h), "trunk", instance=True)
            r = rng.uniform(1.2, 2.5)
            sc.add(sc.ellipsoid(tx, ty, g + trunk_h + r * 0.8, r, r, r * 0.8), "vegetation")
        for bx in rng.uniform(-e, e, rng.integers(1, 4)):  # bushes on the terrain
            by = side * (road + walk + rng.uniform(1, 6))
            r = rng.uniform(0.5, 1.1)
            sc.add(sc.ellipsoid(bx, by, g + r * 0.6, r * 1.4, r, r * 0.6), "vegetation")
        for hx in rng.uniform(-e, e, rng.integers(0, 3)):
            hy = side * (road + rng.uniform(0.3, walk - 0.3))
            sc.add(sc.cylinder(hx, hy, g + 0.15, 0.22, rng.uniform(1.6, 1.9)), "person", True)
    # cars parked along the kerbs and driving in the lanes
    for _ in range(rng.integers(3, 8)):
        moving = rng.random() < 0.3
        side = rng.choice([-1, 1])
        cy = side * (rng.uniform(0.5, 1.2) if moving else road - 1.1)
        cx = rng.uniform(-e, e)
        if abs(cx) < 3 and abs(cy) < 2:
            continue  # not on the sensor's own car
        length, width, height = rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.9), rng.uniform(1.4, 1.6)
        car = sc.box(cx, cy, g + 0.25, length, width, height - 0.25, yaw=rng.normal(0, 0.05))
        sc.add(car, "moving_car" if moving else "car", instance=True)
    points = np.concatenate([p for p, _ in sc.parts])
    labels = np.concatenate([lab for _, lab in sc.parts])
    # range noise, and a few outliers left unlabeled, as in real scans
    points[:, :3] += rng.normal(0, 0.01, (len(points), 3)).astype(np.float32)
    n_out = len(points) // 200
    outliers = np.column_stack(
        [rng.uniform(-e, e, (n_out, 2)), rng.uniform(g, 3, n_out), rng.uniform(0, 1, n_out)]
    ).astype(np.float32)
    points = np.concatenate([points, outliers])
    labels = np.concatenate([labels, np.zeros(n_out, dtype=np.uint32)])
    order = rng.permutation(len(points))
    return points[order], labels[order]


def write_demo_semantickitti(
    data_dir: str | Path,
    sequences: dict[str, int] | None = None,
    seed: int = 0,
    extent: float = 24.0,
    density: float = 14.0,
) -> Path:
    """Write the demo into ``data_dir`` (reused when its ``demo.json`` matches): ``sequences``
    maps sequence numbers to their scan counts (default: 24 training scans in 00, 8 validation
    scans in 08)."""
    sequences = {int(k): int(v) for k, v in (sequences or {0: 24, 8: 8}).items()}
    out_dir = Path(data_dir)
    spec = {
        "generator": "semantickitti",
        "version": GENERATOR_VERSION,
        "sequences": {str(k): v for k, v in sorted(sequences.items())},
        "seed": seed,
        "extent": extent,
        "density": density,
    }
    if manifest_matches(out_dir, spec):
        return out_dir
    tmp = staging_dir(out_dir)
    for seq, count in sorted(sequences.items()):
        velodyne = tmp / "sequences" / f"{seq:02d}" / "velodyne"
        labels_dir = velodyne.parent / "labels"
        velodyne.mkdir(parents=True)
        labels_dir.mkdir()
        for i in range(count):
            points, labels = make_scan(seed, seq * 100_000 + i, extent, density)
            points.astype("<f4").tofile(velodyne / f"{i:06d}.bin")
            labels.astype("<u4").tofile(labels_dir / f"{i:06d}.label")
    return publish(tmp, out_dir, spec)
