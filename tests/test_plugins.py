"""Plug-in models: a generator from outside the project, PixelEmbedder, a TorchScript embedder, several embedders at once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from memwatch.audit.inputs import datamodule_from_config
from memwatch.cli import main
from memwatch.datamodules.phantom import render_phantom
from memwatch.errors import InputError
from memwatch.lightning_modules import SimCLRModule
from memwatch.lightning_modules.plugins import TrustedModules, load_embedder
from memwatch.memorization import detect_copies
from memwatch.memorization.embedders import (
    SAMPLE_SIGNATURE,
    Embedder,
    Generator,
    PixelEmbedder,
    TorchScriptEmbedder,
)
from memwatch.memorization.history import HISTORY_FILE
from scripts.launch import CliRun
from tests.helpers import (
    MEMORIZATION_SIZE,
    ROOT,
    audit_args,
    memorization_history,
    memorization_phantoms,
    reference_images,
    run_cli,
    scripted_config,
)

# A user's generator in a package of their own: it stores the first training images it sees and
# samples them back, a model that memorizes everyone. It knows nothing of memwatch.
MEMORIZING_GENERATOR = '''
import torch
from lightning.pytorch import LightningModule


class MemorizingGenerator(LightningModule):
    def __init__(self, capacity: int = 32, spatial_size: list[int] = [32, 32], low: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("stored", torch.zeros(capacity, 1, *spatial_size))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def training_step(self, batch, batch_idx):
        images = batch["image"][: self.hparams.capacity - int(self.filled)]
        self.stored[int(self.filled) : int(self.filled) + len(images)] = images.detach()
        self.filled += len(images)
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, n, seed=0, num_inference_steps=50, sample_batch_size=16, start_index=0):
        rows = [i % max(int(self.filled), 1) for i in range(start_index, start_index + n)]
        return (self.stored[rows] + self.hparams.low).clamp(max=1.0)


class NotAGenerator(MemorizingGenerator):
    sample = None


class IntSeedGenerator(MemorizingGenerator):  # written for sample(n, seed=0), blind to the callback's (seed, check)
    def sample(self, n, seed=0, num_inference_steps=50, sample_batch_size=16, start_index=0):
        torch.manual_seed(int(seed))
        return super().sample(n, seed, num_inference_steps, sample_batch_size, start_index)
'''


@pytest.fixture(scope="module")
def user_package(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user_package")
    (folder / "my_generators.py").write_text(MEMORIZING_GENERATOR)
    return folder


def run_with(user_package: Path, *args: str, timeout: int = 600) -> CliRun:
    return run_cli(*args, timeout=timeout, env={"PYTHONPATH": f"{user_package}{os.pathsep}{ROOT}"})


# What every diffusion config trains with: the callback then samples the averaged copy of the user's model.
EMA = {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9, "use_buffers": False}}


def generator_config(tmp_path: Path, embedder_ckpt: Path, callbacks: list | None = None, **model_args) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "user"}},
            "callbacks": callbacks or [],
        },
        "memorization": {"embedder_ckpt": str(embedder_ckpt), "every_n_epochs": 1, "num_inference_steps": 1},
        "model": {"class_path": "my_generators.MemorizingGenerator", "init_args": {"spatial_size": list(MEMORIZATION_SIZE), **model_args}},
        "data": {"class_path": "memwatch.datamodules.PhantomDataModule",
                 "init_args": {"spatial_size": list(MEMORIZATION_SIZE), "n_patients": 64, "val_fraction": 0.5, "batch_size": 16}},
    }  # fmt: skip
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_generator_from_outside_the_project_trains_with_the_callback_and_its_checkpoint_audits(
    user_package, embedder_ckpt, tmp_path
):
    config = generator_config(tmp_path, embedder_ckpt, callbacks=[EMA])  # checks sample its EMA copy
    fit = run_with(user_package, "fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "user" / "version_0"
    rows = memorization_history(run_dir)
    # It stores 32 training images in its first epoch and samples them back: every one is a copy.
    assert [int(row["check"]) for row in rows] == [0, 1]
    assert int(rows[-1]["n_copies"]) >= 30 and int(rows[-1]["n_mem"]) >= 28, rows[-1]
    out = tmp_path / "audit"
    audit = run_with(
        user_package, "audit", "--embedder", str(embedder_ckpt), "--data", str(config),
        "--generator", str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(out), "--detector-positives", "0",
        "--trust-module", "my_generators",
    )  # fmt: skip
    assert audit.returncode == 0, audit.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_syn"] == 32 and summary["n_copies"] >= 30 and summary["inputs"]["generator"].endswith("last.ckpt")
    assert len(list((out / "samples").glob("sample_*.npy"))) == 32


def test_a_generator_whose_samples_leave_0_1_is_refused_before_training(user_package, embedder_ckpt, tmp_path):
    config = generator_config(tmp_path, embedder_ckpt, low=-0.5)
    result = run_with(user_package, "fit", "--config", str(config))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("error: MemorizingGenerator.sample returns values in [-0.5") and "not [0, 1]" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "user" / "version_0" / HISTORY_FILE).exists()


def test_a_model_without_sample_is_refused_before_training(user_package, embedder_ckpt, tmp_path):
    config = generator_config(tmp_path, embedder_ckpt)
    result = run_with(user_package, "fit", "--config", str(config), "--model.class_path", "my_generators.NotAGenerator")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("error: MemorizationCallback needs a model with sample(); NotAGenerator has none")


def test_a_generator_that_takes_only_an_int_seed_is_refused_at_start_up_naming_the_signature(
    user_package, embedder_ckpt, tmp_path
):
    config = generator_config(tmp_path, embedder_ckpt)
    result = run_with(user_package, "fit", "--config", str(config), "--model.class_path", "my_generators.IntSeedGenerator")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("error: IntSeedGenerator.sample(2, seed=(0, 0), num_inference_steps=1, ") and "TypeError" in errors[0]
    assert SAMPLE_SIGNATURE in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "user" / "version_0" / "checkpoints").exists()  # refused before any training step


# A module that exists on sys.path but that nothing imports: importing it leaves a marker file.
MARKED_MODULE = """
from pathlib import Path

Path(__file__).with_name("imported.marker").write_text("imported")


class Generator:
    pass
"""


def test_a_checkpoint_naming_an_untrusted_module_is_refused_by_the_audit_without_importing_it(
    folders, tmp_path, monkeypatch, capsys  # noqa: F811
):
    (tmp_path / "marked_generators.py").write_text(MARKED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    # weights_only-safe: plain values only, and a class path in hyper_parameters as LightningCLI records it
    torch.save({"hyper_parameters": {"_class_path": "marked_generators.Generator"}, "state_dict": {}}, tmp_path / "g.ckpt")
    args = audit_args(Path("unused"), folders, tmp_path / "out", "--generator", str(tmp_path / "g.ckpt"))
    args[args.index("--embedder") + 1] = "pixel"
    args.remove("--synthetic")
    args.remove(str(folders / "synthetic"))
    with pytest.raises(SystemExit) as stop:
        main([*args, "--spatial-size", *map(str, MEMORIZATION_SIZE)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: --generator={tmp_path / 'g.ckpt'} names the class marked_generators.Generator")
    assert errors[0].endswith("pass --trust-module marked_generators")
    assert "marked_generators" not in sys.modules and not (tmp_path / "imported.marker").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["--embedder", "audit.yaml embedder", "--data config", "memorization.embedder"])
def test_a_specification_naming_popen_is_refused_before_it_runs(where, folders, tmp_path, capsys):  # noqa: F811
    ran = tmp_path / "ran"
    popen = {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(ran)]}}
    if where == "memorization.embedder":
        from memwatch.callbacks import MemorizationCallback

        with pytest.raises(InputError, match=r"^--memorization.embedder names the class subprocess.Popen, .* pass "
                           r"--memorization.trust_modules \[subprocess\]$"):  # fmt: skip
            MemorizationCallback(embedder=popen)
        assert not ran.exists()
        return
    args = audit_args(Path("unused"), folders, tmp_path / "out", "--spatial-size", *map(str, MEMORIZATION_SIZE))
    args[args.index("--embedder") + 1] = "pixel"
    if where == "--embedder":
        args += ["--embedder", yaml.safe_dump(popen, default_flow_style=True)]
    elif where == "audit.yaml embedder":
        (tmp_path / "audit.yaml").write_text(yaml.safe_dump({"embedder": ["pixel", popen]}))
        args[args.index("--embedder") : args.index("--embedder") + 2] = ["--config", str(tmp_path / "audit.yaml")]
    else:
        (tmp_path / "data.yaml").write_text(yaml.safe_dump({"data": popen}))
        args[args.index("--train") : args.index("--val") + 2] = ["--data", str(tmp_path / "data.yaml")]
    with pytest.raises(SystemExit) as stop:
        main(args)
    errors = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(errors) == 1, errors
    assert "names the class subprocess.Popen" in errors[0] and errors[0].endswith("pass --trust-module subprocess")
    assert not ran.exists()


@pytest.mark.parametrize(
    ("class_path", "trusted"),
    [
        ("memwatch.memorization.embedders.PixelEmbedder", True),
        ("memorization.embedders.PixelEmbedder", True),  # the old name, aliased for one release
        ("my_package.models.Embedder", True),  # a submodule of --trust-module my_package
        ("my_package_two.Embedder", False),
        ("memwatchx.Embedder", False),
        ("os.system", False),
    ],
)
def test_only_memwatch_s_own_and_trusted_modules_may_be_imported(class_path, trusted):
    from memwatch.lightning_modules.plugins import TrustedModules

    rule = TrustedModules(("my_package",))
    if trusted:
        rule.check(class_path, "--embedder")
    else:
        with pytest.raises(InputError, match=f"--embedder names the class {class_path}, .*--trust-module"):
            rule.check(class_path, "--embedder")


def test_both_protocols_describe_memwatch_s_own_models(embedder_ckpt):
    embedder = SimCLRModule.from_checkpoint(embedder_ckpt, "embedder")
    assert isinstance(embedder, Embedder) and isinstance(PixelEmbedder(), Embedder)
    assert not isinstance(embedder, Generator)
    from tests.doubles import ScriptedGenerator

    assert isinstance(ScriptedGenerator(), Generator)


def test_pixel_embedder_with_mirror_invariance_flags_a_mirrored_copy_and_not_a_different_image():
    data = memorization_phantoms()
    train, val = (torch.stack(list(reference_images(data, split).values())) for split in ("train", "val"))
    novel = torch.from_numpy(render_phantom("novel-0001", MEMORIZATION_SIZE))[None]
    synthetic = torch.cat([train[:1].flip(-1), novel])
    found = {}
    for mirror_invariant in (True, False):
        embedder = PixelEmbedder(size=(16, 16), mirror_invariant=mirror_invariant)
        report = detect_copies(embedder.embed(train), embedder.embed(val), embedder.embed(synthetic))
        found[mirror_invariant] = report
    invariant = found[True]
    assert invariant.is_copy.tolist() == [True, False]
    assert int(invariant.nn_train_index[0]) == 0 and float(invariant.nn_train_corr[0]) == pytest.approx(1.0, abs=1e-5)
    # without the invariance the mirrored copy is further from its source than from itself
    assert float(found[False].nn_train_corr[0]) < float(invariant.nn_train_corr[0]) - 1e-3


def test_a_torchscript_export_reproduces_the_simclr_embeddings(embedder_ckpt, tmp_path):
    simclr = SimCLRModule.from_checkpoint(embedder_ckpt, "embedder")
    path = simclr.export_torchscript(tmp_path / "embedder.pt")
    scripted = TorchScriptEmbedder(str(path), spatial_size=MEMORIZATION_SIZE)
    images = torch.stack(list(reference_images(memorization_phantoms(), "val").values()))[:5]  # not the trace's batch size
    assert scripted.embedding_dim == simclr.embedding_dim
    torch.testing.assert_close(scripted.embed(images), simclr.embed(images), atol=1e-5, rtol=1e-5)


def test_a_bad_torchscript_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(InputError, match=r"TorchScript embedder .*broken.pt cannot be loaded .*torch.jit.save"):
        TorchScriptEmbedder(str(tmp_path / "broken.pt"), spatial_size=MEMORIZATION_SIZE)
    wrong = torch.jit.script(torch.nn.Flatten(0))  # one vector for the whole batch
    torch.jit.save(wrong, str(tmp_path / "flat.pt"))
    with pytest.raises(InputError, match=r"returns \[2048\] for 2 images, not \[2, L\]"):
        TorchScriptEmbedder(str(tmp_path / "flat.pt"), spatial_size=MEMORIZATION_SIZE)


def test_several_embedders_in_one_audit_count_what_each_counts_alone(embedder_ckpt, folders, tmp_path):  # noqa: F811
    size = [str(s) for s in MEMORIZATION_SIZE]
    common = ["--detector-positives", "4", "--spatial-size", *size]
    both = main([*audit_args(embedder_ckpt, folders, tmp_path / "both", "--embedder", "pixel"), *common])
    simclr = main([*audit_args(embedder_ckpt, folders, tmp_path / "simclr"), *common])
    pixel_args = audit_args(embedder_ckpt, folders, tmp_path / "pixel")
    pixel_args[pixel_args.index("--embedder") + 1] = "pixel"
    pixel = main([*pixel_args, *common])
    detectors = both["detectors"]
    assert list(detectors["by_embedder"]) == ["embedder.ckpt", "pixel"]
    for name, alone in [("embedder.ckpt", simclr), ("pixel", pixel)]:
        mine = detectors["by_embedder"][name]
        for key in ("tau", "n_mem", "n_copies", "n_mem_patients", "null_frac_copies"):
            assert mine[key] == pytest.approx(alone[key]), (name, key)
        assert mine["copy_syn_ids"] == alone["copy_syn_ids"] and mine["detector"] == alone["detector"]
    assert both["n_copies"] == simclr["n_copies"]  # the first embedder sets the headline
    flagged = [set(simclr["copy_syn_ids"]), set(pixel["copy_syn_ids"])]
    assert set(detectors["copies_any"]) == flagged[0] | flagged[1] and set(detectors["copies_all"]) == flagged[0] & flagged[1]
    (pair,) = detectors["pairwise"]
    assert pair["both"] + pair["only_first"] + pair["only_second"] + pair["neither"] == both["n_syn"]
    page = (tmp_path / "both" / "report.html").read_text()
    assert page.count('class="detector-section"') == 2 and "pixel" in page


def test_pixel_alone_needs_the_image_size(embedder_ckpt, folders, tmp_path, capsys):  # noqa: F811
    args = audit_args(embedder_ckpt, folders, tmp_path / "out")
    args[args.index("--embedder") + 1] = "pixel"
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert "give the images' size with --spatial-size" in capsys.readouterr().err


def test_the_callback_counts_with_pixel_embedder_from_yaml(tmp_path):
    config = scripted_config(tmp_path, Path("unused"), copy_from_epoch=0, max_epochs=1, early_stop=False)
    written = yaml.safe_load(config.read_text())
    del written["memorization"]["embedder_ckpt"]
    written["memorization"]["embedder"] = {
        "class_path": "memwatch.memorization.embedders.PixelEmbedder", "init_args": {"size": [16, 16]},
    }  # fmt: skip
    config.write_text(yaml.safe_dump(written))
    cli = main(["fit", "--config", str(config)])
    (row,) = memorization_history(Path(cli.trainer.log_dir))
    assert int(row["n_copies"]) >= 24, row  # the scripted generator copies 12 patients in every sample


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("runs/phantom_simclr/version_3/checkpoints/last.ckpt", "phantom_simclr/version_3/last.ckpt"),
        ("/data/embedder.ckpt", "embedder.ckpt"),
        ("pixel:8", "pixel:8"),
        ("{class_path: memwatch.memorization.embedders.TorchScriptEmbedder, init_args: {path: /m/net.pt}}", "TorchScriptEmbedder(net.pt)"),
    ],
)
def test_reports_name_an_embedder_by_its_run_and_file(spec, name):
    from memwatch.lightning_modules.plugins import embedder_name

    assert embedder_name(spec) == name


@pytest.mark.parametrize("spec", ["pixel:8"])
def test_embedder_specifications_are_understood(spec):
    from memwatch.lightning_modules.plugins import load_embedder

    embedder = load_embedder(spec, "embedder", spatial_dims=3)
    assert isinstance(embedder, PixelEmbedder) and embedder.size == (8, 8, 8)
    assert embedder.embed(torch.rand(2, 1, 12, 12, 12)).shape == (2, 512)
    assert np.isfinite(embedder.embed(torch.zeros(1, 1, 8, 8, 8)).numpy()).all()


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (
            lambda: load_embedder({"class_path": "memwatch.memorization.embedders.PixelEmbedder", "init_args": {"no_such": 1}}, "embedder"),
            r"^--embedder: cannot build memwatch\.memorization\.embedders\.PixelEmbedder \(TypeError: .*no_such.*\): check class_path and init_args$",
        ),
        (
            lambda: load_embedder({"class_path": "memwatch.no_such_module.Embedder"}, "embedder"),
            r"^--embedder: cannot build memwatch\.no_such_module\.Embedder \(ModuleNotFoundError: .*\): check class_path",
        ),
        (
            lambda: datamodule_from_config(ROOT / "configs" / "phantom_ldm.yaml", ["no_such=1"], TrustedModules()),
            r"^--data .*phantom_ldm\.yaml: cannot build memwatch\.datamodules\.PhantomDataModule \(TypeError: .*no_such.*\): check the data section and --data-arg$",
        ),
    ],
    ids=["bad-init-arg", "no-such-module", "audit-data-config"],
)
def test_a_class_that_cannot_be_built_is_one_line_naming_the_option_and_the_fix(load, message):
    with pytest.raises(InputError, match=message):
        load()
