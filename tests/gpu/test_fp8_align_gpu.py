"""impl=cute's FP8 pack (bit-exact against the reference: values and scales) and its aligned
metadata and pack (equal to the reference), on a GPU."""

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
