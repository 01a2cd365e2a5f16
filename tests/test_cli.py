"""The real CLI: every YAML parses and trains a few steps, overrides work, resume continues, bad input is one line."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memwatch.cli import MemwatchCLI, config_path, main, with_config_names
from memwatch.datamodules import MedicalImageDataModule
from memwatch.lightning_modules import MemwatchModule
from tests.helpers import (
    DATA_FIXTURES,
    DATA_OVERRIDES,
    ROOT,
    embedder_overrides,
    fit,
    last_ckpt,
    run_cli,
    tiny,
    write_dicom_dataset,
)

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
STAGES = ("ae", "simclr", "ldm")
DATASETS = sorted({p.stem.rsplit("_", 1)[0] for p in CONFIGS if p.stem.rsplit("_", 1)[1] in STAGES})
# Per dataset and stage: smaller networks where a config's real ones are slow on a CPU.
MODEL_OVERRIDES = {
    "chestxray": {
        "ae": ["--model.init_args.channels", "[32, 32, 64]"],
        "simclr": [
            "--model.init_args.resnet_block", "basic", "--model.init_args.resnet_layers", "[1, 1, 1, 1]",
            "--model.init_args.channels", "[16, 32, 64, 128]",
        ],
        "ldm": ["--model.init_args.channels", "[32, 64, 64]", "--model.init_args.num_head_channels", "32"],
    },
    # The 3D embedders' recipe (ResNet-18, the orbit in training) at the stage widths bench/detector_quality.py scales to
    **{
        dataset: {
            "simclr": [
                "--model.init_args.resnet_layers", "[1, 1, 1, 1]", "--model.init_args.channels", "[8, 16, 32, 64]",
            ],
            **({} if dataset == "mrnet" else {stage: ["--model.init_args.channels", "[32, 32, 32]"] for stage in ("ae", "ldm")}),
        }
        for dataset in ("mrnet", "nifti", "dicom")
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def dicom_dataset(tmp_path_factory) -> Path:
    """8 patient folders of CT-like DICOM series (34 slices of 34×34), for `DicomDataModule`."""
    return write_dicom_dataset(tmp_path_factory.mktemp("dicom_dataset"))


REAL_DATA_EMBEDDERS = {"mrnet_simclr", "nifti_simclr", "dicom_simclr", "chestxray_simclr"}


def test_every_stage_of_every_dataset_has_a_config():
    names = {p.name for p in CONFIGS}
    assert {"phantom_ae.yaml", "phantom_simclr.yaml", "phantom_ldm.yaml"} <= names
    for dataset in DATASETS:
        assert {f"{dataset}_{stage}.yaml" for stage in STAGES} <= names, dataset


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_print_config(config, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("memwatch.lightning_modules.")
    assert printed["data"]["class_path"].startswith("memwatch.datamodules.")
    assert printed["checkpoint"]["save_last"] is True
    if "_ldm" in config.stem or config.stem.endswith("_ddpm"):
        assert printed["memorization"]["class_path"] in ("memwatch.MemorizationCallback", "memwatch.callbacks.MemorizationCallback")
        assert printed["memorization"]["init_args"]["embedder_ckpt"].endswith("simclr/version_0/checkpoints/last.ckpt")
        stops_on = "membership_auc_low" if "membership" in config.stem else "excess_frac_mem"
        assert printed["early_stopping"]["init_args"]["monitor"] == f"memorization/{stops_on}"
    else:
        assert printed["memorization"] is None and printed["early_stopping"] is None
    if config.stem in REAL_DATA_EMBEDDERS:  # the recipe bench/detector_quality.py measured (BENCHMARKS.md)
        recipe = printed["model"]["init_args"]
        assert recipe["flip_invariant"] and recipe["standardize_input"] and recipe["orbit_in_training"]
        assert recipe["brightness_shift"] == 0.1 and recipe["contrast_gamma"] == [0.8, 1.25]
        assert recipe["encoder"] == "resnet"  # in 3D too: the paper's conv encoder missed half the planted copies


@pytest.mark.parametrize("dataset", DATASETS)
def test_all_three_stages_train_through_the_cli(dataset, tmp_path, request):
    extra = DATA_OVERRIDES.get(dataset, [])
    if callable(extra):
        extra = extra(request.getfixturevalue(DATA_FIXTURES[dataset]))
    smaller = MODEL_OVERRIDES.get(dataset, {})
    ae = fit(f"{dataset}_ae.yaml", tmp_path, *extra, *smaller.get("ae", []))
    simclr = fit(f"{dataset}_simclr.yaml", tmp_path, *extra, *smaller.get("simclr", []))
    ldm = fit(
        f"{dataset}_ldm.yaml", tmp_path, *extra, *smaller.get("ldm", []),
        "--model.init_args.autoencoder_ckpt", str(last_ckpt(ae)),
        *embedder_overrides(f"{dataset}_ldm.yaml", last_ckpt(simclr)),
    )  # fmt: skip
    for cli, stage in [(ae, "ae"), (simclr, "simclr"), (ldm, "ldm")]:
        run_dir = Path(cli.trainer.log_dir)
        assert run_dir.parent.name == f"{dataset}_{stage}"
        assert list(run_dir.glob("events.out.tfevents.*")), run_dir
        assert (run_dir / "config.yaml").is_file()
        checkpoint = torch.load(last_ckpt(cli), map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 2
        assert checkpoint["memwatch"]["image_spatial_size"] == list(cli.datamodule.spatial_size)
    samples = ldm.model.sample(2, seed=0, num_inference_steps=2)
    assert samples.shape == (2, 1, *ldm.datamodule.spatial_size)
    if (ROOT / "configs" / f"{dataset}_ldm_aug.yaml").is_file():  # the paper's augmentation experiment
        augmented = fit(
            f"{dataset}_ldm_aug.yaml", tmp_path, *extra, *smaller.get("ldm", []),
            "--model.init_args.autoencoder_ckpt", str(last_ckpt(ae)),
            *embedder_overrides(f"{dataset}_ldm_aug.yaml", last_ckpt(simclr)),
        )  # fmt: skip
        assert augmented.datamodule.augment and not ldm.datamodule.augment
        assert Path(augmented.trainer.log_dir).parent.name == f"{dataset}_ldm_aug"
        assert augmented.trainer.global_step == 2


def test_command_line_overrides_reach_the_model_and_the_saved_config(tmp_path):
    cli = fit("phantom_ae.yaml", tmp_path, "--model.init_args.lr", "0.0123", "--data.init_args.n_patients", "12")
    assert cli.model.hparams.lr == 0.0123
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["init_args"]["lr"] == 0.0123
    again = fit("phantom_ae.yaml", tmp_path, "--data.init_args.n_patients", "12")  # a rerun does not abort
    assert Path(again.trainer.log_dir) != Path(cli.trainer.log_dir)


def _logged_steps(run_dir: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_resume_from_last_ckpt_continues_the_step_count(tmp_path):
    first = fit("phantom_ae.yaml", tmp_path, "--data.init_args.n_patients", "12", steps=3)
    assert _logged_steps(Path(first.trainer.log_dir), "train/l1") == [0, 1, 2]
    resumed = fit("phantom_ae.yaml", tmp_path, "--data.init_args.n_patients", "12", "--ckpt_path", str(last_ckpt(first)), steps=5)
    assert resumed.trainer.global_step == 5
    # Only the two missing steps ran, numbered after the first run's (Lightning logs them as 4, 5).
    resumed_steps = _logged_steps(Path(resumed.trainer.log_dir), "train/l1")
    assert len(resumed_steps) == 2 and min(resumed_steps) > 2, resumed_steps


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    ae = fit("phantom_ae.yaml", root, "--data.init_args.n_patients", "12")
    simclr = fit("phantom_simclr.yaml", root, "--data.init_args.n_patients", "12")
    return {"ae": last_ckpt(ae), "simclr": last_ckpt(simclr)}


def _bad_runs(trained_runs) -> dict[str, tuple[list[str], str]]:
    ae, ldm = str(ROOT / "configs/phantom_ae.yaml"), str(ROOT / "configs/phantom_ldm.yaml")
    embedder = embedder_overrides("phantom_ldm.yaml", trained_runs["simclr"])
    trained_ldm = ["--config", ldm, "--model.init_args.autoencoder_ckpt", str(trained_runs["ae"]), *embedder]
    return {
        "missing autoencoder_ckpt": (
            ["--config", ldm, "--model.init_args.autoencoder_ckpt", "/nonexistent/last.ckpt", *embedder],
            "autoencoder_ckpt=/nonexistent/last.ckpt does not exist",
        ),
        "checkpoint of another module": (
            ["--config", ldm, "--model.init_args.autoencoder_ckpt", str(trained_runs["simclr"]), *embedder],
            "is a checkpoint of SimCLRModule, not of AutoencoderModule",
        ),
        "data dims differ from model dims": (
            ["--config", ae, "--data.init_args.spatial_size", "[32, 32, 32]"],
            "the data is 3D (spatial_size=[32, 32, 32]) but the model is 2D",
        ),
        "size not divisible by downsampling": (
            ["--config", ae, "--data.init_args.spatial_size", "[33, 33]"],
            "not divisible by 2, the autoencoder's downsampling factor: set --data.init_args.spatial_size [34, 34]",
        ),
        "ldm size not divisible": (
            ["--config", ldm, "--model.init_args.autoencoder_ckpt", str(trained_runs["ae"]), *embedder,
             "--data.init_args.spatial_size", "[34, 34]"],
            "not divisible by 4 (autoencoder ×2, UNet ×2)",
        ),
        "missing embedder_ckpt": (
            ["--config", ldm, "--model.init_args.autoencoder_ckpt", str(trained_runs["ae"]),
             "--memorization.embedder_ckpt", "/nonexistent/embedder.ckpt"],
            "memorization.embedder_ckpt=/nonexistent/embedder.ckpt does not exist: train it first (python cli.py fit "
            "--config configs/<dataset>_simclr.yaml) or pass the path of its checkpoints/last.ckpt with "
            "--memorization.embedder_ckpt PATH",
        ),
        "embedder of another image size": (
            ["--config", ldm, "--model.init_args.autoencoder_ckpt", str(trained_runs["ae"]), *embedder,
             "--data.init_args.spatial_size", "[64, 64]"],
            "the embedder was trained on images of spatial_size=[32, 32] but the data has [64, 64]",
        ),
        "sample_batch_size below 1": (
            [*trained_ldm, "--memorization.sample_batch_size", "0"],
            "--memorization.sample_batch_size=0 must be at least 1",
        ),
        "decode_batch_size below 1": (
            [*trained_ldm, "--memorization.decode_batch_size", "0"],
            "--memorization.decode_batch_size=0 must be at least 1",
        ),
        "max_overhead outside (0, 10]": (
            [*trained_ldm, "--memorization.max_overhead", "11"],
            "--memorization.max_overhead=11.0 must lie in (0, 10]",
        ),
        "unknown copy rule": (
            [*trained_ldm, "--memorization.rule", "strict"],
            "--memorization.rule 'strict' is not one of paper, distinct",
        ),
        "margin 0": ([*trained_ldm, "--memorization.margin", "0"], "--memorization.margin 0.0 must lie in (0, 1]"),
        "margin above 1": (
            [*trained_ldm, "--memorization.rule", "distinct", "--memorization.margin", "1.5"],
            "--memorization.margin 1.5 must lie in (0, 1]",
        ),
        "n_train above the dataset": (
            ["--config", ae, "--data.init_args.n_train", "999"],
            "n_train=999 is larger than the 16 training images",
        ),
    }  # fmt: skip


def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained_runs, tmp_path):
    runs = tmp_path / "runs"
    existing = runs / "phantom_ae" / "version_0"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("an earlier run")
    cases = _bad_runs(trained_runs)
    # All cases at once: each subprocess spends most of its time importing.
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "fit", *args, "--trainer.max_steps", "1",
             "--trainer.logger.init_args.save_dir", str(runs)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, (args, _) in cases.items()
    }  # fmt: skip
    try:
        outputs = {name: process.communicate(timeout=150)[1] for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()  # no-op for those that ended; a hung one must not outlive the test
    for name, process in processes.items():
        stderr = outputs[name]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert process.returncode == 2, (name, stderr[-2000:])
        assert "Traceback" not in stderr, name
        assert len(errors) == 1 and cases[name][1] in errors[0], (name, errors)
    assert sorted(p.relative_to(runs).as_posix() for p in runs.rglob("*")) == [
        "phantom_ae", "phantom_ae/version_0", "phantom_ae/version_0/keep.txt",
    ]  # fmt: skip
    assert (existing / "keep.txt").read_text() == "an earlier run"


def test_memorization_and_early_stopping_flags_reach_their_callbacks_in_order(trained_runs, tmp_path):
    cli = MemwatchCLI(
        MemwatchModule, MedicalImageDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=[
            "--config", str(ROOT / "configs" / "phantom_ldm.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--model.init_args.autoencoder_ckpt", str(trained_runs["ae"]),
            "--memorization.embedder_ckpt", str(trained_runs["simclr"]), "--memorization.every_n_epochs", "7",
            "--early_stopping.divergence_threshold", "0.3",
        ],
    )  # fmt: skip
    kinds = [type(callback).__name__ for callback in cli.trainer.callbacks]
    memorization = cli.trainer.callbacks[kinds.index("MemorizationCallback")]
    stopper = cli.trainer.callbacks[kinds.index("EarlyStopping")]
    assert kinds.count("MemorizationCallback") == 1 and kinds.index("MemorizationCallback") < kinds.index("EarlyStopping")
    assert memorization.every_n_epochs == 7 and memorization.check_at_start is True  # the rest from the YAML
    assert stopper.divergence_threshold == 0.3 and stopper.monitor == "memorization/excess_frac_mem"
    ae = MemwatchCLI(
        MemwatchModule, MedicalImageDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--config", str(ROOT / "configs" / "phantom_ae.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path)],
    )  # fmt: skip
    assert not any(type(c).__name__ in ("MemorizationCallback", "EarlyStopping") for c in ae.trainer.callbacks)


def test_ldm_trains_as_two_cpu_processes(trained_runs, tmp_path):
    result = run_cli(
        "fit", "--config", str(ROOT / "configs/phantom_ldm.yaml"),
        "--model.init_args.autoencoder_ckpt", str(trained_runs["ae"]),
        *embedder_overrides("phantom_ldm.yaml", trained_runs["simclr"]),
        # the embedder's 12 patients: another split would hold out patients it was trained on
        *tiny(tmp_path), "--data.init_args.n_patients", "12", "--data.init_args.batch_size", "2",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    (checkpoint_path,) = tmp_path.glob("phantom_ldm/version_0/checkpoints/last.ckpt")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert float(checkpoint["state_dict"]["scale_factor"]) > 0


def test_an_input_error_raised_in_a_dataloader_worker_is_still_a_user_mistake():
    from memwatch.errors import InputError, user_mistake

    worker_text = (
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "datamodules/folder.py", line 1, in check\n'
        "errors.InputError: image scan_7 (/data/train/scan_7.npy) has NaN pixels: fix or remove the file\n"
    )
    try:
        try:
            raise InputError("inner")
        except InputError as inner:
            raise RuntimeError("applying transform <Compose>") from inner  # what MONAI's Compose does
    except RuntimeError as transform_error:
        assert str(user_mistake(transform_error)) == "inner"
    found = user_mistake(RuntimeError(worker_text))
    assert isinstance(found, InputError) and str(found).startswith("image scan_7 (/data/train/scan_7.npy) has NaN")
    assert user_mistake(ValueError("a bug, not a user mistake")) is None


def test_a_config_name_is_found_in_configs_and_a_plain_run_prints_no_lightningcli_warning(tmp_path):
    assert with_config_names(["fit", "--config", "phantom_ae.yaml", "--config=phantom_ldm.yaml"]) == [
        "fit", "--config", str(ROOT / "configs" / "phantom_ae.yaml"), "--config=" + str(ROOT / "configs" / "phantom_ldm.yaml"),
    ]  # fmt: skip
    local = tmp_path / "phantom_ae.yaml"
    local.write_text("seed_everything: 3\n")
    assert config_path(str(local)) == str(local)  # a file that exists is never replaced
    assert config_path("no_such_config.yaml") == "no_such_config.yaml"  # left for LightningCLI to refuse
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", "phantom_simclr.yaml", "--print_config"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: memwatch.lightning_modules.SimCLRModule" in result.stdout
    assert "args parameter is intended" not in result.stderr


FLAG = re.compile(r"(?<![\w-])--([a-z][\w.-]*[a-z0-9_])")
CODE = [ROOT / "cli.py", *sorted((ROOT / "memwatch").glob("*.py"))] + [
    path for package in ("audit", "callbacks", "datamodules", "lightning_modules", "memorization", "networks")
    for path in sorted((ROOT / package).rglob("*.py"))
]  # fmt: skip
PROSE = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *CONFIGS]
OTHER_TOOLS = {"raw"}  # gdcmconv --raw, named by the DICOM reader's error for compressed files


def listed_options(parser) -> set[str]:
    """The option strings `parser --help` lists, from its lines such as `  --release_dir DIR, --release-dir DIR   help`."""
    invocations = re.findall(r"^  (-\S.*?)(?:\s{2,}|$)", parser.format_help(), flags=re.MULTILINE)
    return {option for invocation in invocations for option in re.findall(r"--?[\w.-]+", invocation)}


def named_flags() -> dict[str, set[str]]:
    """Every `--flag` in the project's strings (errors, warnings, help, docstrings), and every dotted
    `--section.key` in its prose (README, docs, config comments): flag → where it is named."""
    named: dict[str, set[str]] = {}
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    named.setdefault(flag, set()).add(path.name)
    for path in PROSE:
        for flag in FLAG.findall(path.read_text()):
            if "." in flag:
                named.setdefault(flag, set()).add(path.name)
    return named


class ParsedConfig(Exception):
    pass


class ParseOnlyCLI(MemwatchCLI):
    """Parses like `cli.py fit` and stops before building anything (no checkpoint is read)."""

    def before_instantiate_classes(self) -> None:
        raise ParsedConfig(self.config["fit"])


def parsed(*args: str):
    with pytest.raises(ParsedConfig) as stop:
        ParseOnlyCLI(MemwatchModule, MedicalImageDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     args=["fit", *args])  # fmt: skip
    return stop.value.args[0]


def vars_of(namespace) -> dict:
    return namespace.as_dict()


def test_every_flag_the_project_names_exists():
    from memwatch.audit import audit_parser

    named = named_flags()
    assert {"memorization.embedder_ckpt", "early_stopping.divergence_threshold", "verify-release", "embedder"} <= named.keys()
    audit_options = listed_options(audit_parser())
    defaults: dict[Path, dict] = {}  # parsed on first need: each parse builds a whole LightningCLI

    def default_of(config: Path, key: str):
        if config not in defaults:
            defaults[config] = parsed("--config", str(config))
        return defaults[config].get(key, ParsedConfig)

    missing, given_per_config = {}, {}
    for flag, where in sorted(named.items()):
        if f"--{flag}" in audit_options or flag in ("config", "print_config", "help", *OTHER_TOOLS):
            continue
        section, _, rest = flag.partition(".")
        if not rest and default_of(CONFIGS[0], flag) is not ParsedConfig:  # a stage's own option: --ckpt_path
            continue
        keys = [flag, f"{section}.init_args.{rest}"]
        found = next(((c, k) for c in CONFIGS for k in keys if rest and default_of(c, k) is not ParsedConfig), None)
        if found is None:
            missing[flag] = where
            continue
        given_per_config.setdefault(found[0], []).append((flag, found[1], default_of(*found)))
    for config, flags in given_per_config.items():
        # parses (jsonargparse rejects an unknown key) and lands where the flag says
        args = [part for flag, _, value in flags
                for part in (f"--{flag}", value if isinstance(value, str) else json.dumps(value, default=vars_of))]  # fmt: skip
        given = parsed("--config", str(config), *args)
        for flag, key, value in flags:
            assert str(given.get(key)) == str(value), flag
    assert not missing, missing
