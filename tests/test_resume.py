"""``resume=true`` on one job folder: the config hash in the table, what is skipped, what runs
again, what is refused; a writer killed mid-write leaves the old table whole."""

import logging
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moebench import results
from moebench.config import ConfigError, compose, resolve
from moebench.runner import config_container, config_hash, run_job

FAST = ["shape=tiny", "bench=topk", "timing.warmup=1", "timing.repeats=3"]


def run(tmp, *overrides):
    return run_job(compose([*FAST, *overrides]), tmp)


def digest(*overrides):
    cfg = compose([*FAST, *overrides])
    return config_hash(config_container(cfg), resolve(cfg))


def test_the_hash_is_of_what_is_measured():
    assert digest() == digest("resume=true")  # resuming does not change the measurement
    assert digest() != digest("tokens=256") and digest() != digest("seed=3") and digest() != digest("timing.repeats=4")
    assert digest("shape=tiny") == digest("tokens=512")  # the resolved config: the preset's own value
    assert len(digest()) == 16


def test_resume_skips_a_job_whose_table_holds_its_config(tmp_path, caplog):
    df = run(tmp_path)
    path = tmp_path / results.FILENAME
    assert set(df.config_hash) == {digest()}
    before = path.read_bytes()
    with caplog.at_level(logging.INFO, logger="moebench"):
        again = run(tmp_path, "resume=true")
    assert path.read_bytes() == before and again.timestamp_utc.tolist() == df.timestamp_utc.tolist()
    skipped = f"skipped: {path} holds this config (config_hash {digest()}) and no failed row (resume=true)"
    assert skipped in caplog.messages
    run(tmp_path)  # without resume the job runs and rewrites its table
    assert path.read_bytes() != before


def test_resume_runs_a_job_with_failed_rows_again(tmp_path, caplog):
    run(tmp_path)
    path = tmp_path / results.FILENAME
    table = pq.read_table(path)
    failed = table.set_column(table.schema.get_field_index("status"), "status", pa.array(["error"] * table.num_rows))
    pq.write_table(failed, path)
    with caplog.at_level(logging.INFO, logger="moebench"):
        df = run(tmp_path, "resume=true")
    assert f"resume: {path} has {table.num_rows} failed row(s): running the job again" in caplog.messages
    assert (df.status == "ok").all() and (results.load(path).status == "ok").all()


def test_resume_never_overwrites_another_config(tmp_path):
    run(tmp_path, "topk=1")
    before = (tmp_path / results.FILENAME).read_bytes()
    with pytest.raises(ConfigError, match=f"resume=true: {tmp_path}/results.parquet holds another config "
                                          rf"\(config_hash {digest('topk=1')}, this job {digest('topk=2')}\) and is "
                                          "not overwritten; resume the same sweep command, or give a new hydra.sweep.dir"):
        run(tmp_path, "topk=2", "resume=true")
    assert (tmp_path / results.FILENAME).read_bytes() == before
    table = pq.read_table(tmp_path / results.FILENAME)
    pq.write_table(table.drop_columns(["config_hash"]), tmp_path / results.FILENAME)  # a table from before resume
    old = (tmp_path / results.FILENAME).read_bytes()
    with pytest.raises(ConfigError, match=r"has no config_hash \(written before resume existed\) and is not overwritten"):
        run(tmp_path, "topk=1", "resume=true")
    assert (tmp_path / results.FILENAME).read_bytes() == old


def test_resume_runs_a_missing_job(tmp_path):
    df = run(tmp_path / "never_ran", "resume=true")
    assert (df.status == "ok").all() and (tmp_path / "never_ran" / results.FILENAME).is_file()


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import pyarrow.parquet as pq
    from moebench import results

    def half_then_killed(table, where):
        with open(where, "wb") as f:
            f.write(b"PAR1" + b"x" * 100)  # a partial file, then the process is killed mid-write
        os.kill(os.getpid(), signal.SIGKILL)

    pq.write_table = half_then_killed
    results.write([{"bench": "topk", "stage": "route", "status": "ok"}], sys.argv[1])
""")


def test_a_writer_killed_mid_write_leaves_the_table_whole(tmp_path, caplog):
    """SIGKILL while the table is written: results.parquet is the previous one, whole; the
    partial temporary file is removed by the next job into the folder."""
    run(tmp_path)
    path = tmp_path / results.FILENAME
    before = path.read_bytes()
    p = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    assert path.read_bytes() == before and pq.read_table(path).num_rows == 2  # topk: route and select
    partial = results.partial_files(tmp_path)
    assert len(partial) == 1 and partial[0].read_bytes().startswith(b"PAR1xxx")
    assert results.find(tmp_path) == [path.resolve()]  # never read as a table
    with caplog.at_level(logging.INFO, logger="moebench"):
        run(tmp_path, "resume=true")  # skipped, and the partial file removed
    assert results.partial_files(tmp_path) == [] and path.read_bytes() == before
    assert f"removed {partial[0]}: the unfinished table of a killed job" in caplog.messages
