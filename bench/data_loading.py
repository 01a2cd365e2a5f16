"""Benchmark 3D data loading with `cache: none | memory | disk` on MRNet-v1.0 and on a NIfTI folder.

Writes a synthetic dataset in each real on-disk format into a temporary folder:

- MRNet-v1.0: `train/sagittal/NNNN.npy`, uint8 `(slices, 256, 256)`, slice counts drawn from
  `--mrnet-slices` (the label CSVs too); loaded by `MRNetDataModule` at the paper's 256×256×32;
- NIfTI: `<patient>.nii.gz`, CT-like int16 volumes (air, an elliptic body of soft tissue with noise,
  a bone), `scl_inter = -1024`, LPS axes; loaded by `NiftiDataModule` as 64³ centre patches, window
  [-1000, 1000] HU.

For every dataset, `num_workers` and cache mode, one fresh Python process builds the DataModule
(`setup("fit")`, which fills a `cache: memory`) and iterates every batch of `train_dataloader()`
for `--epochs` epochs. A `cache: disk` run starts from an empty `cache_dir` (it fills during
epoch 1); then a second process (`disk_reuse`, batch size `--reuse-batch-size` as a later stage
might use) opens the same `cache_dir`. Before every process the dataset files (and, for
`disk_reuse`, the cache files) are dropped from the OS page cache (`posix_fadvise(DONTNEED)`), so
epoch 1 reads from the disk as a fresh training run would. Each process counts how often a file is
decoded (`LoadImageFile` calls, in the main process and in the loader workers), which shows what
each mode caches, and reports the bytes each cache holds per image beside the image's own size.
Prints one JSON object.

    python bench/data_loading.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe_machine  # bench/machine.py: scripts run from bench/ on sys.path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "memory", "disk", "disk_reuse")
LPS_SPACING = np.diag([-0.8, -0.8, 1.5, 1.0])  # 0.8 mm pixels, 1.5 mm slices, DICOM's LPS axes


def write_mrnet(root: Path, n_cases: int, slices: tuple[int, int], seed: int) -> dict:
    """MRNet-v1.0 training cases of the sagittal plane: `root/train/sagittal/NNNN.npy`, uint8 (slices, 256, 256)."""
    rng = np.random.default_rng(seed)
    folder = root / "train" / "sagittal"
    folder.mkdir(parents=True)
    counts = []
    for case in range(n_cases):
        n = int(rng.integers(slices[0], slices[1] + 1))
        coarse = rng.random((n, 16, 16), dtype=np.float32)  # smooth anatomy-like texture plus noise
        volume = 20 + 200 * np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)
        volume += 8 * rng.standard_normal(volume.shape, dtype=np.float32)
        np.save(folder / f"{case:04d}.npy", np.clip(volume, 0, 255).astype(np.uint8))
        counts.append(n)
    for task in ("abnormal", "acl", "meniscus"):  # not read by the loader, as in the real download
        (root / f"train-{task}.csv").write_text("".join(f"{c:04d},{c % 2}\n" for c in range(n_cases)))
    return {"cases": n_cases, "slices_min_max_mean": [min(counts), max(counts), float(np.mean(counts))]}


def write_nifti(root: Path, n_volumes: int, shape: tuple[int, int, int], seed: int) -> dict:
    """CT-like `root/ctNNN.nii.gz`: int16 stored values, HU = value - 1024, LPS affine."""
    import nibabel

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    x, y = np.meshgrid(*(np.linspace(-1, 1, s, dtype=np.float32) for s in shape[:2]), indexing="ij")
    for index in range(n_volumes):
        a, b = rng.uniform(0.6, 0.9), rng.uniform(0.5, 0.75)
        body = ((x / a) ** 2 + (y / b) ** 2 < 1)[..., None]
        bone = (((x - rng.uniform(-0.3, 0.3)) ** 2 + (y - rng.uniform(-0.2, 0.2)) ** 2) < 0.01)[..., None]
        hu = np.where(body, np.where(bone, 700.0, 40.0), -1000.0).astype(np.float32)
        hu = np.broadcast_to(hu, shape) + 20 * rng.standard_normal(shape, dtype=np.float32)
        image = nibabel.Nifti1Image(np.round(hu + 1024).astype(np.int16), LPS_SPACING)
        image.header.set_slope_inter(1.0, -1024.0)
        nibabel.save(image, root / f"ct{index:03d}.nii.gz")
    return {"volumes": n_volumes, "shape": list(shape), "dtype": "int16"}


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def evict(*folders: Path) -> None:
    """Drop every file under `folders` from the OS page cache, so the next read comes from the disk."""
    os.sync()
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


# --- one measurement, in its own process ------------------------------------------------------


def worker(spec: dict) -> None:
    """Build one DataModule, iterate its training loader `epochs` times; print a JSON line."""
    start = time.perf_counter()
    from memwatch.datamodules import MRNetDataModule, NiftiDataModule, folder

    import_s = time.perf_counter() - start
    counter = Path(spec["counter"])
    counter.write_text("")
    decode = folder.LoadImageFile.__call__

    def counted(self, record):  # one line per decoded file, from any process (appends are atomic)
        with counter.open("a") as handle:
            handle.write(f"{os.getpid()}\n")
        return decode(self, record)

    folder.LoadImageFile.__call__ = counted  # both datasets decode through it; forked workers see it too

    def decodes() -> int:
        return len(counter.read_text().splitlines())

    module = MRNetDataModule if spec["dataset"] == "mrnet" else NiftiDataModule
    start = time.perf_counter()
    data = module(
        spec["root"],
        spatial_size=spec["spatial_size"],
        batch_size=spec["batch_size"],
        num_workers=spec["num_workers"],
        cache=spec["cache"],
        **({"split": "seeded"} if spec["dataset"] == "mrnet" else {}),
        cache_dir=spec["cache_dir"],
    )
    data.setup("fit")
    setup_s = time.perf_counter() - start
    result = {
        "import_s": import_s,
        "setup_s": setup_s,
        "decodes_at_setup": decodes(),
        "n_train": len(data.train_records),
        "n_val": len(data.val_records),
        "epochs": [],
    }
    loader = data.train_dataloader()
    shape = None
    for _ in range(spec["epochs"]):
        before = decodes()
        start = time.perf_counter()
        images = batches = 0
        for batch in loader:
            images += batch["image"].shape[0]
            batches += 1
            shape = list(batch["image"].shape[1:])
        seconds = time.perf_counter() - start
        result["epochs"].append(
            {"seconds": seconds, "images": images, "batches": batches, "images_per_s": images / seconds,
             "decodes": decodes() - before}
        )  # fmt: skip
    result["image_shape"] = shape
    result["image_mib"] = 4 * int(np.prod(shape)) / 2**20  # one float32 image as the batch holds it
    if spec["cache"] == "memory":  # what the cache holds: a tensor keeps its whole storage alive
        images = [item["image"] for item in data.memory_cache("train")]
        storages = {image.untyped_storage().data_ptr(): image.untyped_storage().nbytes() for image in images}
        result["train_cache_tensor_mib"] = sum(image.nbytes for image in images) / 2**20
        result["train_cache_storage_mib"] = sum(storages.values()) / 2**20
    if spec["cache"] == "disk":
        files = list(Path(spec["cache_dir"]).rglob("*.pt"))
        result["cache_files"] = len(files)
        result["cache_dir_mib"] = sum(f.stat().st_size for f in files) / 2**20
        result["cache_file_mib_per_image"] = result["cache_dir_mib"] / max(1, len(files))
    del loader  # stops persistent workers before their peak RSS is read
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_children_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


def measure(spec: dict) -> dict:
    """Run `worker(spec)` in a fresh process; its JSON line plus the load average around it."""
    load_before = os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_1min_before_after"] = [load_before, os.getloadavg()[0]]
    return result


def total_s(run: dict) -> float:
    return run["setup_s"] + sum(epoch["seconds"] for epoch in run["epochs"])


def speedups(runs: dict) -> dict:
    """Epoch time of `cache: none` divided by each cached mode's, per epoch; and for set-up + all epochs."""
    none = runs.get("none", {})
    if "error" in none:
        return {}
    out = {}
    for mode in MODES[1:]:
        run = runs.get(mode, {})
        if "error" in run or not run:
            continue
        # per image, since disk_reuse may use another batch size (the same images either way)
        out[mode] = {
            f"epoch{i + 1}": (n["seconds"] / n["images"]) / (c["seconds"] / c["images"])
            for i, (n, c) in enumerate(zip(none["epochs"], run["epochs"], strict=True))
        }
        out[mode]["setup_plus_epochs"] = total_s(none) / total_s(run)
    return out


def main(opts: argparse.Namespace) -> None:
    result = {
        "benchmark": "data_loading",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": describe_machine(("torch", "monai", "numpy")),
        "settings": {
            k: getattr(opts, k)
            for k in (
                "mrnet_cases",
                "mrnet_slices",
                "mrnet_size",
                "nifti_volumes",
                "nifti_shape",
                "nifti_size",
                "batch_size",
                "reuse_batch_size",
                "workers",
                "epochs",
                "seed",
                "datasets",
            )
        },  # fmt: skip
        "load_1min_at_start": os.getloadavg()[0],
        "data": {},
        "results": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memwatch-bench-") as tmp:
        tmp = Path(tmp)
        roots = {"mrnet": tmp / "MRNet-v1.0", "nifti": tmp / "nifti"}
        sizes = {"mrnet": opts.mrnet_size, "nifti": opts.nifti_size}
        for name in opts.datasets:
            start = time.perf_counter()
            if name == "mrnet":
                info = write_mrnet(roots[name], opts.mrnet_cases, tuple(opts.mrnet_slices), opts.seed)
                info["bytes"] = folder_bytes(roots[name], "*.npy")
            else:
                info = write_nifti(roots[name], opts.nifti_volumes, tuple(opts.nifti_shape), opts.seed)
                info["bytes"] = folder_bytes(roots[name], "*.nii.gz")
                voxels = opts.nifti_volumes * int(np.prod(opts.nifti_shape))
                info["gzip_ratio"] = 2 * voxels / info["bytes"]
            info["write_s"] = time.perf_counter() - start
            result["data"][name] = info
        for name in opts.datasets:
            result["results"][name] = {}
            for workers in opts.workers:
                runs = {}
                cache_dir = tmp / "cache" / f"{name}-workers{workers}"
                for mode in MODES:
                    spec = {
                        "dataset": name, "root": str(roots[name]), "spatial_size": sizes[name],
                        "batch_size": opts.reuse_batch_size if mode == "disk_reuse" else opts.batch_size,
                        "num_workers": workers, "cache": "disk" if mode == "disk_reuse" else mode,
                        "cache_dir": str(cache_dir), "epochs": opts.epochs, "counter": str(tmp / "decodes.txt"),
                    }  # fmt: skip
                    evict(roots[name], *([cache_dir] if mode == "disk_reuse" and cache_dir.exists() else []))
                    runs[mode] = measure(spec)
                    print(json.dumps({"done": [name, workers, mode], "epochs": [e["seconds"] for e in
                                      runs[mode].get("epochs", [])], "error": runs[mode].get("error")}),
                          file=sys.stderr, flush=True)  # fmt: skip
                runs["speedup_over_none_per_image"] = speedups(runs)
                result["results"][name][f"num_workers_{workers}"] = runs
    result["total_s"] = time.perf_counter() - started
    result["load_1min_at_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=["mrnet", "nifti"], default=["mrnet", "nifti"])
    parser.add_argument(
        "--mrnet-cases", type=int, default=50, help="sagittal training cases (paper split: 4/5 train)"
    )
    parser.add_argument(
        "--mrnet-slices", type=int, nargs=2, default=[20, 50], help="slice count range per case"
    )
    parser.add_argument(
        "--mrnet-size", type=int, nargs=3, default=[256, 256, 32], help="spatial_size (paper's)"
    )
    parser.add_argument(
        "--nifti-volumes", type=int, default=30, help="one volume per patient; 20%% validation"
    )
    parser.add_argument(
        "--nifti-shape", type=int, nargs=3, default=[256, 256, 128], help="voxels of each file"
    )
    parser.add_argument("--nifti-size", type=int, nargs=3, default=[64, 64, 64], help="spatial_size (patch)")
    parser.add_argument("--batch-size", type=int, default=2, help="as configs/*_ae.yaml")
    parser.add_argument(
        "--reuse-batch-size", type=int, default=4, help="batch size of the disk_reuse process"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    if options.worker:
        worker(json.loads(options.worker))
    else:
        main(options)
