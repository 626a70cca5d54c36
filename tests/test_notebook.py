"""notebooks/analysis.ipynb: in sync with its jupytext source, without outputs, and it
executes (nbclient, kernel python3 on this interpreter) on a CPU sweep, on no data, and on
the committed GPU sample runs/sample when it exists."""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from moebench.report import WHAT  # noqa: E402
from test_report import shared_sweep  # noqa: E402  (tests/ is on sys.path, pytest's default import mode)

REPO = Path(__file__).resolve().parent.parent
NB = REPO / "notebooks" / "analysis.ipynb"
SRC = REPO / "notebooks" / "analysis.py"
SAMPLE = REPO / "runs" / "sample"


@pytest.fixture(scope="session")
def sweep(tmp_path_factory) -> Path:
    return shared_sweep(tmp_path_factory)


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A `python3` kernelspec that runs this interpreter (ahead of any other on the machine),
    and no MOEBENCH_* variables from the caller."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (moebench tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    for var in ("MOEBENCH_RESULTS", "MOEBENCH_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def execute(cwd: Path):
    nb = nbformat.read(NB, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def outputs(nb):
    texts, pngs = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                texts.append(out["text"])
            data = out.get("data", {})
            pngs += "image/png" in data
            texts.append(data.get("text/plain", ""))
            assert out.get("output_type") != "error", out
    return "\n".join(texts), pngs


def test_notebook_is_the_jupytext_pair_without_outputs():
    ipynb = nbformat.read(NB, as_version=4)
    source = jupytext.read(SRC)
    assert [(c.cell_type, c.source) for c in ipynb.cells] == [(c.cell_type, c.source) for c in source.cells], \
        "notebooks/analysis.ipynb is out of date: run `jupytext --sync notebooks/analysis.py`"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in ipynb.cells
               if c.cell_type == "code")
    params = [c for c in ipynb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "runs/sample" in params[0].source
    assert ipynb.metadata["kernelspec"]["name"] == "python3"


def test_notebook_on_a_cpu_sweep(sweep, kernel_env):
    # run where Jupyter runs it: in the notebook's folder, the data named by the env var
    kernel_env.setenv("MOEBENCH_RESULTS", str(sweep))
    nb = execute(NB.parent)
    text, pngs = outputs(nb)
    assert f"repo root: {REPO}" in text
    assert re.search(r"\b\d+ rows from 6 tables", text), text[:2000]
    assert pngs >= 4  # bandwidth, latency, capacity, expert load
    assert f"no rows for {WHAT['moe_layer']}" in text
    assert "== CPU · wall (wall clock):" in text  # the leaderboard
    assert "no unsupported / mismatch / error rows" in text


def test_notebook_without_data_says_so(tmp_path, kernel_env):
    # another working directory: the repo root comes from MOEBENCH_ROOT
    empty = tmp_path / "empty"
    empty.mkdir()
    kernel_env.setenv("MOEBENCH_ROOT", str(REPO))
    kernel_env.setenv("MOEBENCH_RESULTS", str(empty))
    nb = execute(tmp_path)
    text, pngs = outputs(nb)
    assert pngs == 0
    assert "no results" in text
    for what in WHAT.values():
        assert f"no rows for {what}" in text


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="runs/sample (the committed GPU sample) is not here yet")
def test_notebook_on_the_committed_sample(tmp_path, kernel_env):
    # the default RESULTS (runs/sample, relative to the repo root) from another directory
    kernel_env.setenv("MOEBENCH_ROOT", str(REPO))
    nb = execute(tmp_path)
    text, pngs = outputs(nb)
    assert "no results" not in text
    assert pngs >= 1
