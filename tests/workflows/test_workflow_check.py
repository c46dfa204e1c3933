"""``umlipft workflow --check``: the whole plan is checked before anything runs, through the real
CLI (exit codes, messages, nothing created), and every run makes the same check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tolerances import PLAN_CHECK_MAX_S

UMLIPFT = Path(sys.executable).with_name("umlipft")
STUDY_YAML = Path(__file__).resolve().parents[2] / "examples" / "workflow-study.yaml"


def _workflow(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([str(UMLIPFT), "workflow", *args], capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)
    return proc, time.perf_counter() - t0


def _config(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump({"profile": "quick", **values}))
    return path


BAD_VALUES = [
    ({"md": {"temperature_K": -5}}, "md.temperature_K", "> 0 K"),
    ({"md": {"timestep_fs": 10}}, "md.timestep_fs", "0.05-5.0 fs"),
    ({"md": {"dtype": "float16"}}, "md.dtype", "float32 or float64"),
    ({"finetune": {"e0s": "bogus"}}, "finetune.e0s", "must be one of"),
    ({"label": {"calculator": "gaussian"}}, "label.calculator", "cp2k, xtb, vasp, espresso"),
    ({"finetune": {"epochs": 0}}, "finetune.epochs", "at least 1"),
    ({"frames_per_segment": 50}, "frames_per_segment", "holds only"),
    ({"md": {"segment_velocities": "sometimes"}}, "md.segment_velocities", "keep or create"),
    ({"selection": "best"}, "selection", "stride, random, fps"),
]


@pytest.mark.parametrize("values,key,valid_range", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_value_exits_2_with_nothing_run(tmp_path: Path, values: dict, key: str, valid_range: str) -> None:
    config = _config(tmp_path, values)
    out = tmp_path / "wf"
    for extra in (["--check"], [], ["--stages"], ["--slurm"]):
        proc, seconds = _workflow(["compare", "--config", str(config), "-o", str(out), *extra])
        assert proc.returncode == 2, (extra, proc.stdout, proc.stderr)
        assert key in proc.stderr and valid_range in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert seconds < PLAN_CHECK_MAX_S
        assert not out.exists(), f"{extra}: a refused plan created {out}"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    config = _config(tmp_path, {"md": {"temperature_K": -5, "timestep_fs": 10, "dtype": "float16"},
                                "finetune": {"e0s": "bogus", "epochs": 0}, "label": {"calculator": "gaussian"}})
    proc, _ = _workflow(["compare", "--config", str(config), "-o", str(tmp_path / "wf"), "--check"])
    assert proc.returncode == 2
    problems = [line for line in proc.stderr.splitlines() if line.startswith("  - ")]
    for key in ("md.temperature_K", "md.timestep_fs", "md.dtype", "finetune.e0s", "finetune.epochs",
                "label.calculator"):
        assert sum(key in line for line in problems) == 1, (key, problems)
    assert len(problems) == 6


def test_quick_plan_passes_and_is_described(tmp_path: Path) -> None:
    proc, seconds = _workflow(["quick", "-o", str(tmp_path / "wf"), "--check"])
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for expected in ("plan: naive + periodic", "labeller: xtb", "E0 policy:", "fine-tuning:", "naive:",
                     "periodic:", "plan OK"):
        assert expected in text, text
    assert seconds < PLAN_CHECK_MAX_S
    assert not (tmp_path / "wf").exists()


def test_unusual_but_legal_timestep_warns(tmp_path: Path) -> None:
    config = _config(tmp_path, {"md": {"timestep_fs": 4.0}})
    proc, _ = _workflow(["compare", "--config", str(config), "-o", str(tmp_path / "wf"), "--check"])
    assert proc.returncode == 0, proc.stderr
    assert "warning: md: timestep_fs = 4.0 fs with H atoms" in proc.stdout


def _cache_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return env


def test_study_profile_passes_check_with_small_0b_registered(tmp_path: Path, small_model_path: Path) -> None:
    env = _cache_env(tmp_path)
    out = tmp_path / "wf"
    proc, _ = _workflow(["compare", "--config", str(STUDY_YAML), "-o", str(out), "--check"], env=env)
    assert proc.returncode == 2
    assert "small-0b" in proc.stderr and "umlipft models add" in proc.stderr and "--as small-0b" in proc.stderr

    add = subprocess.run([str(UMLIPFT), "models", "add", str(small_model_path), "--as", "small-0b"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert add.returncode == 0, add.stderr
    proc, _ = _workflow(["compare", "--config", str(STUDY_YAML), "-o", str(out), "--check"], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "labeller: cp2k" in text
    assert "continued segments draw new velocities at 300 K" in text
    assert "11 per segment from its second half, on a fixed stride of 50 ps" in text
    assert "N-10pts, N-21pts, N-31pts, N-40pts, N-50pts" in text
    assert not out.exists()


def test_missing_labeller_is_named(tmp_path: Path) -> None:
    config = _config(tmp_path, {"label": {"calculator": "vasp", "vasp": {"command": "vasp_std_not_here",
                                                                          "pp_path": str(tmp_path / "no-pps")}},
                                "finetune": {"e0s": "foundation"}})
    env = {k: v for k, v in os.environ.items() if k not in ("ASE_VASP_COMMAND", "VASP_PP_PATH", "VASP_COMMAND")}
    proc, _ = _workflow(["compare", "--config", str(config), "-o", str(tmp_path / "wf"), "--check"], env=env)
    assert proc.returncode == 2
    assert "label (vasp)" in proc.stderr
    assert "no-pps" in proc.stderr or "vasp_std_not_here" in proc.stderr, proc.stderr


def test_library_run_checks_before_the_first_stage(tmp_path: Path) -> None:
    from umlipft.errors import PlanError
    from umlipft.workflows.config import load_workflow_config
    from umlipft.workflows.runner import run_workflow

    config = load_workflow_config(None, profile="quick", overrides={"system": {"structures": ["/nonexistent.xyz"]}})
    with pytest.raises(PlanError, match=r"system.structures\[0\]: /nonexistent.xyz does not exist"):
        run_workflow(["periodic"], config, tmp_path / "wf", log=None)
    assert not (tmp_path / "wf").exists()
