"""Cluster sweeps through Hydra's submitit launcher: the launcher configs compose, the job
function pickles, and a local submitit sweep writes one table per job that ``load`` joins."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from moebench import results
from moebench.cli import check_overrides
from moebench.config import CONF_DIR

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")

REPO = Path(__file__).resolve().parent.parent
FAST = ["timing.repeats=3", "timing.warmup=1"]


def hydra_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_precheck_leaves_launcher_overrides_to_hydra():
    assert check_overrides(["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "topk=1,2"]) is None
    assert check_overrides(["-m", "hydra/launcher=local", "hydra.launcher.timeout_min=5"]) is None
    assert "not a known shape" in check_overrides(["-m", "hydra/launcher=local", "shape=nope"])


def test_slurm_launcher_config_one_gpu_per_job_overridable():
    cfg = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                    "hydra.launcher.array_parallelism=4")
    lc = cfg.hydra.launcher
    assert lc._target_ == "hydra_plugins.moebench_launcher.launchers.SlurmLauncher"  # waits for every job
    assert (lc.partition, lc.timeout_min, lc.array_parallelism) == ("gpu", 30, 4)
    assert (lc.gpus_per_node, lc.tasks_per_node, lc.nodes) == (1, 1, 1)
    assert hydra_cfg("hydra/launcher=slurm").hydra.launcher.partition is None
    assert hydra_cfg("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4").hydra.launcher.gpus_per_node == 4


def test_local_launcher_config():
    lc = hydra_cfg("hydra/launcher=local").hydra.launcher
    assert lc._target_.endswith("submitit_launcher.LocalLauncher")
    assert lc.gpus_per_node == 0 and lc.timeout_min == 60


def test_job_function_pickles_by_value():
    """Under ``python run.py`` the task function lives in ``__main__``: cloudpickle carries it by
    value, and it must only reach importable module globals."""
    import cloudpickle

    sys.path.insert(0, str(REPO))
    try:
        run = importlib.import_module("run")
    finally:
        sys.path.remove(str(REPO))
    task = run.main.__wrapped__
    cloudpickle.register_pickle_by_value(run)
    try:
        blob = cloudpickle.dumps(task)
    finally:
        cloudpickle.unregister_pickle_by_value(run)
    fn = cloudpickle.loads(blob)
    assert fn.__name__ == "main" and fn.__globals__["hydra_main"].__module__ == "moebench.app"


def _multirun(*args, timeout=300):
    return subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=local", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_local_submitit_sweep_writes_a_table_per_job(tmp_path):
    p = _multirun("shape=tiny", "topk=1,2", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    tables = sorted(tmp_path.glob("*/results.parquet"))
    assert [t.parent.name for t in tables] == ["0", "1"]
    assert list((tmp_path / ".submitit").glob("*/*_result.pkl"))  # the jobs ran through submitit
    df = results.load(tmp_path)
    assert (df.status == "ok").all(), df.message.tolist()
    assert sorted(df.groupby("job_num").topk.first().tolist()) == [1, 2]
    assert set(df.sweep_dir) == {str(tmp_path)} and df.source_file.nunique() == 2
    assert set(df.output_dir) == {str((tmp_path / "0").resolve()), str((tmp_path / "1").resolve())}
    assert df.groupby("job_num").stage.apply(list).tolist() == [["route", "metadata", "pack", "combine", "total"]] * 2


@pytest.mark.slow
def test_ep_dispatch_job_spawns_its_ranks_inside_a_submitit_job(tmp_path):
    p = _multirun("bench=ep_dispatch", "shape=tiny", "world_size=2", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    df = results.load(tmp_path)
    assert (df.status == "ok").all(), df.message.tolist()
    assert len(df) == 8 and sorted(set(df["rank"])) == [0, 1] and (df.job_num == 0).all()


def test_a_submitit_launcher_without_its_plugin_names_the_extra(monkeypatch):
    import importlib.util

    from moebench import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hydra_plugins.hydra_submitit_launcher" else real(name, *a))
    assert cli.check_overrides(["-m", "hydra/launcher=slurm", "topk=1,2"]) == (
        "hydra/launcher=slurm needs Hydra's submitit launcher: pip install -e '.[cluster]'")
    assert cli.check_overrides(["-m", "hydra/launcher=process", "topk=1,2"]) is None
