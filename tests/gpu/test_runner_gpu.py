"""The runner on a GPU: both timing modes produce checked, timed rows with a same-job copy."""

import pytest

from moebench.app import run_job
from moebench.config import compose

pytestmark = pytest.mark.gpu


def _run(tmp_path, *overrides):
    cfg = compose(["tokens=4096", "timing.repeats=20", *overrides])
    return run_job(cfg, tmp_path)


@pytest.mark.parametrize("mode", ["events", "graph", "rotated"])
def test_routing_bench_on_gpu(tmp_path, mode):
    df = _run(tmp_path, f"timing={mode}")
    assert (df.status == "ok").all(), df.message.tolist()
    assert (df.timing_mode == mode).all() and (df.device == "cuda").all()
    assert (df.shape_name == "seed").all() and df.gpu_name.str.len().gt(0).all()
    assert (df.copy_GBps > 1000).all()
    assert df.pct_of_copy.between(0, 150).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("router,logits", [("softmax_topk", "uniform"), ("sigmoid_bias", "zipf"),
                                           ("topk_softmax", "hot")])
def test_torch_reference_checks_on_gpu(tmp_path, dtype, router, logits):
    df = _run(tmp_path, "bench=capacity", f"dtype={dtype}", f"router={router}", f"logits={logits}",
              "timing.repeats=3", "tokens=1000", "hidden=136")
    assert (df.status == "ok").all(), df.message.tolist()
