"""quack's varlen-M expert GEMM under pinned SM90 configs, against torch._grouped_mm and a dense
cuBLAS GEMM of the same rows (issue 7: the deepseek_v3 expert GEMMs at >= 85 % of dense).

    source .gpu/setup.sh && python3 notes/bench_quack_configs.py            # on the H100/H200
    python3 notes/bench_quack_configs.py --compile-only                      # CPU: compile every config for sm_90a
    python3 notes/bench_quack_configs.py --shapes deepseek_v3 --configs default 128x256_coop_c1x2

For each shape (T 16384 tokens, uniform-random top-k routing: every token picks k distinct experts
uniformly, so the per-expert row counts are binomial around T*k/E) and each expert GEMM, exactly as
``bench=moe_layer`` runs them (``moebench.moe_layer.QuackGemm`` / ``GroupedMMGemm``, weights from
``moe_layer.make_weights``: W1 [E, 2I, H], W2 [E, H, I], bf16):

    gemm1  packed [M, H] x W1[e]^T -> [M, 2I]     M = T*k packed rows, cu_seqlens_m = offsets
    gemm2  a      [M, I] x W2[e]^T -> [M, H]

it times, in one process on one card:

* ``dense``: ``torch.mm`` of all M rows against expert 0's weight (the bench's ``dense_gemm`` ceiling);
* ``grouped_mm``: ``torch._grouped_mm(A, W.mT, offs=offsets[1:])`` (the reference of every check);
* ``quack default``: ``quack.gemm_interface.gemm(A, W.mT, out=, cu_seqlens_m=offsets, tuned=False)``,
  quack's own choice (what ``bench.gemm=quack_varlen`` runs untuned);
* each pinned config (``bench.quack_config`` names: ``<tile_m>x<tile_n>_<pp|coop>_c<cm>x<cn>``):
  ``quack.gemm_interface.gemm_tuned.fn(A, W.mT, out, cu_seqlens_m=offsets, config=GemmConfig(...))``,
  the call ``bench.quack_config`` makes.

Every quack config's first call (compilation included, its wall time printed) is checked against
grouped_mm (outputs NaN-poisoned first; max |quack - grouped_mm| / max |grouped_mm| < 1e-2, all
finite) before it is timed; a config that fails or mismatches is reported and never timed. Timing:
moebench's events timer (CUDA events, the L2 flushed by a 256 MB write before each run, warm-up
first, median of ``--repeats``). By default the configs compile first in parallel in quack's CPU
compile pool (``--jobs``; what its autotuner does), then each is checked and timed.

The last lines are a table per shape: µs, TFLOP/s and % of the dense GEMM of the same K, N for
gemm1, gemm2 and both (the issue's metric: (gemm1 + gemm2 FLOPs) / (their time) over dense's), the
first-call seconds, and ``m_eff``: real rows / rows the tiles compute (the varlen scheduler walks
each expert in blocks of tile_m * cluster_m rows; a partial block costs a full one). With ``$OUT``
set, ``quack_configs.json`` and ``quack_configs.csv`` go there.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

#: shape presets (conf/shape/*.yaml): tokens, hidden, intermediate, experts, topk
SHAPES = {
    "deepseek_v3": dict(T=16384, H=7168, I=2048, E=256, k=8),
    "qwen3_30b_a3b": dict(T=16384, H=2048, I=768, E=128, k=8),
}

#: the sweep: quack's untuned default first, then pinned SM90 configs (moebench.moe_layer names).
#: The varlen-M scheduler walks each expert's rows in blocks of tile_m * cluster_m rows, and a partial
#: block costs a full one: at deepseek_v3 (~512 +- 23 rows an expert) blocks of 256 rows (the default
#: 128 x 2x1 cluster) compute ~19 % padding, blocks of 128 ~10 %, 192 ~11 %, 64 ~5 %.
CONFIGS = [
    "default",             # quack's choice untuned: 128x192 pingpong, 2x1 cluster (256-row blocks)
    "128x192_pp_c1x2",     # the default tile with the cluster turned along N: 128-row blocks, A multicast
    "128x192_pp_c1x1",     # the same without a cluster (also valid for gather-A)
    "128x208_pp_c1x2",     # quack's widest pingpong tile, 128-row blocks
    "128x256_coop_c1x2",   # cooperative 2 x (64x256) warpgroups, 128-row blocks; 256 divides every N here
    "128x256_coop_c2x1",   # the same tile with 256-row blocks (B multicast): the cluster's cost alone
    "192x128_pp_c1x2",     # 192-row blocks (~11 % padding at deepseek_v3, no 2-vs-3-block variance)
    "256x128_coop_c1x2",   # the large cooperative tile of quack's autotune list, 256-row blocks
    "64x256_pp_c1x2",      # 64-row blocks (~5 % padding), less reuse per tile; riskiest last
]

REL_TOL = 1e-2


def log(*a):
    print(*a, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--configs", nargs="+", default=CONFIGS,
                    help="'default' (quack's own untuned choice) and/or bench.quack_config names")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--jobs", type=int, default=8,
                    help="parallel CPU compile workers before timing (quack's compile pool); 0: compile "
                         "in-process at each config's first call")
    ap.add_argument("--compile-timeout", type=float, default=150.0,
                    help="seconds to wait for the pool; configs still compiling then compile in-process")
    ap.add_argument("--compile-only", action="store_true",
                    help="no timing: compile every config for sm_90a and stop (runs on a CPU-only machine)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def config_fields(name: str) -> dict | None:
    """GemmConfig fields of a pinned config name (None: quack's own default). Raises ConfigError."""
    from moebench.moe_layer import quack_config_fields

    return None if name == "default" else quack_config_fields(name)


def block_m(fields: dict | None) -> int:
    from moebench.moe_layer import QUACK_SM90_DEFAULT

    f = fields or QUACK_SM90_DEFAULT
    return f["tile_m"] * f["cluster_m"]


def m_efficiency(counts: list[int], block: int) -> float:
    rows = sum(counts)
    return rows / (sum(math.ceil(c / block) for c in counts) * block) if rows else float("nan")


def uniform_routing(T, E, k, seed, device):
    """Every token picks k distinct experts uniformly at random: (counts [E] list, offsets [E+1] int32)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(T, E, generator=g, device=device).topk(k, dim=1).indices
    counts = torch.bincount(ids.flatten(), minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return counts.tolist(), offsets


class Quack:
    """quack's varlen-M GEMM the way moebench.moe_layer.QuackGemm calls it."""

    def __init__(self):
        from quack import gemm_interface
        from quack.gemm_config import GemmConfig

        self.q, self.GemmConfig = gemm_interface, GemmConfig
        self.pinned = {}

    def default_name(self, device) -> str:
        from dataclasses import asdict

        from moebench.moe_layer import QUACK_CONFIG_KEYS, quack_config_name

        d = asdict(self.q.default_config(device))
        return quack_config_name({k: d[k] for k in QUACK_CONFIG_KEYS})

    def fn(self, name, A, B, out, offsets):
        """A zero-argument call of config ``name`` (built once, like QuackGemm._gemm_config)."""
        if name == "default":
            q = self.q
            return lambda: q.gemm(A, B, out=out, cu_seqlens_m=offsets, tuned=False)
        if name not in self.pinned:
            self.pinned[name] = self.GemmConfig(**config_fields(name), device_capacity=9)
        cfg, tuned_fn = self.pinned[name], self.q.gemm_tuned.fn

        def call():
            tuned_fn(A, B, out, C=None, cu_seqlens_m=offsets, config=cfg)
            return out

        return call


def precompile(calls: dict, jobs: int, timeout: float) -> dict:
    """Compile every config's kernel in quack's CPU compile pool (what its autotuner does): each
    first call raises CompilePending on a cold cache after shipping the kernel key to a worker.
    Returns {name: note}; configs whose pool compile did not finish compile in-process later."""
    os.environ.setdefault("QUACK_COMPILE_WORKERS", str(jobs))
    from quack.cache.async_compile import CompilePending, pool_scope

    notes, pending = {}, {}
    t0 = time.perf_counter()
    with pool_scope() as pool:
        for name, fn in calls.items():
            try:
                fn()
                notes[name] = "cached"
            except CompilePending as e:
                pending[name] = e.sha
            except Exception as e:  # noqa: BLE001 -- surfaces again (in-process) at the checked first call
                notes[name] = f"pool skipped: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        log(f"  {len(pending)} kernels compiling in the pool ({jobs} workers) ...")
        while pending and time.perf_counter() - t0 < timeout:
            for name, sha in list(pending.items()):
                state, err = pool.poll(sha)
                if state != "pending":
                    dt = time.perf_counter() - t0
                    notes[name] = f"pool {state} after {dt:.1f}s" + (f": {err[:160]}" if err else "")
                    log(f"  {name}: {notes[name]}")
                    del pending[name]
            time.sleep(0.2)
        for name in pending:
            notes[name] = f"pool timeout after {timeout:.0f}s (compiles in-process)"
            log(f"  {name}: {notes[name]}")
    log(f"  precompile {time.perf_counter() - t0:.1f}s")
    return notes


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


# --------------------------------------------------------------------------------------
# CPU: compile only
# --------------------------------------------------------------------------------------


class _Compiled(Exception):
    pass


def compile_only(args) -> int:
    """Trace and compile every config's sm_90a kernel on the CPU (no launch): quack's plan build
    calls get_max_active_clusters right after compiling; it raises here instead of asking the driver."""
    import torch

    import quack.gemm as qg

    def stop(*a, **k):
        raise _Compiled

    qg.get_max_active_clusters = stop
    quack = Quack()
    log(f"quack default config (QUACK_ARCH={os.environ.get('QUACK_ARCH')}): {quack.default_name(torch.device('cpu'))}")
    E, K, N = 4, 256, 384
    counts = [100, 200, 0, 212]
    offsets = torch.tensor([0, 100, 300, 300, 512], dtype=torch.int32)
    A = torch.randn(sum(counts), K, dtype=torch.bfloat16)
    W = torch.randn(E, N, K, dtype=torch.bfloat16)
    out = torch.empty(sum(counts), N, dtype=torch.bfloat16)
    calls, bad = {}, 0
    for name in args.configs:
        try:
            calls[name] = quack.fn(name, A, W.mT, out, offsets)
        except Exception as e:  # noqa: BLE001
            log(f"{name:<22} invalid: {first_line(e)}")
            bad += 1
    if args.jobs > 0:
        precompile(calls, args.jobs, args.compile_timeout)
    for name, fn in calls.items():
        t0 = time.perf_counter()
        try:
            fn()
            log(f"{name:<22} ran?!")  # cannot happen without a GPU
        except _Compiled:
            log(f"{name:<22} compiled ({time.perf_counter() - t0:.1f}s in-process)")
        except Exception as e:  # noqa: BLE001
            log(f"{name:<22} FAILED: {first_line(e)}")
            bad += 1
    return 1 if bad else 0


# --------------------------------------------------------------------------------------
# GPU: check and time
# --------------------------------------------------------------------------------------


def rel_err(got, ref, chunk: int = 16384) -> float:
    """max |got - ref| / max |ref| over all rows (in row chunks: no full-size fp32 copies); NaN when
    ``got`` holds a non-finite value (an unwritten, NaN-poisoned row)."""
    import torch

    d = r = 0.0
    for i in range(0, ref.shape[0], chunk):
        g, f = got[i:i + chunk].float(), ref[i:i + chunk].float()
        if not bool(torch.isfinite(g).all()):
            return float("nan")
        d = max(d, (g - f).abs().max().item())
        r = max(r, f.abs().max().item())
    return d / r if r else d


def run_shape(sname, sp, args, quack, timer, results, dev):
    import torch

    from moebench.moe_layer import make_weights

    T, H, I, E, k = sp["T"], sp["H"], sp["I"], sp["E"], sp["k"]
    M = T * k
    log(f"\n=== {sname}: T {T}, H {H}, I {I}, E {E}, k {k}: M {M} packed rows")
    t0 = time.perf_counter()
    counts, offsets = uniform_routing(T, E, k, args.seed, dev)
    assert int(offsets[-1]) == M
    w = make_weights(E, H, I, torch.bfloat16, dev, args.seed)
    g = torch.Generator(device=dev).manual_seed(args.seed + 5)
    x1 = torch.empty(M, H, dtype=torch.bfloat16, device=dev).normal_(generator=g)
    x2 = torch.empty(M, I, dtype=torch.bfloat16, device=dev).normal_(generator=g)
    log(f"  rows an expert: min {min(counts)}, mean {M / E:.0f}, max {max(counts)}; inputs in "
        f"{time.perf_counter() - t0:.1f}s; m_eff by block rows: "
        + ", ".join(f"{b}: {m_efficiency(counts, b):.3f}" for b in (64, 128, 192, 256)))
    gemms = [("gemm1", x1, w.w1), ("gemm2", x2, w.w2)]  # A [M, K], W [E, N, K]
    names = list(dict.fromkeys(args.configs))
    shape_rows = []

    def row(gemm, impl, config, **kw):
        r = {"shape": sname, "gemm": gemm, "impl": impl, "config": config, "status": "ok", "message": "",
             "first_call_s": None, "time_us": None, "tflops": None, "pct_of_dense": None, "rel_err": None,
             "m_eff": None, **kw}
        shape_rows.append(r)
        results["rows"].append(r)
        return r

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn):
        sync()
        return timer.time(fn).median_us

    for gname, A, W in gemms:
        N, K = W.shape[1], W.shape[2]
        flops = 2.0 * M * N * K
        out = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
        # dense ceiling: torch.mm of all M rows with expert 0's weight (the bench's dense_gemm), after
        # half a second of it (clocks and temperature settle before the first number)
        w0t = W[0].T

        def dense(A=A, w0t=w0t, out=out):
            return torch.mm(A, w0t, out=out)

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            dense()
            sync()
        us = timed(dense)
        dense_tf = flops / (us * 1e-6) / 1e12
        row(gname, "dense", "torch.mm", time_us=us, tflops=dense_tf, pct_of_dense=100.0)
        log(f"  {gname} [{M}, {K}] x [{K}, {N}]: dense {us:.0f} us {dense_tf:.0f} TFLOP/s")
        # grouped_mm: the reference of the checks (as GroupedMMGemm: offs = offsets[1:], int32)
        offs = offsets[1:]
        ref = torch._grouped_mm(A, W.mT, offs=offs)
        sync()
        us = timed(lambda: torch._grouped_mm(A, W.mT, offs=offs))
        tf = flops / (us * 1e-6) / 1e12
        row(gname, "grouped_mm", "torch._grouped_mm", time_us=us, tflops=tf, pct_of_dense=100 * tf / dense_tf)
        log(f"  {gname} grouped_mm {us:.0f} us {tf:.0f} TFLOP/s {100 * tf / dense_tf:.1f} %")
        for name in names:
            fields = None
            try:
                fields = config_fields(name)
            except Exception as e:  # noqa: BLE001
                msg = str(e).split("; accepted")[0]
                row(gname, "quack", name, status="invalid", message=msg)
                log(f"  {gname} {name}: invalid: {msg}")
                continue
            label = name if name != "default" else f"default ({results['quack_default']})"
            r = row(gname, "quack", label, m_eff=m_efficiency(counts, block_m(fields)))
            try:
                fn = quack.fn(name, A, W.mT, out, offsets)
                out.fill_(float("nan"))
                sync()
                t0 = time.perf_counter()
                got = fn()
                sync()
                r["first_call_s"] = time.perf_counter() - t0
                err = rel_err(got, ref)
                r["rel_err"] = err
                if not err < REL_TOL:
                    r.update(status="mismatch", message=f"rel err {err:.3g} >= {REL_TOL} (max|quack - grouped_mm| "
                                                        "/ max|grouped_mm|; nan: a non-finite output)")
                    log(f"  {gname} {label}: MISMATCH {r['message']} (first call {r['first_call_s']:.1f}s)")
                    continue
                us = timed(fn)
                tf = flops / (us * 1e-6) / 1e12
                r.update(time_us=us, tflops=tf, pct_of_dense=100 * tf / dense_tf)
                log(f"  {gname} {label}: {us:.0f} us {tf:.0f} TFLOP/s {100 * tf / dense_tf:.1f} % of dense "
                    f"(first call {r['first_call_s']:.1f}s, rel err {err:.1e}, m_eff {r['m_eff']:.3f})")
            except Exception as e:  # noqa: BLE001 -- one config must not end the sweep
                r.update(status="error", message=first_line(e))
                log(f"  {gname} {label}: ERROR {first_line(e)}")
                traceback.print_exc(limit=4)
                try:
                    sync()
                except Exception as e2:  # noqa: BLE001 -- the context is gone: say so, stop
                    log(f"  CUDA context unusable after {label}: {first_line(e2)}")
                    raise
            finally:
                write_out(results)
        # the dense GEMM once more: how far the card drifted over this GEMM's configs
        us = timed(dense)
        tf = flops / (us * 1e-6) / 1e12
        row(gname, "dense_end", "torch.mm (again, after the configs)", time_us=us, tflops=tf,
            pct_of_dense=100 * tf / dense_tf)
        log(f"  {gname} dense again: {us:.0f} us {tf:.0f} TFLOP/s ({100 * tf / dense_tf:.1f} % of the first)")
        del ref, out
    del w, x1, x2
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return shape_rows


def both_pct(rows, impl, config):
    """(gemm1 + gemm2) FLOPs over their summed time, as % of dense's (the issue's metric)."""
    by = {(r["gemm"], r["impl"], r["config"]): r for r in rows}
    d1, d2 = by.get(("gemm1", "dense", "torch.mm")), by.get(("gemm2", "dense", "torch.mm"))
    g1, g2 = by.get(("gemm1", impl, config)), by.get(("gemm2", impl, config))
    if not all(r and r["time_us"] for r in (d1, d2, g1, g2)):
        return None
    return 100.0 * (d1["time_us"] + d2["time_us"]) / (g1["time_us"] + g2["time_us"])


def table(rows) -> str:
    lines = []
    for sname in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == sname]
        lines.append(f"\n{sname}")
        lines.append(f"{'impl / config':<34} {'gemm1 us':>9} {'TF/s':>5} {'%dense':>6} {'gemm2 us':>9} {'TF/s':>5} "
                     f"{'%dense':>6} {'both %':>6} {'m_eff':>5} {'1st s':>5}  status")
        for impl, config in dict.fromkeys((r["impl"], r["config"]) for r in rs):
            g = {r["gemm"]: r for r in rs if r["impl"] == impl and r["config"] == config}
            cells = []
            for gname in ("gemm1", "gemm2"):
                r = g.get(gname)
                if r and r["time_us"]:
                    cells += [f"{r['time_us']:>9.0f}", f"{r['tflops']:>5.0f}", f"{r['pct_of_dense']:>6.1f}"]
                else:
                    cells += [f"{'-':>9}", f"{'-':>5}", f"{'-':>6}"]
            b = both_pct(rs, impl, config)
            r1 = g.get("gemm1") or {}
            me = r1.get("m_eff")
            fc = r1.get("first_call_s")
            status = "; ".join(f"{k}: {v['status']} {v['message'][:60]}".strip() for k, v in g.items()
                               if v["status"] != "ok") or "ok"
            name = config if impl == "quack" else impl
            b = "-" if b is None else f"{b:.1f}"
            me = "" if me is None else f"{me:.3f}"
            fc = "" if fc is None else f"{fc:.1f}"
            lines.append(f"{name:<34} {' '.join(cells)} {b:>6} {me:>5} {fc:>5}  {status}")
    return "\n".join(lines)


def write_out(results) -> None:
    out = os.environ.get("OUT")
    if not out:
        return
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "quack_configs.json").write_text(json.dumps(results, indent=1, default=str))
    rows = results["rows"]
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(d / "quack_configs.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.compile_only or not torch.cuda.is_available():
        if not args.compile_only:
            log("no CUDA GPU here: --compile-only (compile every config for sm_90a, no timing)")
        os.environ.setdefault("QUACK_ARCH", "90")
        os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
        return compile_only(args)

    from moebench.timing import Timer, TimingSpec

    dev = torch.device("cuda")
    t_start = time.perf_counter()
    quack = Quack()
    results = {
        "gpu": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
        "torch": torch.__version__, "quack": getattr(sys.modules.get("quack"), "__version__", None),
        "quack_default": quack.default_name(dev), "repeats": args.repeats, "warmup": args.warmup,
        "configs": args.configs, "shapes": {s: SHAPES[s] for s in args.shapes}, "rows": [],
    }
    log(f"{results['gpu']} (sm_{''.join(map(str, results['capability']))}), torch {results['torch']}, "
        f"quack {results['quack']}; quack's default config here: {results['quack_default']}")
    if results["capability"][0] != 9:
        log("WARNING: the pinned configs are SM90 configs; this is not a Hopper GPU")
    timer = Timer(TimingSpec("events", warmup=args.warmup, repeats=args.repeats), dev)

    if args.jobs > 0:  # compile every config's kernel in parallel first, on tiny tensors
        log(f"\nprecompiling {len(args.configs)} configs ...")
        try:
            A = torch.randn(512, 256, dtype=torch.bfloat16, device=dev)
            W = torch.randn(4, 384, 256, dtype=torch.bfloat16, device=dev)
            out = torch.empty(512, 384, dtype=torch.bfloat16, device=dev)
            offs = torch.tensor([0, 100, 300, 300, 512], dtype=torch.int32, device=dev)
            calls = {}
            for name in dict.fromkeys(args.configs):
                try:
                    calls[name] = quack.fn(name, A, W.mT, out, offs)
                except Exception as e:  # noqa: BLE001 -- reported per shape below
                    log(f"  {name}: {first_line(e)}")
            results["precompile"] = precompile(calls, args.jobs, args.compile_timeout)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 -- the pool is an optimisation: fall back to in-process
            log(f"  precompile failed ({first_line(e)}); compiling in-process at each first call")

    for sname in args.shapes:
        try:
            run_shape(sname, SHAPES[sname], args, quack, timer, results, dev)
        except Exception as e:  # noqa: BLE001
            log(f"{sname}: ERROR {first_line(e)}")
            traceback.print_exc(limit=6)
            results.setdefault("errors", []).append(f"{sname}: {first_line(e)}")
            if "CUDA" in str(e) or "cuda" in type(e).__name__.lower():
                break
    results["wall_s"] = time.perf_counter() - t_start
    write_out(results)
    log(f"\n{results['gpu']}; quack {results['quack']} default config {results['quack_default']}; events timing, "
        f"L2 flushed, median of {args.repeats}; total {results['wall_s']:.0f}s")
    log(table(results["rows"]))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # moebench from the repo root
    sys.exit(main())
