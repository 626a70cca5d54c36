"""Sweeps through the default launcher (``hydra/launcher=process``: every job in a process of
its own, one after another): a job that kills its own process fails alone and is reported with
its signal; a sweep killed with SIGKILL halfway loses no table, leaves no partial file, and
resumes (``resume=true``) with only the missing jobs; the progress lines; the launcher config."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir

from moebench import results
from moebench.config import CONF_DIR
from moebench.sweep import Progress, died, duration, job_labels

REPO = Path(__file__).resolve().parent.parent
FAST = ["timing.warmup=1", "timing.repeats=3"]
KILLER = ["bench=topk", "shape=tiny", "topk=1,2,4", "impl._target_=fake_impls.KillsItsProcessAtTopk2",
          "impl.name=kills", *FAST]


def run_py(*args, timeout=300, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def test_multirun_runs_each_job_in_a_process_of_its_own_by_default():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        lc = compose("config", return_hydra_config=True).hydra.launcher
    assert lc._target_ == "hydra_plugins.moebench_launcher.launchers.ProcessLauncher" and lc.timeout_min is None


@pytest.mark.slow
def test_a_job_that_kills_its_own_process_fails_alone(tmp_path):
    """Job 1 kills its own process (SIGKILL, as a kernel fault that takes the process with it
    would): it is reported with its signal, jobs 0 and 2 write their tables, the sweep exits 1."""
    p = run_py("-m", *KILLER, f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 1, p.stderr[-3000:]
    line = f"job 1 (topk=2) died: SIGKILL (its folder: {tmp_path}/1)"
    assert line in p.stderr.splitlines(), p.stderr
    assert p.stderr.count("Traceback") == 0, p.stderr
    df = results.load(tmp_path)
    assert sorted(set(df.job_num)) == [0, 2] and (df.status == "ok").all(), df.message.tolist()
    assert sorted(set(df.topk)) == [1, 4] and not (tmp_path / "1" / "results.parquet").exists()
    # where the sweep is: job i of n, what is left, and the end
    out = p.stdout
    assert "sweep 1/3: job 0 (topk=1)\n" in out
    assert "sweep 2/3: job 1 (topk=2) -- 1 done in " in out and "sweep 3/3: job 2 (topk=4) -- 2 done in " in out
    assert " left\n" in out.split("sweep 3/3: ", 1)[1].split("\n", 1)[0] + "\n"
    assert "sweep of 3 jobs done in " in out and ": 2 ok, 1 failed" in out and line in out


@pytest.mark.slow
def test_the_same_sweep_in_one_process_dies_with_the_job(tmp_path):
    """What the process per job prevents: Hydra's own launcher runs every job in one process,
    and the job that kills it takes the rest of the sweep with it."""
    p = run_py("-m", *KILLER, "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == -signal.SIGKILL
    assert sorted(set(results.load(tmp_path).job_num)) == [0]


def _live_in_group(pgid: int) -> list[int]:
    """The processes of a process group that are not zombies (from /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a job dies with its sweep on Linux only")
def test_a_sweep_killed_halfway_resumes_with_only_the_missing_jobs(tmp_path):
    sweep = ["-m", "shape=tiny", "topk=1,2,3,4", *FAST, f"hydra.sweep.dir={tmp_path}"]
    with open(tmp_path.parent / "killed.out", "w") as out:
        p = subprocess.Popen([sys.executable, "run.py", *sweep], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    t0 = time.monotonic()
    while not (tmp_path / "1" / results.FILENAME).exists():
        assert p.poll() is None and time.monotonic() - t0 < 180, (tmp_path.parent / "killed.out").read_text()
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)  # the sweep's process only: its running job dies with it
    p.wait()
    t0 = time.monotonic()
    while _live_in_group(p.pid):
        assert time.monotonic() - t0 < 30, f"the running job outlived its sweep: {_live_in_group(p.pid)}"
        time.sleep(0.1)
    tables = {t.parent.name: t.read_bytes() for t in tmp_path.glob(f"*/{results.FILENAME}")}
    assert {"0", "1"} <= set(tables) and len(tables) < 4, sorted(tables)  # killed halfway
    for name in tables:  # every table there is whole
        assert pq.read_table(tmp_path / name / results.FILENAME).num_rows == 5

    p = run_py(*sweep, "resume=true")
    assert p.returncode == 0, p.stderr[-3000:]
    skipped = set(re.findall(r"sweep \d/4: job (\d) \(topk=\d\) skipped: ", p.stdout))
    ran = set(re.findall(r"sweep \d/4: job (\d) \(topk=\d\)(?: -- [^\n]*)?$", p.stdout, re.M))
    assert skipped == set(tables) and ran == {"0", "1", "2", "3"} - set(tables), p.stdout
    assert "sweep of 4 jobs done in " in p.stdout and f"{4 - len(tables)} ok, 0 failed, {len(tables)} skipped" in p.stdout
    for name, before in tables.items():  # no completed table lost or rewritten
        assert (tmp_path / name / results.FILENAME).read_bytes() == before
    df = results.load(tmp_path)
    assert sorted(df.groupby("job_num").topk.first()) == [1, 2, 3, 4] and (df.status == "ok").all()
    assert df.groupby("job_num").config_hash.nunique().eq(1).all() and df.config_hash.nunique() == 4
    assert not [f for f in tmp_path.rglob("*") if f.name.endswith(results.PARTIAL_SUFFIX)]


@pytest.mark.slow
def test_resume_into_a_sweep_of_other_configs_runs_nothing(tmp_path):
    """A resumed sweep whose folders hold other configs (the sweep was changed): one line naming
    the table, exit 2, nothing run and nothing overwritten."""
    assert run_py("-m", "shape=tiny", "bench=topk", "topk=1,2", *FAST, f"hydra.sweep.dir={tmp_path}").returncode == 0
    before = (tmp_path / "0" / results.FILENAME).read_bytes()
    p = run_py("-m", "shape=tiny", "bench=topk", "topk=3,4", *FAST, f"hydra.sweep.dir={tmp_path}", "resume=true")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"moebench: error: resume=true: {tmp_path}/0/results.parquet holds another config")
    assert "bench=topk" not in p.stdout and (tmp_path / "0" / results.FILENAME).read_bytes() == before


def test_job_labels_name_what_varies():
    jobs = [["shape=tiny", "topk=1", "experts=32"], ["shape=tiny", "topk=2", "experts=32"],
            ["shape=tiny", "topk=1", "experts=64"]]
    assert job_labels(jobs) == ["topk=1 experts=32", "topk=2 experts=32", "topk=1 experts=64"]
    assert job_labels([["shape=tiny", "topk=2"]]) == ["shape=tiny topk=2"]
    assert job_labels([[]]) == ["no overrides"]


def test_progress_estimates_from_the_jobs_that_ran():
    prog = Progress(5)
    assert prog.status() == ""
    prog.finished(skipped=True)
    assert prog.status().startswith("1 done in ") and "left" not in prog.status()  # a skip says nothing of time
    prog.t0 -= 20
    prog.finished()  # one job ran in about 20 s: three more to run
    assert prog.status().endswith("about 1m00s left"), prog.status()
    assert [duration(s) for s in (3.25, 42, 61, 3600 + 125)] == ["3.2s", "42s", "1m01s", "1h02m"]


def test_dead_job_lines():
    assert died(-signal.SIGKILL, None) == "died: SIGKILL" and died(-signal.SIGSEGV, None) == "died: SIGSEGV"
    assert died(3, None) == "exited with status 3 before reporting a result"
    assert died(None, 0.5) == "ran past hydra.launcher.timeout_min=0.5 and was killed"


@pytest.mark.slow
def test_a_job_past_the_timeout_is_killed_and_reported(tmp_path):
    p = run_py("-m", "shape=tiny", "bench=topk", "timing.warmup=1", "timing.repeats=3,1000000",
               "hydra.launcher.timeout_min=0.2", f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 1, p.stderr[-3000:]
    assert (f"job 1 (timing.repeats=1000000) ran past hydra.launcher.timeout_min=0.2 and was killed (its folder: "
            f"{tmp_path}/1)") in p.stderr
    assert sorted(set(results.load(tmp_path).job_num)) == [0]


@pytest.mark.slow
def test_a_job_that_crashes_after_reporting_keeps_its_result(tmp_path):
    """A process that dies on its way out (CUDA's teardown can), after the job wrote its table
    and reported: the job is done, the crash is a warning."""
    p = run_py("-m", "bench=topk", "shape=tiny", "topk=1,2", "impl._target_=fake_impls.CrashesAtExit",
               "impl.name=crashes", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "job 0 (topk=1) reported its result, then its process died of SIGSEGV" in p.stdout
    assert sorted(set(results.load(tmp_path).job_num)) == [0, 1] and "2 ok, 0 failed" in p.stdout


@pytest.mark.slow
def test_a_timeout_that_is_no_time_is_one_line(tmp_path):
    p = run_py("-m", "shape=tiny", "topk=1,2", "hydra.launcher.timeout_min=0", f"hydra.sweep.dir={tmp_path}")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and lines == [
        "moebench: error: hydra.launcher.timeout_min=0 is not accepted; minutes > 0 (null: no limit)"], p.stderr
    assert not list(tmp_path.rglob("*.parquet"))
