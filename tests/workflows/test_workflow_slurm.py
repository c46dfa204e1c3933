"""Slurm scripts of the study profile (``umlipft workflow compare --slurm``): the dependency graph
parsed from submit.sh, devices and threads, absolute program paths, time limits, bash syntax;
and the two state mechanisms the parallel jobs rely on (--only, merged saves). No MD runs."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from umlipft.errors import ConfigError, StateError
from umlipft.md.config import MDConfig
from umlipft.md.run import PreparedRun, config_fingerprint, lammps_variables
from umlipft.workflows.config import load_workflow_config
from umlipft.workflows.slurm import model_names, slurm_seconds, write_slurm_scripts
from umlipft.workflows.state import Deferred, WorkflowState, fingerprint

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "examples" / "workflow-study.yaml"
MODEL = ROOT.parent / "shared" / "models" / "mace-mp-0-small.model"
STRATEGIES = ("naive", "periodic")
SUBMIT_LINE = re.compile(r"^(j\d+)=\$\(submit (?:--dependency=afterok:(\S+) )?(\S+\.sbatch)\)$")


def _config(**slurm):
    overrides = {"foundation": str(MODEL)}
    if slurm:
        overrides["slurm"] = slurm
    return load_workflow_config(STUDY, overrides=overrides)


def _job(script: str) -> str:
    return re.sub(r"^\d+-", "", script.removesuffix(".sbatch"))


def _graph(submit: Path) -> dict[str, set[str]]:
    """job -> the jobs it waits for, from the sbatch lines (each may only name earlier jobs)."""
    names: dict[str, str] = {}
    graph: dict[str, set[str]] = {}
    for line in submit.read_text().splitlines():
        match = SUBMIT_LINE.match(line)
        if not match:
            continue
        var, deps, script = match.groups()
        after = set()
        for ref in (deps or "").split(":") if deps else []:
            key = re.fullmatch(r"\$\{(j\d+)\}", ref)
            assert key and key.group(1) in names, f"{script} depends on {ref}, not submitted before it"
            after.add(names[key.group(1)])
        names[var] = _job(script)
        graph[_job(script)] = after
    return graph


def _ancestors(graph: dict[str, set[str]], job: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[job])
    while todo:
        j = todo.pop()
        if j not in seen:
            seen.add(j)
            todo += graph[j]
    return seen


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    config = _config()
    directory = tmp_path_factory.mktemp("wf")
    submit = write_slurm_scripts("compare", STRATEGIES, config, directory)
    scripts = {_job(p.name): p.read_text() for p in submit.parent.glob("*.sbatch")}
    return config, submit, scripts


def _commands(text: str) -> list[list[str]]:
    """The program-running lines of a script (not comments, #SBATCH, shell built-ins)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("submit()"):
            continue
        tokens = shlex.split(line)
        if tokens[0] in ("set", "export", "cd", "module", "echo") or re.match(r"j\d+=", tokens[0]):
            continue
        if tokens[0].startswith("SBATCH="):
            tokens = [tokens[0].split("=", 1)[1]]
        out.append(tokens)
    return out


def test_dependency_graph(study):
    config, submit, scripts = study
    graph = _graph(submit)
    assert set(graph) == set(scripts)
    n = config.iterations
    naive = {j for j in graph if j.startswith("naive-")}
    periodic = {j for j in graph if j.startswith("periodic-")}
    assert len(periodic) == 3 * n and len(naive) == 1 + n + 1 + len(config.subsets())
    for job in graph:
        if job != "start":
            assert "start" in _ancestors(graph, job), job
    # the two strategies are independent branches
    for job in naive:
        assert not _ancestors(graph, job) & periodic, job
    for job in periodic:
        assert not _ancestors(graph, job) & naive, job
    # periodic: one chain, each stage after the previous one
    for i in range(n):
        assert graph[f"periodic-md-{i:02d}"] == ({"start"} if i == 0 else {f"periodic-ft-{i:02d}"})
        assert graph[f"periodic-label-{i:02d}"] == {f"periodic-md-{i:02d}"}
        assert graph[f"periodic-ft-{i + 1:02d}"] == {f"periodic-label-{i:02d}"}
    # naive: ensemble MD, then its labels in parallel, the pool, the fine-tunes (all from U: parallel)
    labels = {f"naive-label-{j:02d}" for j in range(n)}
    assert all(graph[label] == {"naive-md"} for label in labels)
    assert graph["naive-pool"] == labels
    fts = {f"naive-ft-{size:03d}" for size in config.subsets()}
    assert all(graph[ft] == {"naive-pool"} for ft in fts)
    # the judge: every model's test after the job that made it and independent of the other
    # strategy; tests of different models in parallel; long runs after their model's test MD
    makers = {"U": "start"}
    makers.update({name: f"periodic-ft-{i + 1:02d}" for i, name in enumerate(model_names("periodic", config))})
    makers.update({name: f"naive-ft-{s:03d}" for s, name in zip(config.subsets(), model_names("naive", config))})
    tests = set()
    for name, maker in makers.items():
        test, label = f"eval-sc-{name}-md", f"eval-sc-{name}-label"
        tests.add(test)
        assert maker in _ancestors(graph, test) | {"start"}
        other = periodic if name.startswith("N-") else naive if name.startswith("FT") else set()
        assert not _ancestors(graph, test) & other, test
        assert graph[label] == {test}
    for test in tests:
        assert not _ancestors(graph, test) & tests, test
    for final in ("FT5", "N-50pts"):
        assert graph[f"eval-long-{final}-md"] == {f"eval-sc-{final}-md"}
        assert graph[f"eval-long-{final}-label"] == {f"eval-long-{final}-md"}
    assert _ancestors(graph, "report") == set(graph) - {"report"}


def test_jobs_run_only_their_strategy_and_stages(study):
    _, _, scripts = study
    for job, text in scripts.items():
        command = _commands(text)[-1]
        strategies = command[command.index("--strategies") + 1:]
        strategies = strategies[:next((k for k, t in enumerate(strategies) if t.startswith("--")), None)]
        if job == "report":
            assert strategies == list(STRATEGIES) and "--until" not in command
            continue
        until = command[command.index("--until") + 1]
        only = command[command.index("--only") + 1:]
        assert any(until == g or until.startswith(g + "/") for g in only), job
        if job.startswith(("naive-", "periodic-")):
            assert strategies == [job.split("-")[0]] and "--no-judge" in command


def test_devices_and_threads(study):
    config, submit, scripts = study
    for job, text in scripts.items():
        assert f"#SBATCH --cpus-per-task={config.slurm.cpus_per_task}" in text
        assert f"export OMP_NUM_THREADS={config.slurm.cpus_per_task}\n" in text
        gpus = re.search(r"#SBATCH --gpus(?:-per-task)?=(\d+)", text)
        commands = _commands(text)
        workflow = next(c for c in commands if "workflow" in c)
        job_config = yaml.safe_load(Path(workflow[workflow.index("--config") + 1]).read_text())
        is_md = job.endswith("-md") or "-md-" in job
        if is_md:
            assert gpus and int(gpus.group(1)) >= 1, job
            assert job_config["md"]["device"] == "cuda", job
        if "-ft-" in job:
            assert job_config["finetune"]["device"] == config.finetune.device == "cuda"
            assert gpus, job
        if "-label" in job or job in ("start", "naive-pool", "report"):
            assert not gpus, job
    # every job reads the configuration as given, but for MD on the GPUs the MD jobs request
    written = load_workflow_config(submit.parent.parent / "workflow-input.yaml")
    assert written == dataclasses.replace(config, md=dataclasses.replace(config.md, device="cuda"))
    # the MPI ensemble reads the same configuration, so its md.yaml gets device cuda too
    mpi = _commands(scripts["naive-md"])
    assert mpi[0][:3] == [sys.executable, "-m", "umlipft.workflows.slurm"]
    assert any(c[-1] == "--no-progress" and "md" in c for c in mpi)
    assert "#SBATCH --gpus-per-task=1" in scripts["naive-md"]


def test_programs_by_absolute_path(study):
    _, submit, scripts = study
    umlipft = str(Path(sys.executable).parent / "umlipft")
    texts = dict(scripts, submit=submit.read_text())
    for job, text in texts.items():
        commands = _commands(text)
        assert commands, job
        for tokens in commands:
            program = tokens[0]
            if program in ("srun", "sbatch"):  # Slurm's own, not installed here: what it runs must be
                assert shutil.which(program) is None
                if program == "sbatch":
                    continue
                program = tokens[1]
            assert Path(program).is_absolute() and Path(program).is_file(), f"{job}: {' '.join(tokens)}"
            if "workflow" in tokens or tokens[-1] == "--no-progress":
                assert umlipft in tokens, job


def test_bash_syntax(study):
    _, submit, _ = study
    for path in [submit, *submit.parent.glob("*.sbatch")]:
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


def _limit(text: str) -> float:
    return slurm_seconds(re.search(r"#SBATCH --time=(\S+)", text).group(1))


def test_time_limits_estimated_and_overridden(study, tmp_path):
    config, _, scripts = study
    assert config.slurm.time is None
    start, md = _limit(scripts["start"]), _limit(scripts["naive-md"])
    assert start <= 3600 and md >= 10 * start  # a 1-ns MD job vs the start structures
    assert _limit(scripts["eval-long-FT5-md"]) > _limit(scripts["eval-sc-FT5-md"])  # 8 ns vs 1 ns
    assert _limit(scripts["periodic-ft-05"]) > _limit(scripts["periodic-ft-01"])  # 50 vs 10 frames
    overridden = _config(time="2:00:00", time_by_kind={"md": "30:00:00"})
    submit = write_slurm_scripts("compare", STRATEGIES, overridden, tmp_path / "wf")
    for path in submit.parent.glob("*.sbatch"):
        is_md = path.name.endswith("-md.sbatch") or "-md-" in path.name
        assert _limit(path.read_text()) == (30 * 3600 if is_md else 2 * 3600), path.name


def test_bad_slurm_settings_are_refused():
    with pytest.raises(ConfigError, match="time_by_kind"):
        _config(time_by_kind={"mdd": "1:00:00"})
    with pytest.raises(ConfigError, match="not a Slurm time"):
        _config(time="two days")
    with pytest.raises(ConfigError, match="time_by_kind.md"):
        _config(time_by_kind={"md": 108000})  # what YAML makes of an unquoted 30:00:00
    assert slurm_seconds("1-12") == 36 * 3600 and slurm_seconds("90") == 5400


def test_device_is_not_part_of_the_run():
    cpu = MDConfig(structure=("a.extxyz",), device="cpu")
    cuda = MDConfig(structure=("a.extxyz",), device="cuda")
    assert config_fingerprint(cpu) == config_fingerprint(cuda)
    prepared = PreparedRun(Path("."), Path("m.pt"), ("H",), (), (False,))
    assert lammps_variables(cuda, prepared, 0, Path("."), None)["device"] == "cuda"
    with pytest.raises(ConfigError, match="device"):
        MDConfig(structure=("a.extxyz",), device="gpu").validate()


def test_md_stage_inputs_do_not_depend_on_the_device(tmp_path):
    from umlipft.workflows.stages import md_stage

    seen = []

    class Recording(WorkflowState):
        def run(self, name, inputs, func, deps=()):
            seen.append(fingerprint({"inputs": dict(inputs)}))
            return {}

    state = Recording(tmp_path)
    for device in ("cpu", "cuda"):
        config = load_workflow_config(STUDY, overrides={"foundation": str(MODEL), "md": {"device": device}})
        md_stage(state, config, "x/md", model=str(MODEL), steps=10, seed=1, structures=["s.extxyz"])
    assert len(seen) == 2 and seen[0] == seen[1]


def test_only_defers_other_jobs_stages_and_saves_merge(tmp_path):
    """Two jobs of parallel branches in one directory: each runs its own stage only, and the
    state file keeps both results whatever the order of their saves."""
    a = WorkflowState(tmp_path, until="b/label", only=["b"])
    b = WorkflowState(tmp_path, until="c/label", only=["c"])
    with pytest.raises(Deferred):
        a.run("c/label", {}, lambda folder: {"by": "a"})
    assert a.run("b/label", {}, lambda folder: {"by": "a"}) == {"by": "a"}
    assert b.run("c/label", {}, lambda folder: {"by": "b"}) == {"by": "b"}
    a.save()  # a's copy predates c/label: saving it must not drop b's result
    merged = WorkflowState(tmp_path)
    assert merged.result("b/label") == {"by": "a"} and merged.result("c/label") == {"by": "b"}
    # a finished stage of another job is no obstacle: it is read, not run
    c = WorkflowState(tmp_path, until="d", only=["d"])
    assert c.run("b/label", {}, lambda folder: {"by": "c"}) == {"by": "a"}


def test_runner_refuses_a_job_whose_stage_is_blocked(tmp_path):
    from umlipft.workflows.runner import run_workflow

    with pytest.raises(StateError, match="was not reached"):
        # start/00 is the start job's: a periodic job cannot begin before it finished
        config = load_workflow_config(profile="quick", overrides={"foundation": str(MODEL)})
        run_workflow(["periodic"], config, tmp_path, until="periodic/seg-00/md",
                     only=["periodic/seg-00"], judge=False, log=None)
