"""A real Slurm: a one-node cluster started on this machine (tests/slurm_cluster.py: Debian's
slurm-wlm and munge), a sweep through ``hydra/launcher=slurm`` queued and run by it, one job
cancelled with scancel. Skipped where Slurm is not installed, except under ``.ci/run``
(MOEBENCH_TEST_SLURM=1), where a missing Slurm fails."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moebench import results

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
from slurm_cluster import PARTITION, LocalSlurm, missing_binaries  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
REPO = Path(__file__).resolve().parent.parent
#: the launcher options for the test node: no GPU, its 2 CPUs as 2 one-CPU jobs at a time
ON_THE_TEST_NODE = ["hydra/launcher=slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.cpus_per_task=1",
                    "hydra.launcher.timeout_min=5"]


@pytest.fixture(scope="module")
def slurm():
    required = bool(os.environ.get("MOEBENCH_TEST_SLURM"))
    why = None
    if missing_binaries():
        why = f"no Slurm here ({', '.join(missing_binaries())} not found: apt-get install slurm-wlm munge)"
    elif os.geteuid() != 0:
        why = "the local Slurm runs as root (slurmd starts the jobs)"
    if why:
        if required:
            pytest.fail(f"MOEBENCH_TEST_SLURM is set, but {why}")
        pytest.skip(why)
    cluster = LocalSlurm().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def sweep(cluster, tmp_path, *args):
    return subprocess.Popen([sys.executable, "run.py", "-m", *args, f"hydra.sweep.dir={tmp_path}"], cwd=REPO,
                            env=cluster.env(), stdout=open(tmp_path.parent / f"{tmp_path.name}.out", "w"),
                            stderr=subprocess.PIPE, text=True)


def output(tmp_path) -> str:
    return (tmp_path.parent / f"{tmp_path.name}.out").read_text()


def test_a_sweep_queued_and_run_by_slurm_with_one_job_cancelled(slurm, tmp_path):
    """Four jobs of one array, two at a time on the node's two CPUs; the fourth (100000 repeats:
    minutes) is cancelled with scancel while it runs: it is reported as failed, in one line, and
    the three others write their tables."""
    p = sweep(slurm, tmp_path, *ON_THE_TEST_NODE, "hydra.launcher.gpus_per_node=0", "shape=tiny",
              "timing.warmup=1", "timing.repeats=3,4,5,100000")
    seen, cancelled, t0 = {}, None, time.monotonic()
    while cancelled is None and time.monotonic() - t0 < 120 and p.poll() is None:
        queue = slurm.squeue()
        seen.update(queue)
        cancelled = next((j for j, s in queue.items() if j.endswith("_3") and s == "RUNNING"), None)
        time.sleep(0.2)
    assert cancelled, (f"job 3 never ran: {seen}", output(tmp_path), p.poll() and p.stderr.read())
    subprocess.run(["scancel", cancelled], check=True, env=slurm.env())
    _, err = p.communicate(timeout=180)
    out = output(tmp_path)
    array = cancelled.split("_")[0]
    assert p.returncode == 1, (out, err)
    # queued and run by Slurm: one array of four tasks, each with its submitit folder
    assert {f"{array}_{i}" for i in range(4)} <= set(seen) | set(slurm.squeue()), seen
    assert sorted(d.name for d in (tmp_path / ".submitit").iterdir() if d.is_dir()) == [
        array, *(f"{array}_{i}" for i in range(4))]
    line = (f"job 3 (timing.repeats=100000) failed on Slurm: job {cancelled} CANCELLED, no result (its log: "
            f"{tmp_path}/.submitit/{cancelled}/{cancelled}_0_log.err)")
    assert line in err.splitlines() and line in out, (out, err)
    assert "Slurm accounting is off (sacct: " in out and "Bypassing sacct error" not in out + err
    assert "sweep of 4 jobs done in" in out and "3 ok, 1 failed" in out
    df = results.load(tmp_path)
    assert sorted(df.job_num.unique()) == [0, 1, 2] and (df.status == "ok").all(), df.message.tolist()
    assert sorted(df.groupby("job_num").repeats.max()) == [3, 4, 5]
    assert not (tmp_path / "3" / "results.parquet").exists()
    assert slurm.squeue()[cancelled] == "CANCELLED"


def test_a_gpu_request_on_a_node_without_gpus_is_one_line(slurm, tmp_path):
    """The launcher's default (one GPU per job) on the GPU-less node: sbatch refuses; one line
    naming the option and what to give, exit 2, nothing queued."""
    before = set(slurm.squeue())
    p = sweep(slurm, tmp_path, *ON_THE_TEST_NODE, "shape=tiny", "topk=1,2")
    _, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 2, (output(tmp_path), err)
    assert len(lines) == 1, err
    assert lines[0].startswith("moebench: error: sbatch refused the sweep: Invalid generic resource (gres) "
                               "specification (hydra.launcher.partition=debug, hydra.launcher.gpus_per_node=1, ")
    assert lines[0].endswith("on nodes without GPUs give hydra.launcher.gpus_per_node=0")
    assert set(slurm.squeue()) == before and not list(tmp_path.rglob("*.parquet"))
