"""impl=cute's FP8 pack (bit-exact against the reference: values and scales; every tiling knob)
and its aligned metadata and pack (equal to the reference; the empty rows zeroed inside the
scatter kernels' own grid, also where the rows far outnumber the tokens), on a GPU."""

import pytest
import torch

from moebench import routing as R
from moebench.app import run_job
from moebench.benches.stages import plant_extremes
from moebench.check import assert_equal
from moebench.config import compose
from moebench.impls.cute_impl import CuteImpl
from moebench.logits import make_logits
from moebench.routing import CapacitySpec, RouterSpec

pytestmark = pytest.mark.gpu
DEV = "cuda"
CAPS = [CapacitySpec(), CapacitySpec(align=16), CapacitySpec(align=128), CapacitySpec(1.0),
        CapacitySpec(0.6, align=64), CapacitySpec(1.25, pad_to_capacity=True, align=16)]


def _meta(T, E, k, cap, seed=3):
    logits = make_logits("zipf", T, E, seed=seed, device=DEV)  # skewed: a few experts take most
    ids, w = R.route(logits, k, RouterSpec())
    return ids, w, R.build_metadata(ids, w, E, cap)


@pytest.mark.parametrize("mode", ["fp8_block128", "fp8_ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,H,E,k", [(4099, 7168, 256, 8), (1000, 2048, 128, 8), (1, 128, 8, 1), (777, 384, 16, 16),
                                     (3000, 4096, 64, 2)])
@pytest.mark.parametrize("cap", CAPS, ids=str)
def test_fp8_pack_is_bit_exact(mode, dtype, T, H, E, k, cap):
    _, _, meta = _meta(T, E, k, cap)
    x = plant_extremes((torch.randn(T, H, device=DEV) * 3).to(dtype))
    q = torch.full((meta.num_rows, H), 0x7F, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
    s = torch.full((meta.num_rows, H // 128), float("nan"), device=DEV)
    CuteImpl().pack_fp8(x, meta, mode, out=(q, s))
    rq, rs = R.pack_fp8(x, meta, mode)
    n = meta.block_rows
    assert_equal(q[:n].view(torch.uint8), rq[:n].view(torch.uint8), f"{mode} values (bits)")
    assert_equal(s[:n].view(torch.int32), rs[:n].view(torch.int32), f"{mode} scales (bits)")


#: the FP8 pack's tiling knobs (impl=cute's fp8_* options and the shared threads / max_iters / cache_hint)
FP8_TUNINGS = [dict(fp8_vec=16), dict(fp8_scales="row"), dict(fp8_vec=16, fp8_scales="row"),
               dict(fp8_vec=16, fp8_scales="row", fp8_tokens=2), dict(fp8_scales="row", fp8_tokens=3, fp8_tpr=16),
               dict(fp8_vec=16, fp8_tpr=64, threads=128), dict(fp8_scales="row", fp8_tpr=256, threads=512),
               dict(fp8_vec=16, fp8_scales="row", fp8_min_ctas=6, cache_hint="stream"),
               dict(fp8_tokens=2, max_iters=8, fp8_min_ctas=8), dict(fp8_vec=16, max_iters=1, fp8_tokens=4)]


@pytest.mark.parametrize("tune", FP8_TUNINGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("mode,T,H,E,k,cap", [
    ("fp8_block128", 4099, 7168, 256, 8, CapacitySpec(align=128)),
    ("fp8_ue8m0", 1000, 2048, 128, 8, CapacitySpec()),
    ("fp8_block128", 777, 384, 16, 16, CapacitySpec(1.0)),
    ("fp8_ue8m0", 3, 4096, 256, 8, CapacitySpec(align=128)),  # R = 24 + 256 * 127: rows >> tokens
])
def test_fp8_pack_tunings_are_bit_exact(tune, mode, T, H, E, k, cap):
    _, _, meta = _meta(T, E, k, cap)
    x = plant_extremes((torch.randn(T, H, device=DEV) * 3).to(torch.bfloat16))
    q = torch.full((meta.num_rows, H), 0x7F, dtype=torch.uint8, device=DEV).view(torch.float8_e4m3fn)
    s = torch.full((meta.num_rows, H // 128), float("nan"), device=DEV)
    CuteImpl(**tune).pack_fp8(x, meta, mode, out=(q, s))
    rq, rs = R.pack_fp8(x, meta, mode)
    n = meta.block_rows
    assert_equal(q[:n].view(torch.uint8), rq[:n].view(torch.uint8), f"{mode} values (bits)")
    assert_equal(s[:n].view(torch.int32), rs[:n].view(torch.int32), f"{mode} scales (bits)")


@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("T,H,E,k,cap", [
    (3, 512, 256, 8, CapacitySpec(align=128)),  # one token CTA, thousands of pad rows: the grid grows
    (1000, 8, 64, 4, CapacitySpec(align=64)),  # one thread per row: one pad row per row group
    (500, 16, 32, 2, CapacitySpec(0.5)),  # two threads per row; a capacity's tail
    (2000, 64, 16, 2, CapacitySpec(1.25, pad_to_capacity=True, align=16)),
    (4099, 4096, 128, 2, CapacitySpec(align=128)),
])
def test_scatter_pack_zeroes_empty_rows_in_its_own_grid(per_slot, T, H, E, k, cap):
    _, _, ref = _meta(T, E, k, cap)
    x = torch.randn(T, H, device=DEV).to(torch.bfloat16)
    out = torch.full((ref.num_rows, H), float("nan"), device=DEV).to(torch.bfloat16)
    CuteImpl(pack_mode="scatter", scatter_per_slot=per_slot).pack(x, ref, out=out)
    n = ref.block_rows
    assert_equal(out[:n], R.pack(x, ref)[:n], "packed rows, empty ones zero")


@pytest.mark.parametrize("T,E,k", [(4099, 256, 8), (1, 8, 1), (20000, 128, 8), (777, 64, 2), (5000, 1024, 16)])
@pytest.mark.parametrize("cap", CAPS[1:], ids=str)
def test_aligned_metadata_and_pack_equal_the_reference(T, E, k, cap):
    ids, w, ref = _meta(T, E, k, cap)
    im = CuteImpl()
    got = im.metadata(ids, w, E, cap)
    assert got.num_rows == ref.num_rows and got.align == cap.align
    for f in ("counts", "offsets", "gather_idx", "scatter_idx", "routed_counts"):
        assert_equal(getattr(got, f).long(), getattr(ref, f).long(), f)
    x = torch.randn(T, 512, device=DEV).to(torch.bfloat16)
    out = torch.full((ref.num_rows, 512), float("nan"), device=DEV).to(torch.bfloat16)
    im.pack(x, got, out=out)
    n = ref.block_rows
    assert_equal(out[:n], R.pack(x, ref)[:n], "aligned packed rows")


@pytest.mark.parametrize("quant", ["fp8_block128", "fp8_ue8m0"])
def test_quantized_pack_rows_on_gpu(tmp_path, quant):
    df = run_job(compose(["shape=deepseek_v3", "bench=pack", "impl=cute", f"bench.quant={quant}",
                          "capacity.align=128", "timing.repeats=5", "timing.warmup=2"]), tmp_path)
    assert list(df.status) == ["ok"], list(df.message)
