"""Offline foundation models: `umlipft models add` makes 'small' resolve for umlipft and mace-torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from umlipft.errors import InputError


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unknown_name_and_missing_cache_entry_say_what_to_do(empty_cache):
    from umlipft.models import resolve_foundation_model

    with pytest.raises(InputError, match="umlipft models add FILE --as small"):
        resolve_foundation_model("small")
    with pytest.raises(InputError, match="known names"):
        resolve_foundation_model("tiny")
    with pytest.raises(InputError, match="does not exist"):
        resolve_foundation_model("missing/model.model")


def test_add_makes_small_resolve_offline_for_mace_torch_too(empty_cache, small_model_path):
    from mace.calculators.foundations_models import download_mace_mp_checkpoint

    from umlipft.models import add_foundation_model, resolve_foundation_model

    installed = add_foundation_model(small_model_path, "small")
    assert installed.parent == empty_cache / "mace"
    assert resolve_foundation_model("small") == installed
    # mace-torch's own resolver finds the file where it would have downloaded it: no network
    assert Path(download_mace_mp_checkpoint("small")) == installed


def test_add_refuses_a_file_that_is_not_a_model(empty_cache, tmp_path):
    from umlipft.models import add_foundation_model

    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a mace-torch model file"):
        add_foundation_model(junk, "small")


def test_export_cli_by_foundation_name(empty_cache, small_model_path, tmp_path):
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(empty_cache)}
    umlipft = [sys.executable, "-m", "umlipft.cli"]
    subprocess.run(umlipft + ["models", "add", str(small_model_path), "--as", "small"], env=env, check=True,
                   capture_output=True)
    out = tmp_path / "small-lammps.pt"
    done = subprocess.run(umlipft + ["export", "small", "-o", str(out), "--dtype", "float32"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from umlipft.models import read_export_metadata

    meta = read_export_metadata(out)
    assert meta["dtype"] == "float32" and meta["r_max"] == 6.0 and meta["num_interactions"] == 2
    assert {1, 3, 8, 17, 27} <= set(meta["atomic_numbers"])
    bad = subprocess.run(umlipft + ["export", "medium", "-o", str(tmp_path / "m.pt")], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "umlipft models add FILE --as medium" in bad.stderr
