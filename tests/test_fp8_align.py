"""Quantize on pack (FP8 rows with block scales) and aligned expert blocks, on the CPU: the
reference's semantics, torch (strong eager) and compile bit-exact against it, the bench's
rows and its bad-input errors."""

import math

import pytest
import torch

from moebench import routing as R
from moebench.app import JobFailed, run_job
from moebench.benches.stages import plant_extremes
from moebench.config import ConfigError, compose
from moebench.impls import torch_impl as TI
from moebench.results import load
from moebench.routing import BEYOND, CapacitySpec, RouterSpec

FAST = ["timing.warmup=1", "timing.repeats=3"]
MODES = ("fp8_block128", "fp8_ue8m0")


def _routing(T=200, E=16, k=4, seed=0, skew=3.0, **cap):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) + skew * torch.linspace(0, 1, E)  # skewed: a few experts take most
    ids, w = R.route(logits, k, RouterSpec())
    return ids, w, R.build_metadata(ids, w, E, CapacitySpec(**cap))


def _x(T, H, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return plant_extremes((torch.randn(T, H, generator=g) * 3).to(dtype))


# -- the reference's quantization --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block128_scale_is_amax_over_448_and_dequantizes_within_fp8_rounding(dtype):
    x = _x(64, 512, dtype)
    q, s = R.quantize_fp8(x, "fp8_block128")
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 4) and s.dtype == torch.float32
    blocks = x.float().view(64, 4, 128)
    amax = blocks.abs().amax(-1).clamp(min=1e-4)
    torch.testing.assert_close(s, amax / 448.0, rtol=0, atol=0)
    deq = q.float().view(64, 4, 128) * s[..., None]
    # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 relative, plus its subnormal step near zero
    err = (deq - blocks).abs()
    assert bool((err <= blocks.abs() / 16 + s[..., None] * 2.0 ** -10 + 1e-30).all())
    assert q.float().abs().max() <= 448  # saturated, never inf / NaN
    assert int(q.view(torch.uint8)[0].count_nonzero()) == 0  # the zero row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ue8m0_scale_is_the_smallest_power_of_two_that_fits(dtype):
    x = _x(64, 256, dtype)
    q, s = R.quantize_fp8(x, "fp8_ue8m0")
    amax = x.float().view(64, 2, 128).abs().amax(-1).clamp(min=1e-4)
    m, _ = torch.frexp(s)
    assert bool((m == 0.5).all())  # a power of two
    assert bool((448 * s >= amax).all()) and bool((224 * s < amax).all())
    assert q.float().abs().max() <= 448


def test_quantize_rejects_h_not_a_multiple_of_128_and_unknown_modes():
    with pytest.raises(ValueError, match="multiple of 128"):
        R.quantize_fp8(torch.zeros(2, 192), "fp8_block128")
    with pytest.raises(ValueError, match="accepted"):
        R.quantize_fp8(torch.zeros(2, 128), "fp8")


# -- torch (eager and compiled) bit-exact against the reference -------------------------------

CASES = [dict(), dict(align=16), dict(align=128), dict(factor=1.0), dict(factor=1.0, align=64),
         dict(factor=1.25, pad_to_capacity=True, align=16)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cap", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_pack_fp8_is_bit_exact(mode, cap, dtype):
    _, _, meta = _routing(**cap)
    x = _x(meta.num_tokens, 384, dtype)
    q, s = TI.pack_fp8(x, meta, mode)
    rq, rs = R.pack_fp8(x, meta, mode)
    n = meta.block_rows
    assert torch.equal(q[:n].view(torch.uint8), rq[:n].view(torch.uint8))
    assert torch.equal(s[:n].view(torch.int32), rs[:n].view(torch.int32))


# -- aligned expert blocks ------------------------------------------------------------------------

@pytest.mark.parametrize("cap", CASES[1:], ids=str)
def test_aligned_blocks_start_at_multiples_and_pad_with_empty_rows(cap):
    ids, w, meta = _routing(**cap)
    A = cap.get("align", 1)
    off = meta.offsets.tolist()
    assert all(o % A == 0 for o in off)
    for e in range(meta.num_experts):  # the expert's tokens first, then padding up to the next block
        rows = meta.gather_idx[off[e]:off[e + 1]]
        c = int(meta.counts[e])
        assert bool((rows[:c] >= 0).all()) and bool((rows[c:] == -1).all())
        assert off[e + 1] - off[e] == (-(-c // A) * A if not cap.get("pad_to_capacity") else off[1])
    # past the last block: nobody's rows when aligned (pack need not write them), a capacity's tail else
    assert bool((meta.gather_idx[off[-1]:] == (BEYOND if A > 1 else -1)).all())
    assert meta.num_rows >= off[-1]
    # the same combine as the tight layout: padding changes where rows sit, not the result
    tight = R.build_metadata(ids, w, meta.num_experts, CapacitySpec(**{**cap, "align": 1}))
    y_tight = torch.randn(tight.num_rows, 64, dtype=torch.float64)
    y = torch.full((meta.num_rows, 64), float("nan"), dtype=torch.float64)  # pad and beyond rows: never read
    for t in range(tight.num_tokens):
        for j in range(tight.num_slots):
            r0, r1 = int(tight.scatter_idx[t, j]), int(meta.scatter_idx[t, j])
            assert (r0 < 0) == (r1 < 0)
            if r1 >= 0:
                y[r1] = y_tight[r0]
    torch.testing.assert_close(R.combine(y, meta), R.combine(y_tight, tight), rtol=0, atol=0)


@pytest.mark.parametrize("cap", CASES[1:], ids=str)
def test_torch_metadata_equals_the_reference_aligned(cap):
    ids, w, ref = _routing(**cap)
    got = TI.metadata(ids, w, ref.num_experts, CapacitySpec(**cap))
    assert got.align == ref.align and got.num_rows == ref.num_rows
    for f in ("counts", "offsets", "gather_idx", "scatter_idx", "routed_counts"):
        assert torch.equal(getattr(got, f).long(), getattr(ref, f).long()), f
    torch.testing.assert_close(got.weights, ref.weights)


def test_aligned_pack_zero_fills_padding():
    _, _, meta = _routing(align=64)
    x = torch.randn(meta.num_tokens, 128, dtype=torch.bfloat16)
    out = torch.full((meta.num_rows, 128), float("nan"), dtype=torch.bfloat16)
    TI.pack(x, meta, out=out)
    pad = meta.gather_idx == -1
    assert bool(pad.any()) and bool((out[pad] == 0).all())


# -- the bench ------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["torch", "reference", "compile"])
@pytest.mark.parametrize("quant", MODES)
def test_pack_bench_quantized_rows_are_checked_and_timed(impl, quant, tmp_path):
    df = run_job(compose(["shape=tiny", "bench=pack", f"impl={impl}", f"bench.quant={quant}", "capacity.align=16",
                          *FAST]), tmp_path)
    row = df.iloc[0]
    assert row.status == "ok", row.message
    assert row.quant == quant and row.capacity_align == 16
    T, H, k = 512, 256, 2
    # the tokens read once (bf16), then every block row's FP8 values and fp32 scales written
    written = (row.bytes_strict - T * H * 2) / (H + 4 * H // 128)
    assert written == int(written) and T * k <= written <= T * k + 8 * 15
    assert 0 < row.padding_waste < 1


def test_pack_bench_quantized_catches_one_wrong_bit(tmp_path):
    with pytest.raises(JobFailed, match="mismatch"):
        run_job(compose(["shape=tiny", "bench=pack", "impl._target_=fake_impls.FP8OneBitOff", "impl.name=one_bit",
                         "bench.quant=fp8_ue8m0", *FAST]), tmp_path)
    df = load(tmp_path)
    assert df.iloc[0].status == "mismatch" and "bits" in df.iloc[0].message
    assert math.isnan(df.iloc[0].time_us_median)


def test_pack_bench_cute_quantized_is_gpu_only_on_the_cpu(tmp_path):
    df = run_job(compose(["shape=tiny", "bench=pack", "impl=cute", "bench.quant=fp8_block128", *FAST]), tmp_path)
    assert df.iloc[0].status == "unsupported" and "cuda" in df.iloc[0].message


def test_padding_waste_grows_with_the_alignment(tmp_path):
    waste = {}
    for a in (1, 16, 128):
        df = run_job(compose(["shape=tiny", "bench=pack", "impl=torch", f"capacity.align={a}", *FAST]), tmp_path / str(a))
        assert df.iloc[0].status == "ok", df.iloc[0].message
        waste[a] = df.iloc[0].padding_waste
    assert waste[1] == 0 < waste[16] < waste[128]


@pytest.mark.parametrize("override,needle", [
    ("bench.quant=fp8", "bench.quant='fp8' is not accepted; accepted: none, fp8_block128, fp8_ue8m0"),
    ("capacity.align=0", "capacity.align=0 is not accepted"),
])
def test_bad_quant_or_align_is_one_line_before_anything_runs(override, needle, tmp_path):
    with pytest.raises(ConfigError, match="accepted") as e:
        run_job(compose(["shape=tiny", "bench=pack", override]), tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_quantized_pack_is_forward_only(tmp_path):
    with pytest.raises(ConfigError, match="forward only"):
        run_job(compose(["shape=tiny", "bench=pack", "bench.quant=fp8_ue8m0", "bench.direction=bwd"]), tmp_path)
    assert not list(tmp_path.iterdir())


def test_results_table_keeps_quant_and_align(tmp_path):
    run_job(compose(["shape=tiny", "bench=pack", "impl=torch", "bench.quant=fp8_block128", *FAST]), tmp_path)
    df = load(tmp_path)
    assert list(df.quant) == ["fp8_block128"] and list(df.capacity_align) == [1]
