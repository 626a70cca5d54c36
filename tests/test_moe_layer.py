"""bench=moe_layer on the CPU: the fp32 reference against the torch GEMM paths (with and
without a capacity), the job's rows and Parquet columns, unsupported / fused / mismatch rows,
and the configuration errors."""

import pyarrow.parquet as pq
import pytest
import torch

from moebench.benches import moe_layer as ml
from moebench import results, routing
from moebench.app import run_job
from moebench.check import Mismatch, assert_close
from moebench.config import ConfigError, compose, resolve
from moebench.impls.torch_impl import TorchImpl

FAST = ["timing.warmup=1", "timing.repeats=2"]
SMALL = ["shape=tiny", "tokens=128", "hidden=64", "intermediate=96", "experts=8", "topk=2"]


def cfg_of(*overrides):
    return compose(["bench=moe_layer", *overrides])


def run(tmp, *overrides):
    return run_job(cfg_of(*SMALL, *FAST, *overrides), tmp).set_index("stage")


class NoRoute(TorchImpl):
    """The torch implementation without a route stage (like impl=cute before it had one)."""

    name = "noroute"

    def route(self, logits, k, router, bias=None, out=None):
        raise self.missing("route")


# -- the layer math ---------------------------------------------------------------------------


def _problem(cap, T=192, H=64, E=8, k=2, I=96, seed=5, dtype=torch.bfloat16):
    w = ml.make_weights(E, H, I, dtype, seed=seed)
    x = ml.make_x(T, H, dtype, seed=seed)
    ids, wt = routing.route(x @ w.wg, k, routing.RouterSpec())
    meta = routing.build_metadata(ids, wt, E, cap)
    return x, w, ids, meta


CAPS = {"dropless": routing.CapacitySpec(), "cf=0.75": routing.CapacitySpec(0.75),
        "padded": routing.CapacitySpec(1.25, pad_to_capacity=True)}


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("weighted", [True, False])
def test_torch_paths_match_the_fp32_reference(cap, weighted):
    x, w, ids, meta = _problem(CAPS[cap])
    packed, h, a, y, out = ml.torch_layer(x, w, meta, weighted)
    ref = ml.moe_layer_reference(x, w, ids, meta.weights, meta.scatter_idx >= 0, weighted)
    rtol, atol = ml.FP32_REFERENCE_TOLERANCE[torch.bfloat16]
    assert_close(out, ref, "layer", rtol=rtol, atol=atol)
    assert ref.abs().mean() > 0.05  # O(1) outputs: the tolerance is meaningful
    n = int(meta.offsets[-1])
    for name in ("loop", "grouped_mm"):
        eg = ml.make_gemm(name)
        bufs = ml.Buffers.allocate(x.shape[0], x.shape[1], w.experts, w.intermediate, meta.num_rows, x.dtype,
                                   x.device)
        bufs.poison()
        got = ml.expert_ffn(eg, packed, meta, w, bufs)
        assert_close(got[:n], y[:n], f"{name} expert rows", torch.bfloat16)
        assert_close(routing.combine(got, meta, weighted=weighted), ref, f"{name} layer", rtol=rtol, atol=atol)


def test_capacity_dropped_slots_contribute_nothing():
    x, w, ids, meta = _problem(routing.CapacitySpec(0.25))
    kept = meta.scatter_idx >= 0
    assert (~kept).any() and kept.any()
    ref = ml.moe_layer_reference(x, w, ids, meta.weights, kept)
    out = ml.torch_layer(x, w, meta)[-1]
    none_kept = ~kept.any(1)
    assert none_kept.any()
    assert (ref[none_kept] == 0).all() and (out[none_kept] == 0).all()
    # padded blocks: the packed buffer's empty rows are zeros, and so are their expert rows,
    # whatever GEMM path computed them
    x, w, ids, meta = _problem(routing.CapacitySpec(1.5, pad_to_capacity=True))
    empty = meta.gather_idx < 0
    packed, _, _, y, _ = ml.torch_layer(x, w, meta)
    assert empty.any() and (packed[empty] == 0).all() and (y[empty] == 0).all()
    bufs = ml.Buffers.allocate(x.shape[0], x.shape[1], w.experts, w.intermediate, meta.num_rows, x.dtype, x.device)
    assert (ml.expert_ffn(ml.make_gemm("grouped_mm"), packed, meta, w, bufs)[empty] == 0).all()


def test_reference_catches_a_wrong_layer():
    x, w, ids, meta = _problem(CAPS["dropless"])
    ref = ml.moe_layer_reference(x, w, ids, meta.weights, meta.scatter_idx >= 0)
    rtol, atol = ml.FP32_REFERENCE_TOLERANCE[torch.bfloat16]
    swapped = ml.LayerWeights(w.wg, torch.cat([w.w1[:, w.intermediate:], w.w1[:, :w.intermediate]], 1), w.w2)
    with pytest.raises(Mismatch):  # up and gate projections exchanged
        assert_close(ml.torch_layer(x, swapped, meta)[-1], ref, "layer", rtol=rtol, atol=atol)
    kept = meta.scatter_idx >= 0
    kept[:, 1] = False  # one slot lost
    with pytest.raises(Mismatch):
        assert_close(ml.torch_layer(x, w, meta)[-1],
                     ml.moe_layer_reference(x, w, ids, meta.weights, kept), "layer", rtol=rtol, atol=atol)


def test_weights_are_seeded_and_scaled():
    a, b = ml.make_weights(4, 64, 32, seed=1), ml.make_weights(4, 64, 32, seed=1)
    assert torch.equal(a.w1, b.w1) and torch.equal(a.w2, b.w2) and torch.equal(a.wg, b.wg)
    assert a.w1.shape == (4, 64, 64) and a.w2.shape == (4, 64, 32) and a.wg.shape == (64, 4)
    assert a.w1.dtype == torch.bfloat16
    assert abs(a.w1.float().std().item() - 64 ** -0.5) < 0.02 and abs(a.w2.float().std().item() - 32 ** -0.5) < 0.03
    assert not torch.equal(ml.make_weights(4, 64, 32, seed=2).w1, a.w1)


# -- the job ----------------------------------------------------------------------------------------


def test_job_rows_columns_and_parquet(tmp_path):
    df = run(tmp_path)
    assert list(df.index) == list(ml.STAGES)
    assert (df.status == "ok").all(), df.message.tolist()
    assert (df.bench == "moe_layer").all() and (df.gemm_impl == "grouped_mm").all()
    assert (df.intermediate == 96).all() and (df.expert_rows == 128 * 2).all()
    assert (df.time_us_median > 0).all() and (df.timing_mode == "wall").all() and (df.repeats == 2).all()
    M, H, I, E, T = 256, 64, 96, 8, 128
    assert df.loc["gemm1", "flops"] == 4 * M * H * I and df.loc["gemm2", "flops"] == 2 * M * I * H
    assert df.loc["experts", "flops"] == df.loc["dense_gemm", "flops"] == 6 * M * H * I
    assert df.loc["total", "flops"] == 6 * M * H * I + 2 * T * H * E
    for st in ("gemm1", "gemm2", "experts"):
        want = 100 * df.loc[st, "tflops"] / df.loc["dense_gemm", "tflops"]
        assert df.loc[st, "pct_of_dense"] == pytest.approx(want)
    share = sum(df.loc[s, "time_us_median"] for s in ml.SHARE_STAGES) / df.loc["total", "time_us_median"]
    assert df.loc["total", "routing_share"] == pytest.approx(share)
    assert df.loc[["route", "metadata", "pack", "combine"], "bw_GBps_strict"].gt(0).all()
    assert df.loc["total", "stage_impl"] == ("gate=torch,route=torch,metadata=torch,pack=torch,gemm=grouped_mm,"
                                             "combine=torch")
    schema = pq.read_schema(tmp_path / "results.parquet")
    assert schema.names[: len(results.COLUMNS)] == results.COLUMNS
    for c in ("intermediate", "gemm_impl", "expert_rows", "flops", "tflops", "pct_of_dense", "routing_share"):
        assert c in schema.names
    assert "cfg.bench.gemm" in schema.names


@pytest.mark.parametrize("extra", [["bench.gemm=loop", "capacity=cf"], ["capacity=padded", "logits=zipf"],
                                   ["bench.gemm=loop", "dtype=float32", "bench.weighted=false"]])
def test_job_variants_check_and_time(tmp_path, extra):
    df = run(tmp_path, *extra, "bench.fp32_reference=true")
    assert (df.status == "ok").all(), df.message.tolist()


def test_quack_rows_are_unsupported_on_cpu_and_fused_stages_say_so(tmp_path):
    df = run(tmp_path, "bench.gemm=quack_gather_gated")
    for st in ("gate", "route", "metadata", "combine", "dense_gemm"):
        assert df.loc[st, "status"] == "ok", df.loc[st, "message"]
    for st in ("pack", "gemm1", "activation", "gemm2", "experts", "total"):
        assert df.loc[st, "status"] == "unsupported" and pd_isnull(df.loc[st, "time_us_median"])
    assert "fused into gemm1" in df.loc["pack", "message"]
    assert "cuda only" in df.loc["gemm1", "message"]
    assert df.loc["pack", "stage_impl"] == "quack_gather_gated"
    assert "pack=fused" in df.loc["total", "stage_impl"]
    # the fused activation says so where the GEMM itself can run
    eg = ml.make_gemm("quack_gated")
    with pytest.raises(ml.Unsupported, match="fused into gemm1"):
        eg.activation(torch.zeros(0, 4), torch.zeros(0, 2))
    with pytest.raises(ml.Unsupported, match="cuda only"):
        eg.check(torch.device("cpu"), torch.bfloat16, "wall", 64, 96)


def pd_isnull(v):
    import pandas as pd

    return pd.isna(v)


def test_a_stage_the_impl_lacks_is_unsupported_and_names_it(tmp_path):
    df = run(tmp_path, "impl._target_=test_moe_layer.NoRoute", "impl.name=noroute")
    assert df.loc["route", "status"] == "unsupported" and "has no route stage" in df.loc["route", "message"]
    assert df.loc["total", "status"] == "unsupported" and "has no route stage" in df.loc["total", "message"]
    assert df.loc["metadata", "status"] == "ok" and df.loc["gemm1", "status"] == "ok"
    assert pd_isnull(df.loc["total", "routing_share"])


def test_loop_is_unsupported_under_graph_capture():
    with pytest.raises(ml.Unsupported, match="timing=graph"):
        ml.make_gemm("loop").check(torch.device("cuda"), torch.bfloat16, "graph", 64, 96)


def test_a_wrong_gemm_is_a_mismatch_row_and_never_timed(tmp_path, monkeypatch):
    real = ml.GroupedMMGemm.gemm2

    def off(self, a, meta, w, out):
        return real(self, a, meta, w, out) * 1.1

    monkeypatch.setattr(ml.GroupedMMGemm, "gemm2", off)
    df = run(tmp_path)
    for st in ("gemm2", "experts", "total"):
        assert df.loc[st, "status"] == "mismatch", (st, df.loc[st, "message"])
        assert pd_isnull(df.loc[st, "time_us_median"])
    assert df.loc["gemm1", "status"] == "ok" and df.loc["dense_gemm", "status"] == "ok"


def test_fp32_reference_auto_on_small_shapes_only():
    job = resolve(cfg_of("shape=tiny"))
    s = ml.settings_of(job)
    assert s.intermediate == 512 and ml.fp32_reference_enabled(s, job)
    big = resolve(cfg_of("shape=deepseek_v3", "device=cpu"))
    sb = ml.settings_of(big)
    assert sb.intermediate == 2048 and not ml.fp32_reference_enabled(sb, big)


# -- configuration -------------------------------------------------------------------------------


def test_defaults_and_overrides_resolve():
    cfg = cfg_of()
    job = resolve(cfg)
    s = ml.settings_of(job)
    assert job.stages == ml.STAGES and job.shape == "tiny" and s.intermediate == 512
    assert (s.gemm, s.quack_tuned, s.fp32_reference) == ("grouped_mm", False, "auto")
    assert (job.timing.warmup, job.timing.repeats) == (3, 30)  # the bench's own defaults
    assert resolve(cfg_of("timing.repeats=7")).timing.repeats == 7
    s = ml.settings_of(resolve(cfg_of("shape=qwen3_30b_a3b", "intermediate=1024", "bench.gemm=quack_varlen")))
    assert (s.intermediate, s.gemm) == (1024, "quack_varlen")


@pytest.mark.parametrize("override,needle", [
    ("bench.gemm=cublas", "bench.gemm='cublas' is not accepted; accepted: loop, grouped_mm, quack_varlen"),
    ("intermediate=0", "intermediate=0 is not accepted; intermediate must be an integer >= 1"),
    ("intermediate=-4", "intermediate=-4 is not accepted"),
    ("intermediate=1.5", "intermediate=1.5 is not accepted"),
    ("intermediate=null", "intermediate=None is not accepted with bench=moe_layer"),
    ("bench.quack_tuned=sometimes", "bench.quack_tuned=sometimes is not accepted; accepted: true, false"),
    ("bench.fp32_reference=maybe", "bench.fp32_reference='maybe' is not accepted; accepted: auto, true, false"),
    ("timing=rotated", "timing=rotated is not accepted with bench=moe_layer"),
])
def test_config_errors_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:  # composing (types) or resolving (values, combinations)
        resolve(cfg_of("shape=tiny", override))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_config_raises_before_anything_is_written(tmp_path):
    # run.py prints the ConfigError as one line and exits 2 (moebench.app.hydra_main)
    with pytest.raises(ConfigError, match="bench.gemm='magic' is not accepted"):
        run_job(cfg_of("shape=tiny", "bench.gemm=magic"), tmp_path)
    assert not list(tmp_path.iterdir())


# -- bench.quack_config: a pinned quack GemmConfig -------------------------------------------------


@pytest.mark.parametrize("value,name", [
    ("default", "128x192_pp_c2x1"),
    ("128x192_pp_c1x2", "128x192_pp_c1x2"),
    ("128x256_coop_c1x2", "128x256_coop_c1x2"),
    ("64x256_pp_c1x1_sw4_dyn", "64x256_pp_c1x1_sw4_dyn"),
    ("128x192_pp_c2x1_sw8", "128x192_pp_c2x1"),  # the default swizzle is not spelled
    ({"tile_m": 256, "tile_n": 128, "pingpong": False, "cluster_m": 1, "cluster_n": 2}, "256x128_coop_c1x2"),
    ({"cluster_m": 1}, "128x192_pp_c1x1"),  # missing keys from quack's SM90 default
])
def test_quack_config_names_round_trip(value, name):
    fields = ml.quack_config_fields(value)
    assert set(fields) == set(ml.QUACK_CONFIG_KEYS)
    assert ml.quack_config_name(fields) == name
    assert ml.quack_config_fields(name) == fields
    assert ml.quack_config_of(value, "quack_varlen") == name


def test_quack_config_resolves_and_names_the_gemm_path():
    s = ml.settings_of(resolve(cfg_of("shape=tiny", "bench.gemm=quack_varlen", "bench.quack_config=128x256_coop_c1x2")))
    assert (s.gemm, s.quack_tuned, s.quack_config) == ("quack_varlen", False, "128x256_coop_c1x2")
    assert ml.make_gemm(s.gemm, s.quack_tuned, s.quack_config).label == "quack_varlen[128x256_coop_c1x2]"
    # a dict override (Hydra's {k:v} syntax) and the default (null)
    s = ml.settings_of(resolve(cfg_of("shape=tiny", "bench.gemm=quack_gated",
                                      "bench.quack_config={tile_m:128,tile_n:256,pingpong:false,cluster_m:1,"
                                      "cluster_n:2}")))
    assert s.quack_config == "128x256_coop_c1x2"
    assert ml.settings_of(resolve(cfg_of("shape=tiny"))).quack_config is None
    assert ml.make_gemm("quack_varlen").label == "quack_varlen"
    # the quack_* paths only: grouped_mm and loop ignore it (a sweep over bench.gemm keeps working)
    assert ml.make_gemm("grouped_mm", config="128x192_pp_c1x2").label == "grouped_mm"


def test_quack_config_rows_name_it_on_cpu(tmp_path):
    df = run(tmp_path, "bench.gemm=quack_varlen", "bench.quack_config=128x192_pp_c1x2")
    assert (df.gemm_impl == "quack_varlen[128x192_pp_c1x2]").all()
    assert df.loc["gemm1", "stage_impl"] == "quack_varlen[128x192_pp_c1x2]"
    assert df.loc["gemm1", "status"] == "unsupported" and "cuda only" in df.loc["gemm1", "message"]
    assert "gemm=quack_varlen[128x192_pp_c1x2]" in df.loc["total", "stage_impl"]
    assert (df["cfg.bench.quack_config"] == "128x192_pp_c1x2").all()


class _FakeQuack:
    """Records what QuackGemm hands to quack.gemm_interface (the GPU path, on the CPU)."""

    def __init__(self):
        self.calls = []
        outer = self

        class Tuned:
            @staticmethod
            def fn(A, B, out, C=None, **kw):
                outer.calls.append(("gemm_tuned.fn", kw))
                out.copy_(torch.zeros_like(out))

        self.gemm_tuned = Tuned()

    def gemm(self, A, B, out=None, **kw):
        self.calls.append(("gemm", kw))
        return out

    def gemm_act(self, A, B, postact_out=None, **kw):
        self.calls.append(("gemm_act", kw))
        return None, postact_out


@pytest.mark.parametrize("gemm", ["quack_varlen", "quack_gather_gated"])
def test_quack_config_is_passed_to_every_quack_gemm(monkeypatch, gemm):
    pytest.importorskip("quack.gemm_config")  # the GemmConfig class itself (field names must match)
    fake = _FakeQuack()
    monkeypatch.setattr(ml.QuackGemm, "_interface", lambda self: fake)
    x, w, ids, meta = _problem(CAPS["dropless"])
    packed = ml.torch_layer(x, w, meta)[0]
    R, I = meta.num_rows, w.intermediate
    eg = ml.make_gemm(gemm, config="128x256_coop_c1x1")
    cfg = eg._gemm_config()
    assert (cfg.tile_m, cfg.tile_n, cfg.pingpong, cfg.cluster_m, cfg.cluster_n, cfg.device_capacity) == \
        (128, 256, False, 1, 1, 9)
    assert eg._gemm_config() is cfg  # built once (quack keys a pinned config by identity)
    out1 = torch.empty(R, I if eg.fuses_act else 2 * I, dtype=x.dtype)
    eg.gemm1(x if eg.fuses_pack else packed, meta, w, out1)
    eg.gemm2(torch.empty(R, I, dtype=x.dtype), meta, w, torch.empty(R, x.shape[1], dtype=x.dtype))
    assert [c[0] for c in fake.calls] == ["gemm_act" if eg.fuses_act else "gemm_tuned.fn", "gemm_tuned.fn"]
    assert all(c[1]["config"] is cfg for c in fake.calls)
    # unpinned: quack's own choice (gemm with tuned=..., gemm_act with config=None)
    fake.calls.clear()
    eg = ml.make_gemm(gemm, tuned=True)
    eg.gemm1(x if eg.fuses_pack else packed, meta, w, out1)
    eg.gemm2(torch.empty(R, I, dtype=x.dtype), meta, w, torch.empty(R, x.shape[1], dtype=x.dtype))
    assert [c[0] for c in fake.calls] == ["gemm_act" if eg.fuses_act else "gemm", "gemm"]
    assert all(c[1]["tuned"] is True and c[1].get("config") is None for c in fake.calls)


def test_a_pinned_config_is_unsupported_off_hopper(monkeypatch):
    monkeypatch.setattr(ml.QuackGemm, "_interface", lambda self: _FakeQuack())
    monkeypatch.setattr(ml.QuackGemm, "_gemm_config", lambda self: object())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    eg = ml.make_gemm("quack_varlen", config="128x192_pp_c1x2")
    with pytest.raises(ml.Unsupported, match="SM90 .*sm_100"):
        eg.check(torch.device("cuda"), torch.bfloat16, "events", 64, 96)
    ml.make_gemm("quack_varlen").check(torch.device("cuda"), torch.bfloat16, "events", 64, 96)  # unpinned: fine


@pytest.mark.parametrize("overrides,needle", [
    (["bench.quack_config=fast"], "bench.quack_config='fast' is not accepted; accepted: null"),
    (["bench.quack_config=128x256_pp_c1x2"],
     "bench.quack_config='128x256_pp_c1x2' is not accepted: a pingpong 128-row tile needs tile_n a multiple of 16 up "
     "to 208, not 256; accepted:"),
    (["bench.quack_config=96x128_coop_c1x1"], "a cooperative tile_m must be 64, 128, 192, 256 or 320, not 96"),
    (["bench.quack_config=128x192_pp_c4x4"], "at most 8 CTAs a cluster, not 4x4"),
    (["bench.quack_config={tile_k:64}"], "unknown key(s) tile_k; accepted:"),
    (["bench.quack_config={pingpong:1}"], "pingpong=1 must be true/false"),
    (["bench.quack_config=7"], "bench.quack_config=7 is not accepted; accepted: null"),
    (["bench.gemm=quack_gather", "bench.quack_config=128x192_pp_c1x2"],
     "bench.quack_config='128x192_pp_c1x2' is not accepted: bench.gemm=quack_gather (gather-A) needs cluster_n=1"),
    (["bench.gemm=quack_gated", "bench.quack_config=128x208_pp_c2x1"], "needs tile_n a multiple of 32 on SM90"),
    (["bench.gemm=quack_varlen", "bench.quack_config=default", "bench.quack_tuned=true"],
     "bench.quack_config='default' and bench.quack_tuned=true are mutually exclusive"),
])
def test_quack_config_errors_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        resolve(cfg_of("shape=tiny", *overrides))
    assert needle in str(e.value) and "\n" not in str(e.value)


# -- training: bench.direction=bwd / fwdbwd ------------------------------------------------------

TRAIN_ROWS_OK = [s for s in ml.STAGES if s != "metadata"]  # metadata has no backward


@pytest.mark.parametrize("direction", ["fwdbwd", "bwd"])
@pytest.mark.parametrize("gemm", ["grouped_mm", "loop"])
def test_layer_backward_rows_check_and_time(tmp_path, direction, gemm):
    df = run(tmp_path, f"bench.direction={direction}", f"bench.gemm={gemm}")
    assert (df.direction == direction).all()
    for st in TRAIN_ROWS_OK:
        assert df.loc[st, "status"] == "ok", (st, df.loc[st, "message"])
        assert df.loc[st, "time_us_median"] > 0
    assert df.loc["metadata", "status"] == "unsupported" and "no backward" in df.loc["metadata", "message"]
    M, H, I, E, T = 256, 64, 96, 8, 128
    f = {"fwdbwd": 3, "bwd": 2}[direction]  # a GEMM's backward is two GEMMs of its size
    assert df.loc["experts", "flops"] == df.loc["dense_gemm", "flops"] == f * 6 * M * H * I
    assert df.loc["total", "flops"] == f * (6 * M * H * I + 2 * T * H * E)
    assert df.loc["gemm1", "flops"] == f * 4 * M * H * I and df.loc["gate", "flops"] == f * 2 * T * H * E
    for st in ("gemm1", "gemm2", "experts", "total"):
        assert df.loc[st, "pct_of_dense"] == pytest.approx(100 * df.loc[st, "tflops"] / df.loc["dense_gemm", "tflops"])
    assert df.loc[["route", "pack", "combine"], "bw_GBps_strict"].gt(0).all()
    assert pd_isnull(df.loc["total", "routing_share"])  # the metadata row has no backward to add
    if direction == "fwdbwd":
        assert df.loc["total", "stage_impl"] == (f"gate=torch,route=torch,metadata=torch,pack=torch,gemm={gemm},"
                                                 "combine=torch")


@pytest.mark.parametrize("extra", [["bench.gemm=loop", "capacity=cf", "bench.fp32_reference=true"],
                                   ["capacity=padded", "logits=zipf", "router=sigmoid_bias"],
                                   ["dtype=float32", "bench.weighted=false"], ["dtype=float16", "impl=reference"],
                                   ["router=topk_softmax", "capacity=cf", "capacity.cf=0.75", "bench.direction=bwd"]])
def test_layer_backward_variants_check(tmp_path, extra):
    df = run(tmp_path, "bench.direction=fwdbwd", *extra)
    for st in TRAIN_ROWS_OK:
        assert df.loc[st, "status"] == "ok", (st, df.loc[st, "message"])


def test_a_wrong_layer_gradient_is_a_mismatch_row_and_never_timed(tmp_path, monkeypatch):
    real = ml.GroupedMMGemm.gemm2_backward

    def off(self, ctx, d_y, meta, w, grads):
        d_a, d_w2 = real(self, ctx, d_y, meta, w, grads)
        return d_a, d_w2 * 1.1

    monkeypatch.setattr(ml.GroupedMMGemm, "gemm2_backward", off)
    df = run(tmp_path, "bench.direction=fwdbwd")
    for st, name in (("gemm2", "d_w2"), ("experts", "d_w2"), ("total", "d_W2")):
        assert df.loc[st, "status"] == "mismatch", (st, df.loc[st, "message"])
        assert name in df.loc[st, "message"] and pd_isnull(df.loc[st, "time_us_median"])
    for st in ("gate", "gemm1", "activation", "combine", "dense_gemm"):
        assert df.loc[st, "status"] == "ok", (st, df.loc[st, "message"])


def test_a_lost_router_gradient_is_a_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(TorchImpl, "route_backward", lambda self, logits, *a, **kw: torch.zeros_like(logits))
    df = run(tmp_path, "bench.direction=bwd")
    assert df.loc["total", "status"] == "mismatch" and "d_x vs torch autograd" in df.loc["total", "message"]
    assert df.loc["route", "status"] == "mismatch" and df.loc["experts", "status"] == "ok"


def test_gradient_tolerance_follows_the_reference_magnitude():
    ref = torch.full((4, 4), 10.0)
    assert ml.grad_tolerance(ref, torch.bfloat16) == pytest.approx((3e-2, 1.0))
    assert ml.grad_tolerance(torch.zeros(3), torch.bfloat16) == (3e-2, 0.0)  # zero: exactly zero
    # the torch layer's bf16 autograd is within it of the fp32 reference's, a scaled gradient is not
    x, w, ids, meta = _problem(CAPS["cf=0.75"], T=512, H=128, E=16, k=4, I=64)
    spec = routing.RouterSpec()
    d_out = torch.randn(512, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)

    def weights_of(logits):
        return routing.reference_weights(logits, ids, spec)

    got = ml.torch_layer_grads(x, w, None, meta, weights_of, True, d_out)
    want = ml.moe_layer_reference_grads(x, w, None, ids, meta.scatter_idx >= 0, weights_of, True, d_out)
    for name, g, r in zip(("out", "d_x", "d_wg", "d_w1", "d_w2"), got, want):
        assert r.abs().max() > 0, name
        rtol, atol = ml.grad_tolerance(r, torch.bfloat16)
        assert_close(g, r, name, rtol=rtol, atol=atol)
        with pytest.raises(Mismatch):
            assert_close(g * 1.1, r, name, rtol=rtol, atol=atol)


class _RefQuack:
    """quack.gemm_interface on the CPU from quack's own torch references (gemm_ref, gemm_act_ref,
    gemm_dact_ref): the layouts QuackGemm hands quack (varlen-M / varlen-K operands, the
    interleaved gated pre-activation, concat_layout) checked for what quack defines them to compute,
    with the operand majors quack's GEMM asserts."""

    def __init__(self):
        from quack import gemm_interface as q

        self.q, self.calls = q, []
        outer = self

        class Tuned:
            @staticmethod
            def fn(A, B, out, C=None, cu_seqlens_m=None, A_idx=None, config=None, **kw):
                return outer.gemm(A, B, out=out, cu_seqlens_m=cu_seqlens_m, A_idx=A_idx)

        self.gemm_tuned = Tuned()

    @staticmethod
    def _into(out, r):
        r = r.detach()  # gemm_dact_ref returns its autograd's postact
        if out is None:
            return r
        assert out.shape == r.shape, (out.shape, r.shape)
        return out.copy_(r)

    def gemm(self, A, B, out=None, cu_seqlens_m=None, cu_seqlens_k=None, A_idx=None, concat_layout=None, **kw):
        self.calls.append(("gemm", "varlen_k" if cu_seqlens_k is not None else "varlen_m", concat_layout))
        if cu_seqlens_m is not None:
            assert A.stride(-1) == 1 and (out is None or out.stride(-1) == 1), "varlen_m: k-major A, n-major D"
        if cu_seqlens_k is not None:
            assert A.stride(-2) == 1 and B.stride(-1) == 1, "varlen_k: m-major A, n-major B"
        r = self.q.gemm_ref(A, B, cu_seqlens_m=cu_seqlens_m, cu_seqlens_k=cu_seqlens_k, A_idx=A_idx,
                            concat_layout=concat_layout)
        return self._into(out, r)

    def gemm_act(self, A, B, activation=None, preact_out=None, postact_out=None, cu_seqlens_m=None, A_idx=None,
                 store_preact=True, concat_layout=None, **kw):
        self.calls.append(("gemm_act", store_preact, concat_layout))
        pre, post = self.q.gemm_act_ref(A, B, activation=activation, cu_seqlens_m=cu_seqlens_m, A_idx=A_idx,
                                        concat_layout=concat_layout)
        return (self._into(preact_out, pre) if store_preact else None), self._into(postact_out, post)

    def gemm_dgated(self, A, B, PreAct, activation=None, dx_out=None, postact_out=None, cu_seqlens_m=None, **kw):
        self.calls.append(("gemm_dgated", activation))
        dx, post = self.q.gemm_dact_ref(A, B, PreAct, activation=activation, cu_seqlens_m=cu_seqlens_m)
        return self._into(dx_out, dx), self._into(postact_out, post)


@pytest.fixture
def ref_quack(monkeypatch):
    pytest.importorskip("quack.gemm_interface")
    fake = _RefQuack()
    monkeypatch.setattr(ml.QuackGemm, "_interface", lambda self: fake)
    monkeypatch.setattr(ml.QuackGemm, "check", lambda self, *a: None)  # the CUDA-only checks
    return fake


@pytest.mark.parametrize("gemm", ["quack_varlen", "quack_gated"])
@pytest.mark.parametrize("direction", ["fwdbwd", "bwd"])
def test_quack_backward_computes_the_layer_gradients(tmp_path, ref_quack, gemm, direction):
    df = run(tmp_path, f"bench.gemm={gemm}", f"bench.direction={direction}", "capacity=cf", "capacity.cf=1.0")
    fused = {"gemm1", "activation", "gemm2"} if gemm == "quack_gated" else set()
    for st in TRAIN_ROWS_OK:
        if st in fused:
            assert df.loc[st, "status"] == "unsupported" and "gemm_dgated" in df.loc[st, "message"]
        else:
            assert df.loc[st, "status"] == "ok", (st, df.loc[st, "message"])
    calls = set(ref_quack.calls)
    assert ("gemm", "varlen_k", ("out",) if gemm == "quack_gated" else None) in calls  # d_W1
    assert ("gemm", "varlen_k", None) in calls  # d_W2
    if gemm == "quack_gated":
        assert {("gemm_act", True, ("B",)), ("gemm_dgated", "swiglu"), ("gemm", "varlen_m", ("B",))} <= calls


def test_quack_gather_has_no_backward(tmp_path, ref_quack):
    df = run(tmp_path, "bench.gemm=quack_gather_gated", "bench.direction=fwdbwd")
    for st in ("gemm1", "gemm2", "experts", "total"):
        assert df.loc[st, "status"] == "unsupported" and "gather-A" in df.loc[st, "message"], st
    assert "fused into gemm1" in df.loc["pack", "message"]


# -- an implementation's own whole layer (Impl.fused_layer: impl=sonic's) -------------------------


class FusedTorch(TorchImpl):
    """A whole layer of its own in torch (differentiable): the total row runs it, as impl=sonic's
    runs SonicMoE's; ``SCALE`` scales its output, ``GRAD_SCALE`` W2's gradient (not its value)."""

    name = "fusedtorch"
    fused_layer = True
    layer_label = "fusedtorch:layer"
    SCALE, GRAD_SCALE = 1.0, 1.0

    def layer(self, x, router_w, w1, w2, k, router, training=False):
        with torch.enable_grad() if training else torch.no_grad():
            logits = x @ router_w.t()
            ids, _ = self.route(logits.detach(), k, router)  # its own top-k, as the check routes
            wts = routing.reference_weights(logits, ids, router)
            w2 = w2 + (w2 - w2.detach()) * (self.GRAD_SCALE - 1)
            out = torch.zeros(x.shape, dtype=torch.float32)
            I = w2.shape[2]
            for e in range(router_w.shape[0]):
                tok, slot = (ids == e).nonzero(as_tuple=True)
                h = x[tok] @ w1[e].t()
                y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ w2[e].t()
                out = out.index_add(0, tok, y.float() * wts[tok, slot, None])
            return (out * self.SCALE).to(x.dtype), logits


FUSED = ["impl._target_=test_moe_layer.FusedTorch", "impl.name=fusedtorch"]


@pytest.mark.parametrize("direction", ["fwd", "bwd", "fwdbwd"])
def test_a_fused_layer_is_the_total_row_checked_on_its_own_routing(tmp_path, direction):
    df = run(tmp_path, *FUSED, f"bench.direction={direction}", "bench.fp32_reference=true")
    assert df.loc["total", "status"] == "ok", df.loc["total", "message"]
    assert df.loc["total", "stage_impl"] == "fusedtorch:layer" and df.loc["total", "time_us_median"] > 0
    assert df.loc["total", "pct_of_dense"] > 0
    for st in ("gate", "route", "pack", "combine", "gemm1", "experts", "dense_gemm"):
        assert df.loc[st, "status"] == "ok", (st, df.loc[st, "message"])  # the other rows are the stages'


@pytest.mark.parametrize("direction,attr,needle", [("fwd", "SCALE", "layer output"),
                                                   ("fwdbwd", "GRAD_SCALE", "d_W2 vs torch autograd"),
                                                   ("bwd", "GRAD_SCALE", "d_W2 vs torch autograd")])
def test_a_wrong_fused_layer_is_a_mismatch_row(tmp_path, monkeypatch, direction, attr, needle):
    monkeypatch.setattr(FusedTorch, attr, 1.1)
    df = run(tmp_path, *FUSED, f"bench.direction={direction}")
    assert df.loc["total", "status"] == "mismatch" and needle in df.loc["total", "message"], df.loc["total", "message"]
    assert pd_isnull(df.loc["total", "time_us_median"])


@pytest.mark.parametrize("extra,needle", [(["capacity=cf"], "dropless"), (["logits=zipf"], "prior"),
                                          (["bench.weighted=false"], "weights its combine")])
def test_what_a_fused_layer_cannot_run_is_unsupported(tmp_path, extra, needle):
    df = run(tmp_path, *FUSED, *extra)
    assert df.loc["total", "status"] == "unsupported" and needle in df.loc["total", "message"]
    assert "fusedtorch" in df.loc["total", "message"]


def test_sonic_layer_rows_on_cpu_and_what_its_layer_takes(tmp_path):
    from moebench.impls import sonic_impl
    from moebench.routing import RouterSpec

    df = run(tmp_path, "impl=sonic")
    assert df.loc["total", "status"] == "unsupported" and "cuda only" in df.loc["total", "message"]
    assert df.loc["total", "stage_impl"] == sonic_impl.LAYER_LABEL
    assert df.loc["dense_gemm", "status"] == "ok"  # the reference its rows are a ratio to
    problem = sonic_impl.layer_problem
    assert problem(torch.bfloat16, RouterSpec(), 128, 8) is None
    assert "16-bit" in problem(torch.float32, RouterSpec(), 128, 8)
    assert "router=sigmoid_bias" in problem(torch.bfloat16, RouterSpec("sigmoid_bias"), 128, 8)
    assert "k <= 16" in problem(torch.bfloat16, RouterSpec(), 128, 32)
    assert "multiple of 8" in problem(torch.bfloat16, RouterSpec(), 12, 2)


def test_sonic_layer_runs_only_on_the_cutlass_it_pins(monkeypatch):
    from importlib import metadata

    from moebench.impls.sonic_impl import stack_problem

    versions = {"sonic-moe": "0.1.2.post1", "nvidia-cutlass-dsl": "4.8.1", "quack-kernels": "0.6.5"}
    monkeypatch.setattr(metadata, "requires", lambda dist: ["nvidia-cutlass-dsl==4.4.2", "quack-kernels>=0.3.11",
                                                            'nvidia-cutlass-dsl[cu13]>=4.4.2; extra == "cu13"'])
    monkeypatch.setattr(metadata, "version", lambda dist: versions[dist])
    stack_problem.cache_clear()  # read once per process
    msg = stack_problem()
    assert "pins nvidia-cutlass-dsl==4.4.2" in msg and "nvidia-cutlass-dsl 4.8.1" in msg and "0.6.5" in msg
    versions["nvidia-cutlass-dsl"] = "4.4.2"
    assert stack_problem() == msg  # cached
    stack_problem.cache_clear()
    assert stack_problem() is None
    stack_problem.cache_clear()
