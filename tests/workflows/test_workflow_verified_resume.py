"""A rerun reuses a finished stage only while the outputs it recorded are unchanged (issue 13):
a label stage's ``labelled.extxyz`` cut from 2 frames to 1, or removed, stops the rerun naming
the file and ``--from STAGE``; the original bytes put back, the rerun goes on and labels nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from umlipft.errors import StateError
from umlipft.io import read_frames
from umlipft.workflows import state as state_module
from umlipft.workflows.config import load_workflow_config
from umlipft.workflows.runner import run_workflow
from umlipft.workflows.state import WorkflowState

from tiny_workflow import TINY

# The end-to-end test's tiny workflow, stopped after the first label stage.
LABEL = "periodic/seg-00/label"


def _label_calls(root: Path) -> int:
    lines = (root / "journal.jsonl").read_text().splitlines()
    return sum(1 for line in lines if json.loads(line)["event"] == "label_call")


def _rerun(config, root: Path):
    state_module._HASH_CACHE.clear()  # a rerun is a new process: nothing hashed yet
    return run_workflow(("periodic",), config, root, until=LABEL, judge=False)


@pytest.mark.slow
def test_changed_output_of_finished_label_stage_is_refused(tmp_path: Path, small_model_path: Path) -> None:
    yaml = tmp_path / "tiny.yaml"
    yaml.write_text(TINY.format(model=small_model_path))
    config = load_workflow_config(yaml)
    root = tmp_path / "wf"
    run_workflow(("periodic",), config, root, until=LABEL, judge=False)
    stages = json.loads((root / "state.json").read_text())["stages"]
    entry = stages[LABEL]
    assert entry["status"] == "done" and entry["result"]["n_labelled"] == 2
    labelled = root / entry["result"]["labelled"]
    assert entry["outputs"][entry["result"]["labelled"]]["sha256"] == entry["result"]["sha256"]
    original = labelled.read_bytes()
    frames = read_frames(labelled)
    assert len(frames) == 2
    calls = _label_calls(root)

    # (a) cut to its first frame, as in the issue: the rerun must not go on with 1 frame
    from umlipft.io import write_frames

    write_frames(labelled, frames[:1])
    with pytest.raises(StateError) as cut:
        _rerun(config, root)
    message = str(cut.value)
    assert str(labelled) in message and f"--from {LABEL}" in message
    assert "size" in message

    # the same bytes count but other content: the hash, not only the size, is compared
    changed = bytearray(original)
    digit = next(i for i in range(len(changed) - 1, 0, -1) if chr(changed[i]).isdigit())
    changed[digit] = ord("1") if changed[digit] != ord("1") else ord("2")
    labelled.write_bytes(bytes(changed))
    with pytest.raises(StateError, match="changed content: sha256") as edited:
        _rerun(config, root)
    assert str(labelled) in str(edited.value) and f"--from {LABEL}" in str(edited.value)

    # (b) removed
    labelled.unlink()
    with pytest.raises(StateError, match="is missing") as missing:
        _rerun(config, root)
    assert str(labelled) in str(missing.value) and f"--from {LABEL}" in str(missing.value)

    # (c) the original bytes back: every stage is reused, the labeller is not called again
    labelled.write_bytes(original)
    t0 = time.perf_counter()
    outcome = _rerun(config, root)
    wall = time.perf_counter() - t0
    assert _label_calls(root) == calls
    after = json.loads((root / "state.json").read_text())["stages"]
    assert {k: v["attempts"] for k, v in after.items()} == {k: v["attempts"] for k, v in stages.items()}
    assert outcome.directory == root

    # the cost of the check: every recorded output of the finished stages, hashed once, then cached
    state = WorkflowState(root)
    state_module._HASH_CACHE.clear()
    t0 = time.perf_counter()
    for name in after:
        state.result(name)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name in after:
        state.result(name)
    warm = time.perf_counter() - t0
    n_bytes = sum(o["bytes"] for e in after.values() for o in e.get("outputs", {}).values())
    print(f"\nverified outputs: {n_bytes} bytes in {len(after)} stages; first check {cold * 1e3:.1f} ms, "
          f"cached {warm * 1e3:.2f} ms; whole reused rerun {wall:.2f} s")
