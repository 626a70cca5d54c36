"""The bulk-copy scatter-pack (moebench/kernels/pack_bulk.py) compiles for sm_90a on a CPU.

Same scheme as tests/test_kernels_compile.py (tests/conftest.py sets CUTE_DSL_ARCH=sm_90a when
no GPU is visible); the correctness of the kernel is checked on the device by
notes/bench_pack_bulk.py (bit-exact against moebench.routing.pack, poisoned output).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

cutlass = pytest.importorskip("cutlass")

import cutlass.cute as cute  # noqa: E402
from cutlass import Int32  # noqa: E402

from moebench.kernels import pack_bulk as pb  # noqa: E402
from moebench.kernels.common import (  # noqa: E402
    TORCH_TO_CUTE,
    fake_rows,
    fake_stream,
    fake_table,
    fake_vector,
)

DTYPES = [pytest.param(TORCH_TO_CUTE[d], id=str(d).removeprefix("torch.")) for d in
          (torch.bfloat16, torch.float32)]
#: seed (one 8 KB chunk in bf16), deepseek_v3 (two 7 KB chunks), qwen3 (4 KB rows), a short
#: row (1040 B in bf16), and a row that does not split evenly (8208 B: 4112 + 4096)
HS = [4096, 7168, 2048, 520, 4104]
#: tuning variants the benchmark measures (besides the defaults)
VARIANTS = [
    {},
    {"chunk_bytes": 4096, "stages": 8, "lag": 2},
    {"stages": 6, "lag": 2, "ctas_per_sm": 3},
    {"warps": 2, "ctas_per_sm": 2},
    {"persistent": False, "items_per_worker": 8},
    {"hint": "evict_first"},
]


@pytest.mark.parametrize("zero_empty", [False, True])
@pytest.mark.parametrize("H", HS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bulk_pack_compiles(dtype, H, zero_empty):
    for S in (2, 8):
        assert pb.compile_bulk(dtype, H, S, zero_empty, num_sms=132) is not None


@pytest.mark.parametrize("tune", VARIANTS, ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()) or "default")
@pytest.mark.parametrize("H,S", [(4096, 2), (7168, 8), (2048, 8)])
def test_bulk_pack_variants_compile(H, S, tune):
    assert pb.compile_bulk(cutlass.BFloat16, H, S, False, num_sms=132, **tune) is not None


def test_fp16_and_one_slot_compile():
    assert pb.compile_bulk(cutlass.Float16, 4096, 1, True, num_sms=132) is not None
    assert pb.compile_bulk(cutlass.Float16, 4096, 16, False, num_sms=132) is not None


def test_ptx_is_bulk_copies_only(tmp_path):
    """The data moves by cp.async.bulk only: no ld/st.global of row data (the only global
    loads are the int32 indices), one expect_tx per load, stores committed in bulk groups."""
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a":
        pytest.skip("CUTE_DSL_ARCH names another target")
    dtype, H, S = cutlass.BFloat16, 4096, 2
    kernel = pb.PackBulk(dtype, H, S, zero_empty=True, hint="evict_first", num_sms=132)
    T, R = cute.sym_int(), cute.sym_int()
    fn = cute.compile(kernel, fake_rows(dtype, T, H), fake_table(Int32, T, S), fake_vector(Int32, R),
                      fake_rows(dtype, R, H), fake_stream(),
                      options=f"--enable-tvm-ffi --keep-ptx --dump-dir={tmp_path}")
    ptx = fn.__ptx__
    if not ptx or "\n" not in ptx:  # a path in some versions
        ptx = "\n".join(p.read_text() for p in tmp_path.glob("*.ptx"))
    ops = set(re.findall(r"\b(cp\.async\.bulk[\w:.]*|ld\.global[\w:.]*|st\.global[\w:.]*|"
                         r"mbarrier\.[\w:.]*|createpolicy[\w:.]*)", ptx))
    assert "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint" in ops
    assert "cp.async.bulk.global.shared::cta.bulk_group.L2::cache_hint" in ops
    assert "cp.async.bulk.wait_group.read" in ops and "cp.async.bulk.commit_group" in ops
    assert "mbarrier.arrive.expect_tx.shared.b64" in ops
    assert not any(op.startswith("st.global") for op in ops)
    assert all(op in ("ld.global.b32", "ld.global.nc.b32") for op in ops if op.startswith("ld.global"))
    assert ".reqntid 32, 1, 1" in ptx


def test_compile_cache_is_keyed_on_static_config():
    a = pb.compile_bulk(cutlass.BFloat16, 2048, 8, False, num_sms=132)
    hits = pb._cache.hits
    assert pb.compile_bulk(cutlass.BFloat16, 2048, 8, False, num_sms=132) is a
    assert pb._cache.hits == hits + 1
    assert pb.compile_bulk(cutlass.BFloat16, 2048, 8, False, num_sms=132, stages=6, lag=2) is not a


# -- pure-Python pieces --------------------------------------------------------------------


@pytest.mark.parametrize("row_bytes", [16, 1040, 4096, 8192, 8208, 14336, 16384, 65520])
@pytest.mark.parametrize("chunk_bytes", [1024, 4096, 8192])
def test_chunking_covers_the_row(row_bytes, chunk_bytes):
    chunks, per = pb.chunking(row_bytes, min(chunk_bytes, row_bytes))
    assert per % 16 == 0 and per <= max(chunk_bytes, 16)
    assert (chunks - 1) * per < row_bytes <= chunks * per


def test_unsupported_reasons():
    assert pb.supports(torch.bfloat16, 4096, 2) is None
    assert "16 bytes" in pb.supports(torch.bfloat16, 4100, 2)
    assert "slots" in pb.supports(torch.float32, 4096, 64)
    assert "float64" in pb.supports(torch.float64, 4096, 2)
    with pytest.raises(pb.Unsupported, match="16 bytes"):
        pb.PackBulk(cutlass.BFloat16, 4100, 2)
    with pytest.raises(pb.Unsupported, match="shared memory"):
        pb.PackBulk(cutlass.BFloat16, 65536, 2, chunk_bytes=65536, stages=4)
    with pytest.raises(ValueError, match="hint"):
        pb.PackBulk(cutlass.BFloat16, 4096, 2, hint="stream")
    with pytest.raises(TypeError, match="unknown"):
        pb.tuning(threads=256)
