"""impl=cute on a GPU: pack and combine against the reference on adversarial routings.

Outputs are poisoned with NaN first; pack must be bit-exact in both formulations, combine
within moebench.check's tolerance for the dtype. Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from moebench import routing as R
from moebench.check import assert_close, assert_equal, poison
from moebench.impls.base import Unsupported
from moebench.impls.cute_impl import CuteImpl
from moebench.logits import make_logits

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DROPLESS = R.CapacitySpec()


def _meta(T, E, k, *, logits="uniform", router=R.RouterSpec(), cap=DROPLESS, seed=0, hot=None):
    lg = make_logits(logits, T, E, seed=seed, device="cuda")
    if hot is not None:  # every token's first choice is expert `hot`
        lg[:, hot] += 100.0
    ids, w = R.route(lg, k, router)
    return R.build_metadata(ids, w, E, cap, router.num_rows(T, k, E))


def _check(meta, H, dtype, *, seed=1, modes=("gather", "scatter"), weighted=(True, False)):
    T = meta.num_tokens
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    y = torch.randn(meta.num_rows, H, device="cuda", generator=g).to(dtype)
    ref = R.pack(x, meta)
    for mode, per_slot in [(m, p) for m in modes for p in ((False, True) if m == "scatter" else (False,))]:
        out = poison(torch.empty(meta.num_rows, H, device="cuda", dtype=dtype))
        got = CuteImpl(pack_mode=mode, scatter_per_slot=per_slot).pack(x, meta, out=out)
        assert got is out
        assert_equal(got, ref, f"packed rows ({mode}, per_slot={per_slot})")
    assert_equal(CuteImpl().pack(x, meta), ref, "packed rows (allocated)")
    for wt in weighted:
        out = poison(torch.empty(T, H, device="cuda", dtype=dtype))
        got = CuteImpl().combine(y, meta, out=out, weighted=wt)
        assert got is out
        assert_close(got, R.combine(y, meta, weighted=wt), f"combined rows (weighted={wt})", dtype)


CASES = {
    # name: (T, E, k, H, meta kwargs)
    "uniform": (4096, 64, 8, 4096, {}),
    "one_expert": (2048, 16, 2, 520, {"hot": 3}),
    "empty_experts": (24, 128, 1, 520, {}),
    "zipf": (3000, 128, 8, 520, {"logits": "zipf"}),
    "single_token": (1, 8, 2, 4096, {}),
    "k16": (777, 64, 16, 136, {"logits": "zipf"}),
    "cf1_position": (2048, 16, 2, 520, {"hot": 3, "cap": R.CapacitySpec(1.0, drop_policy="position")}),
    "cf1_probs": (2048, 16, 4, 520, {"logits": "zipf", "cap": R.CapacitySpec(1.0, drop_policy="probs")}),
    "cf1_padded": (2048, 16, 2, 520, {"hot": 3, "cap": R.CapacitySpec(1.0, pad_to_capacity=True)}),
    "cf1_probs_padded": (1000, 32, 4, 136, {"logits": "zipf",
                                            "cap": R.CapacitySpec(1.0, drop_policy="probs", pad_to_capacity=True)}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
def test_pack_combine_match_reference(case, dtype):
    T, E, k, H, kw = CASES[case]
    meta = _meta(T, E, k, **kw)
    if case.startswith("cf1"):
        assert meta.may_have_empty_rows
    if case == "empty_experts":
        assert bool((meta.counts == 0).any())
    _check(meta, H, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_many_tokens(dtype):
    _check(_meta(131072, 64, 2), 256, dtype, weighted=(True,))


def test_large_hidden_chunks():
    """H = 16384 bf16: rows walked in several chunks."""
    _check(_meta(512, 32, 4), 16392, torch.bfloat16)


def test_expert_choice_packs_but_does_not_combine():
    router = R.RouterSpec(name="expert_choice")
    meta = _meta(256, 32, 2, router=router)  # S = E = 32 slots
    x = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    assert_equal(CuteImpl().pack(x, meta), R.pack(x, meta), "packed rows (expert_choice, gather)")
    with pytest.raises(Unsupported, match="S=32"):
        CuteImpl().combine(torch.zeros(meta.num_rows, 64, device="cuda", dtype=torch.bfloat16), meta)
    with pytest.raises(Unsupported, match="S=32"):
        CuteImpl(pack_mode="scatter").pack(x, meta)


def test_unsupported_reasons():
    meta = _meta(16, 8, 2)
    with pytest.raises(Unsupported, match="H=100 is not a multiple of 8 elements"):
        CuteImpl().pack(torch.zeros(16, 100, device="cuda"), meta)
    with pytest.raises(Unsupported, match="float64"):
        CuteImpl().combine(torch.zeros(meta.num_rows, 64, device="cuda", dtype=torch.float64), meta)


def test_zero_tokens():
    meta = _meta(0, 8, 2)
    x = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    assert CuteImpl().pack(x, meta).shape == (0, 64)
    assert CuteImpl().combine(torch.empty(0, 64, device="cuda", dtype=torch.bfloat16), meta).shape == (0, 64)


def test_new_token_count_reuses_the_compiled_kernels():
    from moebench.kernels import combine as kc
    from moebench.kernels import pack as kp

    H, dtype = 264, torch.bfloat16
    # one token count of each variant: a grid under FEW_CTAS (one vector per thread) with the
    # combine's L2 prefetch, a larger one with it, and one above PREFETCH_BYTES
    for T in (1, 1000, 3000, 5000):
        _check(_meta(T, 32, 4, seed=T), H, dtype)
    before = (kp._cache.misses, kc._cache.misses)
    for T in (2, 77, 900, 2500, 6000):
        _check(_meta(T, 32, 4, seed=T), H, dtype)
    assert (kp._cache.misses, kc._cache.misses) == before


def test_strided_inputs_and_outputs():
    meta = _meta(300, 16, 2)
    big = torch.randn(300, 2 * 136, device="cuda", dtype=torch.bfloat16)
    x = big[:, 8:144]  # row stride 272, 16-byte aligned rows
    assert_equal(CuteImpl().pack(x, meta), R.pack(x.contiguous(), meta), "packed rows (strided x)")
    xo = big[:, 1:137]  # misaligned: copied first
    assert_equal(CuteImpl().pack(xo, meta), R.pack(xo.contiguous(), meta), "packed rows (misaligned x)")
    y = torch.randn(meta.num_rows, 136, device="cuda", dtype=torch.bfloat16)
    out = torch.full((300, 2 * 136), float("nan"), device="cuda", dtype=torch.bfloat16)[:, 136:]
    CuteImpl().combine(y, meta, out=out)
    assert_close(out, R.combine(y, meta), "combined rows (strided out)", torch.bfloat16)
