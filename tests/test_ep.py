"""bench=ep_dispatch on the CPU: gloo ranks give the single-process reference bit for bit,
uneven routing included, and the runner writes one table with a row per rank and stage."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moebench import results, routing
from moebench.benches import ep_dispatch as ep
from moebench.app import JobFailed, run_job
from moebench.config import ConfigError, compose, resolve
from moebench.routing import CapacitySpec, RouterSpec

REPO = Path(__file__).resolve().parent.parent
FAST = ["timing.warmup=1", "timing.repeats=3"]


def cfg_of(*overrides):
    return compose(["bench=ep_dispatch", *overrides])


def problems(world_size):
    """Tiny problems: balanced, zipf-skewed, an expert no token picks, a rank that receives
    nothing, capacity (position drops and padding), expert choice, unweighted, fp32."""
    E = 4 * world_size
    base = dict(tokens=48, hidden=32, experts=E, topk=2, seed=5)
    last_rank = tuple(range(E - E // world_size, E))
    return {
        "uniform": ep.EPProblem(**base),
        "zipf_scale": ep.EPProblem(**base, logits={"kind": "zipf", "alpha": 2.0}, expert="scale"),
        "dead_expert": ep.EPProblem(**base, logits={"kind": "zipf", "alpha": 1.2}, dead_experts=(1,), expert="scale"),
        "rank_gets_nothing": ep.EPProblem(**base, logits={"kind": "hot"}, dead_experts=last_rank, expert="scale"),
        "capacity": ep.EPProblem(**base, logits={"kind": "zipf", "alpha": 1.5}, capacity=CapacitySpec(1.0),
                                 expert="scale"),
        "padded": ep.EPProblem(**base, capacity=CapacitySpec(1.25, pad_to_capacity=True), expert="scale"),
        "expert_choice": ep.EPProblem(**base, router=RouterSpec("expert_choice"), expert="scale"),
        "unweighted_fp32": ep.EPProblem(**{**base, "topk": 3}, dtype_name="float32", weighted=False),
        # the received rows grouped by local expert in blocks of 16 rows (rank-local metadata)
        "aligned_scale": ep.EPProblem(**base, logits={"kind": "zipf", "alpha": 1.5}, capacity=CapacitySpec(align=16),
                                      expert="scale"),
        "source_layout": ep.EPProblem(**base, logits={"kind": "zipf", "alpha": 1.5}, expert="scale", layout="source"),
    }


def single_process_reference(p: ep.EPProblem, world_size: int) -> torch.Tensor:
    """All ranks' tokens in one process: combine(expert(pack(x))) over one metadata build.
    Capacity is a per-rank quantity (each rank drops from its own tokens), so with a capacity
    the reference is built per rank and concatenated."""
    inputs = [ep.rank_inputs(p, r, world_size) for r in range(world_size)]
    if not p.capacity.dropless or p.router.name == "expert_choice":
        return torch.cat([ep.reference_forward(i.x, i.meta, p.expert, p.weighted) for i in inputs])
    ids = torch.cat([i.ids for i in inputs])
    w = torch.cat([i.weights for i in inputs])
    x = torch.cat([i.x for i in inputs])
    meta = routing.build_metadata(ids, w, p.experts, dataclasses.replace(p.capacity, align=1))  # same output
    packed = routing.pack(x, meta)
    rows_e = torch.bincount(ids.flatten().long(), minlength=p.experts)
    expert_of_row = torch.repeat_interleave(torch.arange(p.experts), rows_e)
    y = ep.apply_experts(packed, expert_of_row, p.expert, p.experts)
    return routing.combine(y, meta, weighted=p.weighted)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ep_equals_single_process_reference(world_size, monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")  # ranks inherit the launching environment
    probs = problems(world_size)
    names = list(probs)
    ranks = ep.launch(ep.run_problems, world_size, "cpu", args=(list(probs.values()),), timeout_s=120)
    assert [r["backend"] for r in ranks] == ["gloo"] * world_size
    assert all(r["env"].get("NCCL_NVLS_ENABLE") == "0" for r in ranks)
    per_rank = [r["cases"] for r in ranks]
    El = probs["uniform"].experts // world_size
    for i, name in enumerate(names):
        p = probs[name]
        got = torch.cat([per_rank[r][i]["out"] for r in range(world_size)])
        ref = single_process_reference(p, world_size)
        assert got.dtype == ref.dtype and got.shape == (world_size * p.tokens, p.hidden)
        assert torch.equal(got, ref), name
        assert torch.equal(got, torch.cat([per_rank[r][i]["ref"] for r in range(world_size)])), name
        # what each rank sent is what the others received, and every row reached its expert's rank
        sends = torch.tensor([per_rank[r][i]["send_split"] for r in range(world_size)])
        recvs = torch.tensor([per_rank[r][i]["recv_split"] for r in range(world_size)])
        assert torch.equal(sends.T, recvs), name
        for r in range(world_size):
            e = per_rank[r][i]["recv_expert_ids"]
            assert ((e >= r * El) & (e < (r + 1) * El)).all(), name
        for r in range(world_size):  # layout=expert: rank-local metadata grouped the rows by local expert
            c = per_rank[r][i]
            if p.layout == "source":
                assert c["local_offsets"] is None
                continue
            off, gather, A = c["local_offsets"], c["local_gather"], p.capacity.align
            counts = torch.bincount(c["recv_expert_ids"] - r * El, minlength=El)
            assert len(off) == El + 1 and bool((off % A == 0).all()), name
            blocks = -(-counts // A) * A
            assert torch.equal(off[1:] - off[:-1], blocks), name
            for j in range(El):  # expert j's block: its received rows (in received order), then padding
                rows = gather[off[j]:off[j + 1]]
                mine = torch.nonzero(c["recv_expert_ids"] == r * El + j).flatten()
                assert torch.equal(rows[:len(mine)].long(), mine) and bool((rows[len(mine):] == -1).all()), name
    recv = {n: [per_rank[r][names.index(n)]["n_recv"] for r in range(world_size)] for n in names}
    assert recv["rank_gets_nothing"][-1] == 0 and min(recv["rank_gets_nothing"][:-1]) > 0
    per_expert = torch.cat([per_rank[r][names.index("zipf_scale")]["recv_counts"].sum(0) for r in range(world_size)])
    assert per_expert.max() > 2 * per_expert.float().mean()  # zipf: a few experts get most rows
    dead = [per_rank[r][names.index("dead_expert")]["recv_counts"] for r in range(world_size)]
    assert int(dead[0][:, 1].sum()) == 0  # expert 1 (on rank 0) got no token from any rank


def test_run_job_writes_a_row_per_rank_and_stage(tmp_path):
    df = run_job(cfg_of("shape=tiny", "world_size=2", "logits=zipf", *FAST), tmp_path)
    assert (tmp_path / "results.parquet").is_file()
    assert (df.status == "ok").all(), df.message.tolist()
    assert list(df.stage) == ["dispatch", "dispatch", "combine", "combine", "total", "total", "raw_a2a", "raw_a2a"]
    assert list(df["rank"]) == [0, 1] * 4 and (df.world_size == 2).all() and (df.backend == "gloo").all()
    assert (df.bench == "ep_dispatch").all() and (df.timing_mode == "wall").all() and (df.repeats == 3).all()
    H, k, T, b = 256, 2, 512, 2
    d = df[df.stage == "dispatch"]
    assert d.rows_sent.tolist() == [T * k, T * k] and d.rows_received.sum() == 2 * T * k
    assert (d.bytes_sent == d.rows_sent * H * b).all() and (d.bytes_received == d.rows_received * H * b).all()
    c = df[df.stage == "combine"]
    assert c.rows_sent.tolist() == d.rows_received.tolist() and c.rows_received.tolist() == d.rows_sent.tolist()
    imb = d.rows_received.max() / d.rows_received.mean()
    assert df.recv_imbalance.eq(imb).all() and imb > 1.0
    for col in ("time_us_median", "time_us_slowest_rank", "algbw_GBps", "busbw_GBps", "pct_of_raw"):
        assert df[col].notna().all() and (df[col] > 0).all(), col
    assert (df.time_us_slowest_rank >= df.time_us_median).all()
    row = d.iloc[0]
    assert row.algbw_GBps == pytest.approx(max(row.bytes_sent, row.bytes_received) / row.time_us_median / 1e3)
    assert df.busbw_GBps.tolist() == pytest.approx((df.algbw_GBps / 2).tolist())  # (n - 1) / n, n = 2
    raw = df[df.stage == "raw_a2a"]
    assert (raw.pct_of_raw == 100).all() and (raw.bytes_sent == raw.bytes_received).all()
    assert (raw.rows_sent >= T * k).all()
    r0 = df[(df["rank"] == 0)].set_index("stage")
    assert r0.loc["dispatch", "pct_of_raw"] == pytest.approx(
        100 * r0.loc["raw_a2a", "time_us_median"] / r0.loc["dispatch", "time_us_median"])
    assert df.torch_version.str.len().gt(0).all() and df.load_cv.notna().all()
    assert len(df.expert_counts[0]) == 8 and "cfg.world_size" in df.columns
    loaded = results.load(tmp_path)
    assert len(loaded) == 8 and loaded.columns[: len(results.COLUMNS)].tolist() == results.COLUMNS


def test_pack_and_combine_come_from_the_chosen_implementation(tmp_path):
    """A wrong pack implementation must show up as mismatch rows: the EP path really uses it."""
    df = run_job(cfg_of("shape=tiny", "world_size=2", "impl._target_=fake_impls.SkipsLastRow",
                        "impl.name=skips", "impl_combine=torch", *FAST), tmp_path)
    body = df[df.stage != "raw_a2a"]
    assert (body.status == "mismatch").all() and body.message.str.contains("mismatch: rank").all()
    assert set(body.stage_impl) == {"skips+gloo", "torch+gloo", "pack=skips,combine=torch+gloo"}


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"^experts=8 is not divisible by world_size=3; .*accepted world_size: 1, 2, 4, 8$"):
        resolve(cfg_of("shape=tiny", "world_size=3"))
    with pytest.raises(ConfigError, match="world_size=0"):
        resolve(cfg_of("world_size=0"))
    with pytest.raises(ConfigError, match="impl_pack=quack is not accepted with bench=ep_dispatch: it has no pack stage"):
        resolve(cfg_of("impl_pack=quack"))
    job = resolve(cfg_of("impl_combine=cute"))
    p = ep.EPProblem.from_job(job)
    assert p.combine_impl["name"] == "cute" and p.pack_impl["name"] == "torch"
    assert p.stage_impl("combine", "nccl") == "cute+nccl" and p.stage_impl("total", "gloo") == "pack=torch,combine=cute+gloo"
    with pytest.raises(ConfigError, match="timing=graph"):
        resolve(cfg_of("timing=graph"))
    with pytest.raises(ConfigError, match="bench.expert='relu'"):
        resolve(cfg_of("bench.expert=relu"))
    job = resolve(cfg_of("shape=deepseek_v3", "world_size=8"))
    assert (job.bench, job.experts, job.stages) == ("ep_dispatch", 256, ep.STAGES)


def test_more_ranks_than_gpus_is_a_config_error():
    ep.check_devices(torch.device("cpu"), 64)  # gloo: any number of ranks
    ep.check_devices(torch.device("cuda"), 2, visible=2)
    with pytest.raises(ConfigError, match=r"^world_size=4 needs 4 GPUs \(one rank per GPU\) but 2 are visible"):
        ep.check_devices(torch.device("cuda"), 4, visible=2)


def test_failed_rank_gives_error_rows(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("rank 1 fell over\nsecond line")

    monkeypatch.setattr(ep.bench, "spawn", boom)
    with pytest.raises(JobFailed, match="every row of bench=ep_dispatch failed"):
        run_job(cfg_of("shape=tiny", *FAST), tmp_path)
    df = results.load(tmp_path)  # a failed measurement is a result: the table is written
    assert (df.status == "error").all() and list(df.stage) == list(ep.STAGES)
    assert df.message[0] == "error: rank 1 fell over: second line"


@pytest.mark.slow
def test_run_py_rejects_uneven_expert_split_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "run.py", "bench=ep_dispatch", "experts=6", "world_size=4",
                        f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "moebench: error: experts=6 is not divisible by world_size=4; expert parallelism splits experts evenly "
        "across ranks: accepted world_size: 1, 2, 3, 6"]
    assert not (tmp_path / "results.parquet").exists()


def test_local_metadata_keeps_only_the_ranks_experts_renumbered():
    g = torch.Generator().manual_seed(0)
    ids, w = routing.route(torch.randn(64, 12, generator=g), 3, RouterSpec())
    for local in (range(4, 8), [9, 2, 5]):  # a contiguous block, or an expert map in local order
        meta = routing.local_metadata(ids, w, 12, local)
        assert meta.num_experts == len(local)
        want = torch.tensor([int(((ids == e)).sum()) for e in local])
        assert torch.equal(meta.counts.long(), want) and int(meta.offsets[-1]) == int(want.sum())
        for j, e in enumerate(local):  # local expert j's rows are the tokens that chose global expert e
            rows = meta.gather_idx[meta.offsets[j]:meta.offsets[j + 1]].long()
            assert torch.equal(rows, torch.nonzero((ids == e).any(1)).flatten())
        other = ~torch.isin(ids, torch.tensor(list(local)))
        assert bool((meta.scatter_idx[other] == -1).all())
    with pytest.raises(ValueError, match="distinct ids"):
        routing.local_metadata(ids, w, 12, [3, 3])


def test_local_layout_source_and_bad_layout(tmp_path):
    df = run_job(cfg_of("shape=tiny", "world_size=2", "bench.local_layout=source", "bench.expert=scale", *FAST),
                 tmp_path)
    assert (df.status == "ok").all(), df.message.tolist()
    with pytest.raises(ConfigError, match="bench.local_layout='rank' is not accepted; accepted: expert, source"):
        resolve(cfg_of("world_size=2", "bench.local_layout=rank"))
