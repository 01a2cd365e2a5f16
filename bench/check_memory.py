"""Peak memory of one memorization check against its number of samples (CPU, peak RSS, fresh processes).

    python bench/check_memory.py                                  # n_samples 64 and 1024, 64×64, batch 16
    python bench/check_memory.py --n-samples 64 1024 --size 128 --sample-batch-size 16
    python bench/check_memory.py --jobs 2                         # two workers at once, one core each

Each run is a fresh process: it builds a generator of seeded phantom variations (sample `i` a
function of `i`, like the LDM's) and a real `SimCLRModule` (ResNet-18-sized, random weights:
memory does not depend on training), warms up with one chunk, then runs the callback's
streaming check (`memorization.stream.embed_stream` with MS-SSIM pairs and kept copy
candidates) and reports the growth of the peak RSS over the warm-up. `held` runs the same
images through a control that keeps every sample, as the callback did before: the figure the
streaming check must not pay. Prints JSON; figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe_machine  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


EMBEDDERS = {
    "resnet18": dict(embedding_dim=128, resnet_block="basic", resnet_layers=(2, 2, 2, 2), channels=(64, 128, 256, 512)),
    "small": dict(embedding_dim=32, resnet_block="basic", resnet_layers=(1, 1, 1, 1), channels=(8, 16, 32, 64)),
}


def one_check(n_samples: int, size: int, sample_batch_size: int, mode: str, embedder_size: str) -> dict:
    import torch

    from memwatch.datamodules.phantom import render_phantom
    from memwatch.lightning_modules import SimCLRModule
    from memwatch.memorization.detect import nearest_correlation
    from memwatch.memorization.stream import blocks, embed_stream
    from memwatch.memorization.variation import vary

    torch.manual_seed(0)
    embedder = SimCLRModule(**EMBEDDERS[embedder_size]).eval()
    phantoms = [torch.from_numpy(render_phantom(f"phantom-{k:04d}", (size, size))) for k in range(16)]

    def sample(indices: range) -> torch.Tensor:
        return torch.stack([vary(phantoms[i % 16][None], seed=i)[0] for i in indices])

    reference = embedder.embed(sample(range(16)))
    options = dict(score_pairs=True, keep=16, rank_by=lambda e: nearest_correlation(e, reference))
    embed_stream(blocks(sample, range(sample_batch_size), sample_batch_size), embedder.embed, **options)
    before = peak_rss_mib()
    if mode == "streamed":
        result = embed_stream(blocks(sample, range(n_samples), sample_batch_size), embedder.embed, **options)
        kept = len(result.embeddings)
    else:  # the control: every sample held at once, then embedded chunk by chunk
        held = torch.cat(list(blocks(sample, range(n_samples), sample_batch_size)))
        kept = len(embed_stream(held.split(sample_batch_size), embedder.embed, **options).embeddings)
    assert kept == n_samples
    return {
        "mode": mode,
        "n_samples": n_samples,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "check_mib": round(peak_rss_mib() - before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--size", type=int, default=64, help="images are size × size")
    parser.add_argument("--sample-batch-size", type=int, default=16)
    parser.add_argument("--embedder", choices=sorted(EMBEDDERS), default="resnet18")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes at once, the cores shared among them")
    parser.add_argument("--worker", choices=["streamed", "held"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(one_check(args.n_samples[0], args.size, args.sample_batch_size, args.worker, args.embedder)))
        return
    figures: dict = {"size": [args.size, args.size], "sample_batch_size": args.sample_batch_size, "embedder": args.embedder}
    # A fixed mmap threshold: glibc's adaptive one keeps freed blocks resident, hiding new allocations.
    # Each worker measures only its own peak, so workers may run at once.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if args.jobs > 1:  # the cores shared out; one job keeps the caller's thread settings, as before --jobs
        environment["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))

    def run_worker(mode: str, n: int) -> dict:
        command = [sys.executable, __file__, "--worker", mode, "--n-samples", str(n), "--size", str(args.size),
                   "--sample-batch-size", str(args.sample_batch_size), "--embedder", args.embedder]  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
        return json.loads(output.strip().splitlines()[-1])

    runs = [(mode, n) for n in sorted(args.n_samples, reverse=True) for mode in ("streamed", "held")]  # longest first
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(runs, pool.map(lambda run: run_worker(*run), runs), strict=True))
    for mode in ("streamed", "held"):
        figures[mode] = [results[mode, n] for n in args.n_samples]
    first, last = figures["streamed"][0], figures["streamed"][-1]
    figures["streamed_peak_ratio"] = round(last["peak_rss_mib"] / first["peak_rss_mib"], 3)
    figures["held_peak_ratio"] = round(figures["held"][-1]["peak_rss_mib"] / figures["held"][0]["peak_rss_mib"], 3)
    figures["machine"] = describe_machine()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
