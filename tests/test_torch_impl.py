"""impl=torch, the strong eager torch (moebench/impls/torch_impl.py), on the CPU: its sort-free
metadata is the reference's exactly, its route passes the check with each weight paired with its
expert, its combine is within the combine tolerance, nothing syncs with the host; and the checks
that guard every implementation: weights in the wrong slots and a result that goes wrong after
the checked call are mismatch rows."""

import pytest
import torch

from moebench import routing as R
from moebench.app import JobFailed, run_job
from moebench.benches.stages import _clone, copy_like
from moebench.check import Mismatch, assert_close, assert_equal, check_metadata, check_route
from moebench.config import compose
from moebench.impls import torch_impl as TI
from moebench.logits import make_logits
from moebench.results import load
from moebench.routing import CapacitySpec, RouterSpec

FAST = ["shape=tiny", "timing.warmup=1", "timing.repeats=3"]

CAPS = [CapacitySpec(), CapacitySpec(1.0), CapacitySpec(0.5), CapacitySpec(1.25, pad_to_capacity=True),
        CapacitySpec(0.75, renormalize_after_drop=True), CapacitySpec(1.0, drop_policy="probs"),
        CapacitySpec(0.6, min_capacity=4, pad_to_capacity=True, renormalize_after_drop=True)]


def _routing(kind, T, E, k, router=RouterSpec(), seed=0):
    x = make_logits(kind, T, E, seed=seed)
    ids, w = R.route(x, k, router, router.expert_bias(E, "cpu", seed))
    return x, ids, w


@pytest.mark.parametrize("cap", CAPS, ids=lambda c: f"cf={c.factor},{c.drop_policy},pad={c.pad_to_capacity}")
@pytest.mark.parametrize("kind,T,E,k", [("uniform", 257, 16, 2), ("zipf", 300, 32, 4), ("hot", 97, 8, 8),
                                        ("uniform", 1, 8, 3), ("zipf", 64, 4, 1)])
def test_metadata_is_the_references(cap, kind, T, E, k):
    _, ids, w = _routing(kind, T, E, k)
    check_metadata(TI.metadata(ids, w, E, cap), R.build_metadata(ids, w, E, cap))


@pytest.mark.parametrize("router", [RouterSpec("expert_choice", capacity_factor=1.3), RouterSpec("hash")])
def test_metadata_of_variable_slots_is_the_references(router):
    T, E = 129, 16
    _, ids, w = _routing("zipf", T, E, 2, router)
    rows = router.num_rows(T, 2, E)
    check_metadata(TI.metadata(ids, w, E, CapacitySpec(), rows), R.build_metadata(ids, w, E, CapacitySpec(), rows))


def test_metadata_with_an_expert_no_token_picks():
    ids = torch.tensor([[0, 2], [2, 0], [0, 3]], dtype=torch.int32)
    w = torch.rand(3, 2)
    for cap in (CapacitySpec(), CapacitySpec(1.0, pad_to_capacity=True)):
        got = TI.metadata(ids, w, 5, cap)
        check_metadata(got, R.build_metadata(ids, w, 5, cap))
        assert got.counts.tolist()[1] == 0 and got.counts.tolist()[4] == 0


@pytest.mark.parametrize("router", [RouterSpec(), RouterSpec("softmax_topk", renormalize=True),
                                    RouterSpec("topk_softmax", temperature=0.7), RouterSpec("topk_hard"),
                                    RouterSpec("sigmoid_bias", bias_std=0.1, scaling=2.5),
                                    RouterSpec("sigmoid_bias", score="softmax")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_route_passes_the_check_with_each_weight_paired(router, dtype):
    x = make_logits("zipf", 333, 32, seed=4, dtype=dtype)
    x[:7] = x[:7].round()  # ties: torch.topk may order them its own way
    bias = router.expert_bias(32, "cpu", 1)
    got, ref = TI.route(x, 4, router, bias), R.route(x, 4, router, bias)
    check_route(got, ref, selection=R.selection_scores(x, router, bias), exact_ties=False,
                weights_of=lambda i: R.reference_weights(x, i, router, bias))


@pytest.mark.parametrize("router", [RouterSpec("hash"), RouterSpec("expert_choice"),
                                    RouterSpec("group_limited", n_group=4, topk_group=2, bias_std=0.1)])
def test_route_without_one_topk_is_the_references_exactly(router):
    x = make_logits("hot", 100, 16, seed=2)
    bias = router.expert_bias(16, "cpu", 0)
    got, ref = TI.route(x, 2, router, bias), R.route(x, 2, router, bias)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert TI.TorchImpl().exact_ties_for(router) and not TI.TorchImpl().exact_ties_for(RouterSpec())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cap", [CapacitySpec(), CapacitySpec(0.5), CapacitySpec(1.0, pad_to_capacity=True)])
@pytest.mark.parametrize("weighted", [True, False])
def test_pack_and_combine(dtype, cap, weighted):
    _, ids, w = _routing("zipf", 211, 16, 4, seed=7)
    meta = R.build_metadata(ids, w, 16, cap)
    x = torch.randn(211, 64).to(dtype)
    assert_equal(TI.pack(x, meta), R.pack(x, meta), "packed rows")
    y = torch.randn(meta.num_rows, 64).to(dtype)
    if cap.factor is not None:
        y[0] = float("nan")  # a dropped slot reads row 0: it must not leak in
        uses_row0 = (meta.scatter_idx == 0).any(1)
    out = TI.combine(y, meta, weighted=weighted)
    ref = R.combine(y, meta, weighted=weighted)
    if cap.factor is not None:
        assert torch.isfinite(out[~uses_row0]).all()
    assert_close(out, ref, "combined rows", dtype)


def test_no_host_sync(monkeypatch):
    _, ids, w = _routing("uniform", 64, 8, 2)
    x = torch.randn(64, 16)
    cap = CapacitySpec(1.0)
    want = R.combine(R.pack(x, R.build_metadata(ids, w, 8, cap)), R.build_metadata(ids, w, 8, cap))

    def boom(*a, **k):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                 "any", "all", "unique", "bincount", "masked_select", "argwhere"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    meta = TI.metadata(ids, w, 8, cap)
    got = TI.combine(TI.pack(x, meta), meta)
    monkeypatch.undo()
    assert_close(got, want, "chain", torch.float32)


# -- the check itself ---------------------------------------------------------------------------

def test_weights_in_the_wrong_slots_are_a_mismatch():
    x = make_logits("uniform", 50, 16, seed=3)
    spec = RouterSpec()
    ids, w = R.route(x, 4, spec)
    kw = dict(selection=R.selection_scores(x, spec), exact_ties=False,
              weights_of=lambda i: R.reference_weights(x, i, spec))
    check_route((ids.flip(1), w.flip(1)), (ids, w), **kw)  # another order, each weight with its expert: fine
    with pytest.raises(Mismatch, match="slot by slot"):
        check_route((ids, w.flip(1)), (ids, w), **kw)  # the old sorted-lists check passed this


def test_weights_in_the_wrong_slots_are_a_mismatch_row(tmp_path):
    df = run_job(compose(["bench=topk", "impl._target_=fake_impls.WeightsInWrongSlots", "impl.name=wws", *FAST]),
                 tmp_path).set_index("stage")
    row = df.loc["route"]
    assert row.status == "mismatch" and "slot by slot" in row.message and row.time_us_median != row.time_us_median
    assert df.loc["select", "status"] == "ok"  # its selection is right


def test_a_result_that_goes_wrong_after_the_checked_call_is_a_mismatch_row(tmp_path):
    """What is timed is what is checked: the output of the last timed call is checked too."""
    with pytest.raises(JobFailed):
        run_job(compose(["bench=pack", "impl._target_=fake_impls.WrongAfterFirstCall", "impl.name=late", *FAST]),
                tmp_path)
    row = load(tmp_path).iloc[0]
    assert row.status == "mismatch" and row.message.startswith("mismatch: after timing (wall): packed rows")


# -- rows ---------------------------------------------------------------------------------------

def test_topk_bench_has_route_and_select_rows(tmp_path):
    df = run_job(compose(["bench=topk", *FAST]), tmp_path).set_index("stage")
    assert list(df.index) == ["route", "select"] and (df.status == "ok").all(), df.message.tolist()
    T, E, k = 512, 8, 2
    assert df.loc["select", "bytes_strict"] == T * E * 2 + T * k * (4 + 2)
    assert df.kernel_us.isna().all() and df.rotations.isna().all()  # CPU: no profiler, no rotation
    assert df.time_us_samples.map(len).eq(3).all()


@pytest.mark.parametrize("overrides,why", [(["router=hash"], "router=hash does not select a top-k of the logits"),
                                           (["router=sigmoid_bias"], "router=sigmoid_bias with a bias does not")])
def test_select_is_unsupported_where_the_router_selects_otherwise(tmp_path, overrides, why):
    df = run_job(compose(["bench=topk", *FAST, *overrides]), tmp_path).set_index("stage")
    assert df.loc["route", "status"] == "ok" and df.loc["select", "status"] == "unsupported"
    assert why in df.loc["select", "message"]


def test_rotated_copies_keep_strides_and_dtypes():
    base = torch.randn(64, 16)
    view = base[:, :4]  # a narrow view, as the reference's top-k weights are
    c = copy_like(view)
    assert c.stride() == view.stride() and c.dtype == view.dtype and torch.equal(c, view)
    assert view.clone().stride() != view.stride()  # what clone() would have done
    meta = R.build_metadata(*R.route(base, 2, RouterSpec()), 16)
    m = _clone(meta)
    assert all(getattr(m, f).stride() == getattr(meta, f).stride() for f in ("weights", "scatter_idx", "gather_idx"))


def test_route_metadata_defaults_to_the_route_then_the_metadata():
    """Impl.route_metadata (what the route_metadata stage calls when one implementation runs both
    stages; impl=cute fuses it at decode sizes): the route's ids and weights and their metadata."""
    from moebench.benches.stages import route_then_metadata
    from moebench.impls.torch_impl import TorchImpl

    x, ids, w = _routing("zipf", 37, 16, 4)
    im = TorchImpl()
    for cap in CAPS[:3]:
        gids, gw, meta = im.route_metadata(x, 4, RouterSpec(), None, 16, cap)
        assert torch.equal(gids.long(), ids.long())
        assert_close(gw, w, "gate weights", rtol=1e-6, atol=1e-7)
        check_metadata(meta, R.build_metadata(ids, w, 16, cap))
        other = TorchImpl()  # two implementations: the route of one, the metadata of the other
        check_metadata(route_then_metadata(im, other, x, 4, RouterSpec(), None, 16, cap, None)[2], meta)
    _, _, meta = im.route_metadata(x, 4, RouterSpec())  # E from the logits, dropless
    check_metadata(meta, R.build_metadata(ids, w, 16, CapacitySpec()))
