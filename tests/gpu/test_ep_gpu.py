"""bench=ep_dispatch on NCCL, one rank per GPU (needs >= 2 GPUs; run with `pytest -m gpu`).

On machines with NVLink, keep NVLink multicast off: `export NCCL_NVLS_ENABLE=0` before
pytest (the ranks inherit the environment; the first test checks that they did)."""

import os

import pytest
import torch

from moebench.benches import ep_dispatch as ep
from moebench.app import run_job
from moebench.config import ConfigError, compose
from moebench.routing import CapacitySpec

N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_GPUS < 2, reason="needs >= 2 CUDA GPUs")]
WORLD_SIZES = sorted({2, min(4, N_GPUS)} if N_GPUS >= 2 else {2})


def cfg_of(*overrides):
    return compose(["bench=ep_dispatch", *overrides])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_nccl_ep_equals_single_process_reference(world_size):
    E = 8 * world_size
    base = dict(tokens=1024, hidden=512, experts=E, topk=4, seed=3)
    probs = [
        ep.EPProblem(**base),
        ep.EPProblem(**base, logits={"kind": "zipf", "alpha": 1.5}, expert="scale"),
        ep.EPProblem(**base, logits={"kind": "hot"}, dead_experts=tuple(range(E - E // world_size, E)),
                     expert="scale"),
        ep.EPProblem(**base, capacity=CapacitySpec(1.0), expert="scale"),
        ep.EPProblem(**{**base, "topk": 2}, dtype_name="float16", weighted=False),
    ]
    ranks = ep.launch(ep.run_problems, world_size, "cuda", args=(probs,), timeout_s=300)
    assert [r["backend"] for r in ranks] == ["nccl"] * world_size
    assert [r["device"] for r in ranks] == [f"cuda:{i}" for i in range(world_size)]
    assert all(r["env"].get("NCCL_NVLS_ENABLE") == os.environ.get("NCCL_NVLS_ENABLE") for r in ranks)
    for i in range(len(probs)):
        sends = torch.tensor([r["cases"][i]["send_split"] for r in ranks])
        recvs = torch.tensor([r["cases"][i]["recv_split"] for r in ranks])
        assert torch.equal(sends.T, recvs), i
        for r in ranks:
            c = r["cases"][i]
            assert torch.equal(c["out"], c["ref"]), i  # bitwise: the same ops on the same device
    assert ranks[-1]["cases"][2]["n_recv"] == 0  # the last rank's experts are dead


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ep_dispatch_job_on_gpus(tmp_path, world_size):
    df = run_job(cfg_of(f"world_size={world_size}", "tokens=4096", "hidden=2048", "experts=64", "topk=8",
                        "logits=zipf", "timing.repeats=20"), tmp_path)
    assert (df.status == "ok").all(), df.message.tolist()
    assert len(df) == 4 * world_size and (df.backend == "nccl").all() and (df.timing_mode == "events").all()
    assert (df.device == "cuda").all() and df.gpu_name.str.len().gt(0).all()
    assert sorted(set(df["rank"])) == list(range(world_size))
    for col in ("time_us_median", "time_us_slowest_rank", "algbw_GBps", "busbw_GBps", "pct_of_raw"):
        assert df[col].notna().all() and (df[col] > 0).all(), col
    raw = df[df.stage == "raw_a2a"]
    assert (raw.busbw_GBps > 1).all()  # GB/s: NVLink or PCIe, not a host fallback
    assert df[df.stage == "dispatch"].pct_of_raw.between(0, 200).all()
    assert (df.recv_imbalance >= 1).all()


def test_more_ranks_than_gpus_is_a_config_error(tmp_path):
    w = N_GPUS + 1
    with pytest.raises(ConfigError, match=f"world_size={w} needs {w} GPUs"):
        run_job(cfg_of(f"world_size={w}", f"experts={8 * w}", "tokens=256", "hidden=128"), tmp_path)
    assert not (tmp_path / "results.parquet").exists()
