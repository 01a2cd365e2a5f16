"""`pip install .` gives an importable `memwatch` and a `memwatch` command, in any environment."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import ROOT, USER_SCRIPT

PACKAGED = ["memwatch", "audit", "callbacks", "configs", "datamodules", "lightning_modules", "memorization", "networks"]


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    """A new virtual environment outside the repository with memwatch's wheel installed. Its
    dependencies come from this environment's site-packages (a .pth file): nothing is downloaded."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    source.mkdir()
    for name in [*PACKAGED, "pyproject.toml", "README.md", "requirements.txt"]:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}
        copy(ROOT / name, source / name, **kwargs)
    run = dict(capture_output=True, text=True, timeout=300)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(work / "dist")], **run)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("memwatch-*.whl")
    env = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, **run)
    (purelib,) = (env / "lib").glob("python3*/site-packages")
    (purelib / "memwatch_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                                str(wheel)], **run)  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    return env


def test_the_wheel_runs_a_user_script_beside_its_own_callbacks_module(fresh_env, tmp_path):
    project = tmp_path / "my_project"
    project.mkdir()
    # The user's own module of the name memwatch's folder has in the repository.
    (project / "callbacks.py").write_text("GREETING = 'the user module'\n")
    script = USER_SCRIPT.replace(
        "from memwatch.callbacks import MemorizationCallback",
        "import callbacks\nimport memwatch\nfrom memwatch import MemorizationCallback\n"
        "print('memwatch from', memwatch.__file__, 'callbacks says', callbacks.GREETING)",
    )
    (project / "train.py").write_text(script)
    result = subprocess.run(
        [str(fresh_env / "bin" / "python"), "train.py", str(project / "logs")], cwd=project,
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"memwatch from {fresh_env}" in result.stdout and "callbacks says the user module" in result.stdout
    assert str(ROOT) not in result.stdout
    assert (project / "logs" / "mine" / "version_0" / "memorization_history.csv").is_file()


def test_the_memwatch_command_is_cli_py_and_finds_the_shipped_configs(fresh_env, tmp_path):
    result = subprocess.run(
        [str(fresh_env / "bin" / "memwatch"), "fit", "--config", "phantom_simclr.yaml", "--print_config"],
        cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: memwatch.lightning_modules.SimCLRModule" in result.stdout


def test_an_old_class_path_still_resolves_to_memwatch_with_one_deprecation_line(fresh_env, tmp_path):
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        import memwatch
        from lightning_modules import LatentDiffusionModule
        from lightning_modules.latent_diffusion import LatentDiffusionModule as again
        assert LatentDiffusionModule is memwatch.LatentDiffusionModule is again
    """)
    result = subprocess.run([str(fresh_env / "bin" / "python"), "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert len(lines) == 1 and "use 'memwatch.lightning_modules'" in lines[0]
