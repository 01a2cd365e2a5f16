"""How well each shipped embedder recipe finds planted copies in image families it was not built on.

    python bench/detector_quality.py                                  # every case, each at its recipe
    python bench/detector_quality.py --cases knee brain --steps 300   # the 3D cases, shorter training
    python bench/detector_quality.py --work-dir W --reuse-fits --margin 0.7   # audit W's embedders again
    python bench/detector_quality.py --cases vessels --n-train 32 --n-val 24 --n-copies 12 --n-novel 16 \
        --size 32 --steps 50                                          # a tiny run (the test suite's)

A case is a family of `bench/families.py` (2D: vessels, radiograph, tissue; 3D: knee, brain)
with a number of images per patient (follow-up scans) and a kind of novel image ("new" patients, or
"blend": the mean of two training patients, near both and a copy of neither). `tissue` and `brain`
are held back: never tuned on. For each case the benchmark writes a planted-copy set (`train/`,
`val/`, `synthetic/` of varied copies of training patients and novel images, `planted.json`), trains
the embedder with the real CLI on a config made of a real-data config's own `model:` section (the
recipe: `configs/chestxray_simclr.yaml` for 2D, `configs/mrnet_simclr.yaml` for 3D, or `--recipe`)
scaled for a CPU (`CPU_SCALE`: smaller ResNet stages, a learning rate for a thousand steps) and a
`FolderDataModule` over the set, then audits the synthetic folder with `python cli.py audit` once per
copy rule (`--rules`), and scores each audit's `pairs.csv` against `planted.json`:

- sensitivity = share of planted copies flagged; specificity = share of novel images not flagged;
  `attributed` = copies flagged and matched to their own training patient; `retrieved` = copies whose
  nearest training patient is their source, flagged or not; 95% Clopper–Pearson intervals;
- beside them what the audit *estimated* on its own data: the self-check's specificity and the
  chance level of copies (`null_frac_copies`), with the prediction interval of the false-positive
  rate that `n_novel` copy-nobody images would show; `estimate_holds` says whether the observed rate
  lies within it;
- `margin_sweep`: the distinct rule's sensitivity and specificity at other margins, recomputed from
  the audit's `correlation` and `other_patient_correlation` columns (τ does not depend on the margin).

Specificity is bounded by the threshold rule itself: τ is the 95th percentile of each training
image's nearest *held-out* correlation (N_val candidates), while a synthetic image is a copy when its
nearest *training* correlation (N_train candidates) reaches τ, so the default holds out as many
patients as it trains on.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.families import family_spatial_dims, write_planted_copy_set  # noqa: E402
from bench.machine import describe_machine  # noqa: E402
from memwatch.memorization.chance import prediction_interval  # noqa: E402
from memwatch.memorization.stats import binomial_interval  # noqa: E402
from scripts.launch import CliRun, run_cli  # noqa: E402


@dataclass(frozen=True)
class Case:
    family: str
    images_per_patient: int | tuple[int, int] = 1
    novel: str = "new"
    held_back: bool = False


CASES = {
    "vessels": Case("vessels"),
    "radiograph": Case("radiograph"),
    "tissue": Case("tissue", held_back=True),
    "radiograph_followups": Case("radiograph", images_per_patient=(2, 3)),
    "radiograph_blends": Case("radiograph", novel="blend"),
    "knee": Case("knee"),
    "knee_followups": Case("knee", images_per_patient=(2, 3)),
    "brain": Case("brain", held_back=True),
}
RECIPES = {2: "configs/chestxray_simclr.yaml", 3: "configs/mrnet_simclr.yaml"}
# What changes for a CPU and a thousand steps; everything else is the recipe's own model section.
CPU_SCALE = {
    "configs/chestxray_simclr.yaml": {
        "model": {"resnet_block": "basic", "resnet_layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256], "lr": 1e-3},
        "batch_size": 16,
    },
    **{
        f"configs/{name}_simclr.yaml": {
            "model": {"resnet_layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256], "lr": 1e-3},
            "batch_size": 10,
        }
        for name in ("mrnet", "nifti", "dicom")
    },
    "configs/folder_simclr.yaml": {"model": {}, "batch_size": 16},
}
DEFAULT_SIZE = {2: [64, 64], 3: [32, 32, 16]}
MARGIN_SWEEP = (1.0, 0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4)


def clopper_pearson(successes: int, trials: int) -> list[float]:
    """`memwatch.memorization.stats.binomial_interval` (exact, 95%) as a JSON-ready `[low, high]`, rounded to 4 places."""
    return [round(bound, 4) for bound in binomial_interval(successes, trials)]


def read_pairs(pairs_csv: Path, planted: dict) -> dict[str, dict]:
    """The audit's `pairs.csv` rows by synthetic id; `ValueError` when a planted synthetic id is missing."""
    with Path(pairs_csv).open(newline="") as handle:
        rows = {row["synthetic_id"]: row for row in csv.DictReader(handle)}
    missing = (set(planted["copies"]) | set(planted["novel"])) - set(rows)
    if missing:
        raise ValueError(f"{pairs_csv} lacks {len(missing)} planted synthetic ids, e.g. {sorted(missing)[:3]}")
    return rows


def score(pairs_csv: Path, planted: dict) -> dict:
    """Sensitivity, specificity and attribution of an audit's `pairs.csv` against a planted set's `planted.json`."""
    rows = read_pairs(pairs_csv, planted)
    return _score_flags(rows, planted, {s: row["is_copy"] == "True" for s, row in rows.items()})


def _score_flags(rows: dict[str, dict], planted: dict, flagged: dict[str, bool]) -> dict:
    copies, novel = planted["copies"], planted["novel"]
    source_patient = planted.get("copy_patients", copies)

    def nearest_patient(synthetic_id: str) -> str:
        row = rows[synthetic_id]
        return row.get("nearest_train_patient_id") or row["nearest_train_id"]

    found = sum(flagged[s] for s in copies)
    attributed = sum(flagged[s] and nearest_patient(s) == source_patient[s] for s in copies)
    retrieved = sum(nearest_patient(s) == source_patient[s] for s in copies)
    passed = sum(not flagged[s] for s in novel)

    def median_correlation(ids) -> float:
        return round(float(np.median([float(rows[s]["correlation"]) for s in ids])), 4)

    return {
        "sensitivity": round(found / len(copies), 4),
        "specificity": round(passed / len(novel), 4),
        "attributed": round(attributed / len(copies), 4),
        "retrieved": round(retrieved / len(copies), 4),
        "median_correlation_copies": median_correlation(copies),
        "median_correlation_novel": median_correlation(novel),
        "n_copies": len(copies),
        "n_copies_flagged": found,
        "n_copies_attributed": attributed,
        "n_novel": len(novel),
        "n_novel_flagged": len(novel) - passed,
        "sensitivity_ci": clopper_pearson(found, len(copies)),
        "specificity_ci": clopper_pearson(passed, len(novel)),
    }


def margin_sweep(pairs_csv: Path, planted: dict, tau: float, margins=MARGIN_SWEEP) -> list[dict]:
    """Sensitivity and specificity of the distinct rule at each margin, from one audit's correlations and τ."""
    rows = read_pairs(pairs_csv, planted)
    if "other_patient_correlation" not in next(iter(rows.values())):
        return []
    nearest = {s: float(row["correlation"]) for s, row in rows.items()}
    other = {s: float(row["other_patient_correlation"]) for s, row in rows.items()}
    sweep = []
    for margin in margins:
        flagged = {s: nearest[s] >= tau and (1 - nearest[s]) <= margin**2 * (1 - other[s]) for s in rows}
        scored = _score_flags(rows, planted, flagged)
        sweep.append({"margin": margin, **{k: scored[k] for k in ("sensitivity", "specificity")}})
    return sweep


def estimates_beside_observed(summary: dict, scored: dict) -> dict:
    """The audit's own estimates (self-check specificity, chance level of copies) beside the observed false positives."""
    n_novel = scored["n_novel"]
    observed = scored["n_novel_flagged"] / n_novel
    detector = summary.get("detector") or {}
    figures = {
        "fp_observed": round(observed, 4),
        "estimated_specificity": detector.get("specificity"),
        "estimated_specificity_ci": detector.get("specificity_ci"),
        "estimated_sensitivity": detector.get("sensitivity"),
        "estimated_sensitivity_ci": detector.get("sensitivity_ci"),
    }
    rate = summary.get("null_frac_copies")
    if rate is not None:
        low, high = prediction_interval(float(rate), n_novel, estimated_from=summary.get("n_val"))
        figures |= {
            "fp_estimated": round(float(rate), 4),
            "fp_estimated_interval": [round(low, 4), round(high, 4)],
            "estimate_holds": bool(observed <= high),
        }
    return figures


def cli(*arguments: str, threads: int | None) -> CliRun:
    """`python cli.py ...` from the repository root, output captured; stops with its stderr's end on failure."""
    return run_cli(*arguments, threads=threads, check=True)


def fit_config(recipe: str, data: Path, work: Path, size: list[int], steps: int) -> dict:
    """A `cli.py fit` config: the recipe's model section scaled for a CPU, a FolderDataModule over `data`."""
    recipe_config = yaml.safe_load((ROOT / recipe).read_text())
    scale = CPU_SCALE.get(recipe, {"model": {}, "batch_size": 16})
    model = dict(recipe_config["model"])
    model["init_args"] = {**model.get("init_args", {}), **scale["model"]}
    return {
        "seed_everything": 0,
        "trainer": {
            "max_steps": steps, "accelerator": "cpu", "devices": 1, "precision": "32-true",
            "log_every_n_steps": 10, "check_val_every_n_epoch": 50, "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(work / "runs"), "name": "embedder"},
            },
        },
        "checkpoint": {"save_last": True, "dirpath": str(work / "checkpoints")},
        "model": model,
        "data": {
            "class_path": "memwatch.datamodules.FolderDataModule",
            "init_args": {
                "train_dir": str(data / "train"), "val_dir": str(data / "val"), "spatial_size": size,
                "resize": "resize", "intensity": "minmax", "batch_size": scale["batch_size"], "cache": "memory",
            },
        },
    }  # fmt: skip


def run_case(
    name: str,
    work: Path,
    *,
    n_train: int,
    n_val: int,
    n_copies: int,
    n_novel: int,
    size: list[int] | None = None,
    steps: int = 1000,
    recipe: str | None = None,
    rules: tuple[str, ...] = ("paper", "distinct"),
    margin: float | None = None,
    seed: int = 0,
    fit_args: tuple[str, ...] = (),
    threads: int | None = None,
    reuse_fit: bool = False,
) -> dict:
    """Write one case's planted-copy set under `work`, train its recipe's embedder, audit once per rule, score.

    `reuse_fit`: where `work` already holds this case's set and an embedder trained on the same config
    and fit arguments, audit that embedder again (another rule or margin) instead of training anew.
    """
    case = CASES[name]
    dims = family_spatial_dims(case.family)
    size = list(size or DEFAULT_SIZE[dims])
    recipe = recipe or RECIPES[dims]
    work, data = Path(work), Path(work) / "data"
    config, embedder, fitted = work / "fit.yaml", work / "checkpoints" / "last.ckpt", work / "fit.json"
    config_text = yaml.safe_dump(fit_config(recipe, data, work, size, steps), sort_keys=False)
    previous = json.loads(fitted.read_text()) if reuse_fit and fitted.is_file() else {}
    reusable = (
        previous.get("config") == config_text and previous.get("fit_args") == list(fit_args) and embedder.is_file()
    )
    if reusable:
        planted, fit_seconds = json.loads((data / "planted.json").read_text()), previous["fit_seconds"]
    else:
        planted = write_planted_copy_set(
            data, case.family, n_train=n_train, n_val=n_val, n_copies=n_copies, n_novel=n_novel,
            spatial_size=size, seed=seed, images_per_patient=case.images_per_patient, novel=case.novel,
        )  # fmt: skip
        config.write_text(config_text)
        fit_seconds = cli("fit", "--config", str(config), *fit_args, threads=threads).seconds
        fitted.write_text(json.dumps({"config": config_text, "fit_args": list(fit_args), "fit_seconds": fit_seconds}))
    by_rule = {}
    for rule in rules:
        out = work / f"audit_{rule}"
        audit = [
            "audit", "--embedder", str(embedder), "--train", str(data / "train"), "--val", str(data / "val"),
            "--synthetic", str(data / "synthetic"), "--out", str(out), "--rule", rule,
        ]  # fmt: skip
        if rule != "paper" and margin is not None:
            audit += ["--margin", str(margin)]
        if out.exists():  # the benchmark's own earlier audit of this case
            audit.append("--overwrite")
        start = time.perf_counter()
        cli(*audit, threads=threads)
        summary = json.loads((out / "summary.json").read_text())
        scored = score(out / "pairs.csv", planted)
        by_rule[rule] = {
            **scored,
            **estimates_beside_observed(summary, scored),
            "margin": summary.get("margin"),
            "tau": summary.get("tau"),
            "audit_seconds": round(time.perf_counter() - start, 1),
        }
        if rule != "paper":
            by_rule[rule]["margin_sweep"] = margin_sweep(out / "pairs.csv", planted, float(summary["tau"]))
    return {
        "case": name,
        "family": case.family,
        "spatial_dims": dims,
        "images_per_patient": case.images_per_patient,
        "novel": case.novel,
        "held_back": case.held_back,
        "recipe": recipe,
        "cpu_scale": CPU_SCALE.get(recipe),
        "fit_seconds": round(fit_seconds, 1),
        "fit_reused": reusable,
        "sizes": {"n_train": n_train, "n_val": n_val, "n_copies": n_copies, "n_novel": n_novel, "size": size, "steps": steps},
        "rules": by_rule,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--n-train", type=int, default=160, help="training patients")
    parser.add_argument(
        "--n-val", type=int, default=160,
        help="held-out patients; as many as training patients, so that a copy-nobody image is flagged 5%% of the time",
    )
    parser.add_argument("--n-copies", type=int, default=48)
    parser.add_argument("--n-novel", type=int, default=96)
    parser.add_argument("--size", type=int, nargs="+", default=None, help="image size (default 64 64 in 2D, 32 32 16 in 3D)")
    parser.add_argument("--steps", type=int, default=1000, help="embedder training steps")
    parser.add_argument("--recipe", default=None, help="the config whose model section is the recipe (default per dims)")
    parser.add_argument("--rules", nargs="+", default=["paper", "distinct"])
    parser.add_argument("--margin", type=float, default=None, help="the distinct rule's margin (default: the audit's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted-copy sets (patients, copies)")
    parser.add_argument(
        "--fit-arg", action="append", default=[], help="extra argument for cli.py fit, e.g. --fit-arg=--model.init_args.lr=1e-4"
    )
    parser.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the CLI subprocesses")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the sets, checkpoints and audits here")
    parser.add_argument(
        "--reuse-fits", action="store_true",
        help="with --work-dir: audit again the embedders an earlier run trained there on the same config",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.reuse_fits and args.work_dir is None:
        parser.error("--reuse-fits needs --work-dir (the folder of the earlier run)")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="detector_quality_"))
    results = []
    try:
        for name in args.cases:
            size = args.size if args.size is None or len(args.size) == family_spatial_dims(CASES[name].family) else None
            results.append(
                run_case(
                    name, work / name, n_train=args.n_train, n_val=args.n_val, n_copies=args.n_copies,
                    n_novel=args.n_novel, size=size, steps=args.steps, recipe=args.recipe, rules=tuple(args.rules),
                    margin=args.margin, seed=args.seed, fit_args=tuple(args.fit_arg), threads=args.threads,
                    reuse_fit=args.reuse_fits,
                )
            )  # fmt: skip
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    output = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": describe_machine(("torch", "lightning", "monai")),
        "fit_args": args.fit_arg,
        "cases": results,
    }
    print(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
