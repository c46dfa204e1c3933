"""Expected failures end in one message naming the path or key and the fix, never a traceback:
outputs that cannot be written, configuration values of the wrong type, a damaged per-frame
label result, and model files of the wrong kind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from reliability_helpers import assert_message, run_umlipft, write_water_frames

from umlipft.errors import ConfigError, InputError
from umlipft.label.core import attempts, frame_dir


@pytest.fixture
def frames(tmp_path: Path) -> Path:
    return write_water_frames(tmp_path / "frames.extxyz", 2)


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A plain file where an output wants a directory: no user, root included, can write there."""
    path = tmp_path / "blocker"
    path.write_text("")
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Something to report on."""
    path = tmp_path / "run"
    path.mkdir()
    (path / "summary.json").write_text(json.dumps({"command": "md", "status": "finished"}))
    return path


# ------------------------------------------------------------------------------ impossible outputs
@pytest.mark.parametrize("case", ["label", "label-output", "build", "md", "evaluate", "report"])
def test_an_output_under_a_file_is_a_message(case: str, frames: Path, blocker: Path, run_dir: Path,
                                             small_model_path: Path) -> None:
    out = blocker / "out"
    args = {
        "label": ("label", frames, "--calculator", "xtb", "--workdir", out),
        "label-output": ("label", frames, "--calculator", "xtb", "--workdir", frames.parent / "work",
                         "-o", out / "labelled.extxyz", "--threads-per-frame", "1"),
        "build": ("build", "aqueous", "--n-water", "3", "-o", out / "box.extxyz"),
        "md": ("md", frames, "--model", small_model_path, "-o", out),
        "evaluate": ("evaluate", "--model", small_model_path, frames, "-o", out),
        "report": ("report", run_dir, "-o", out / "report.html"),
    }[case]
    done = run_umlipft(*args)
    assert_message(done, blocker, "is a file, not a directory", "choose another output location")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_a_message(frames: Path, tmp_path: Path) -> None:
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        done = run_umlipft("label", frames, "--calculator", "xtb", "--workdir", locked / "work")
    finally:
        locked.chmod(0o755)
    assert_message(done, locked / "work", "choose an output location you can write to")


# ------------------------------------------------------------------------------ configuration types
def test_a_count_that_is_not_a_number_names_its_key(tmp_path: Path) -> None:
    config = tmp_path / "build.yaml"
    config.write_text("system: aqueous\nn_water: ten\n")
    done = run_umlipft("build", "aqueous", "--config", config, "-o", tmp_path / "box.extxyz")
    assert_message(done, config, "'n_water'", "'ten'")
    assert not (tmp_path / "box.extxyz").exists()


@pytest.mark.parametrize("driver, values, key", [
    ("build", {"n_water": "ten"}, "n_water"),                         # int | None
    ("build", {"n_water": True}, "n_water"),                          # a bool is no count
    ("build", {"density_g_cm3": "dense"}, "density_g_cm3"),           # float | None
    ("build", {"output": ["a", "b"]}, "output"),                      # Path | None
    ("build", {"seed": None}, "seed"),                                # int, null
    ("md", {"steps": "ten"}, "steps"),                                # int
    ("md", {"temperature_K": "hot"}, "temperature_K"),                # float
    ("md", {"temperature_K": float("nan")}, "temperature_K"),
    ("md", {"structure": 5}, "structure"),                            # tuple[str, ...]
    ("md", {"elements": {"O": 1}}, "elements"),
    ("label", {"processes": "2"}, "processes"),
    ("label", {"retry_failed": "sometimes"}, "retry_failed"),         # bool
    ("label", {"calculator": 5}, "calculator"),                       # str
    ("label", {"xtb": 5}, "xtb"),                                     # nested section
    ("label", {"xtb": {"charge": "one"}}, "charge"),                  # a key inside it
])
def test_every_wrong_type_is_a_config_error_naming_the_key(driver: str, values: dict, key: str) -> None:
    from umlipft.build import BuildConfig
    from umlipft.label.config import LabelConfig
    from umlipft.md import MDConfig

    cls, base = {"build": (BuildConfig, {}), "md": (MDConfig, {"structure": ["start.extxyz"]}),
                 "label": (LabelConfig, {"frames": "f.extxyz", "calculator": "xtb"})}[driver]
    with pytest.raises(ConfigError, match=repr(key)):
        cls.from_dict({**base, **values})


def test_yaml_numbers_without_a_dot_and_integral_floats_still_load() -> None:
    from umlipft.md import MDConfig

    # PyYAML reads 1e3 as a string and users write 300 for 300.0: both are what they look like.
    config = MDConfig.from_dict({"structure": "a.extxyz b.extxyz", "replicas": 2,
                                "temperature_K": "3e2", "steps": 10.0})
    assert config.temperature_K == 300.0 and config.steps == 10 and config.structure == ("a.extxyz", "b.extxyz")


# ------------------------------------------------------------------------------ damaged label result
def test_a_truncated_label_result_is_relabelled_with_a_message(frames: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    args = ("label", frames, "--calculator", "xtb", "--workdir", work, "--threads-per-frame", "1")
    assert run_umlipft(*args).returncode == 0
    result = frame_dir(work, 1) / "result.extxyz"
    text = result.read_text()
    result.write_text(text[: len(text) // 2])  # a copy cut short, a disk that filled up
    done = run_umlipft(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and str(result) in done.stderr and "relabelling" in done.stderr
    assert attempts(work, 0) == 1 and attempts(work, 1) == 2  # the damaged frame only, again
    labelled = (tmp_path / "frames-labelled.extxyz").read_text()
    assert labelled.count("REF_energy") == 2
    assert (frame_dir(work, 1) / "result.extxyz.unreadable").read_text() == text[: len(text) // 2]


# ------------------------------------------------------------------------------ models of the wrong kind
def _torchscript_export(path: Path) -> Path:
    """A TorchScript file with umlipft's export metadata: what `umlipft export` writes (the real
    export takes a minute; the slow test below uses it)."""
    import torch

    module = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(module, str(path), _extra_files={"umlipft.json": json.dumps({"format": "umlipft-mace-lammps"})})
    return path


def test_an_export_where_a_model_is_expected_says_so(tmp_path: Path, frames: Path) -> None:
    from umlipft.models.foundation import load_mace_model

    export = _torchscript_export(tmp_path / "model-lammps.pt")
    with pytest.raises(InputError, match="LAMMPS export.*pass the mace-torch .model"):
        load_mace_model(export)
    done = run_umlipft("evaluate", "--model", export, frames, "-o", tmp_path / "eval")
    assert_message(done, export, "LAMMPS export", ".model")


@pytest.mark.slow
def test_a_real_export_where_a_model_is_expected_says_so(tmp_path: Path, small_model_path: Path) -> None:
    export = tmp_path / "small-lammps.pt"
    made = run_umlipft("export", small_model_path, "-o", export, "--dtype", "float32", "--elements", "H", "O",
                       timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    train = write_water_frames(tmp_path / "train.extxyz", 2)
    done = run_umlipft("finetune", "--foundation", export, "--train", train, "-o", tmp_path / "ft")
    assert_message(done, export, "LAMMPS export", ".model")


@pytest.mark.parametrize("command", ["evaluate", "md"])
def test_a_directory_given_as_model_is_called_a_directory(command: str, tmp_path: Path, frames: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    args = {"evaluate": ("evaluate", "--model", folder, frames, "-o", tmp_path / "eval"),
            "md": ("md", frames, "--model", folder, "-o", tmp_path / "md")}[command]
    done = run_umlipft(*args)
    assert_message(done, folder, "is a directory")
    assert "does not exist" not in done.stderr
