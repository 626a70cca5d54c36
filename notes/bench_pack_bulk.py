"""Check and time the bulk-copy scatter-pack (moebench/kernels/pack_bulk.py) against the
existing scatter-pack and a same-call device copy (notes/pack_bulk.md).

    source .gpu/setup.sh && PYTHONUNBUFFERED=1 python3 notes/bench_pack_bulk.py --out $OUT

What runs (bf16, T = 16384, uniform logits, softmax_topk, dropless unless noted):
  copy      ``dst.copy_(src)`` of 1 GiB (bytes read + written), and a copy of the same bytes
            as each shape's pack;
  cute      the existing scatter-pack through ``CuteImpl`` (its default configuration);
  bulk      the bulk pack in a few configurations (chunk bytes, stages, lag, CTAs per SM,
            warps per CTA, persistent or blocked grid, L2 evict_first hint);
at seed (T16384 H4096 E128 k2), qwen3_30b_a3b (T16384 H2048 E128 k8) and deepseek_v3
(T16384 H7168 E256 k8); then seed under capacity_factor 1.0 (zeroed rows) and a few small
edge cases (fp32 / fp16, odd T, rows that do not split evenly, drops, padding) that are only
checked. Every variant is first run on a NaN-poisoned output and compared bit-exactly with
``moebench.routing.pack``; a mismatch is reported and the variant is not timed.

Timing: moebench.timing.Timer (CUDA events, 256 MB L2 flush between repeats, median of 50
after 5 warm-ups). Bytes are the strict bytes of the harness, (T + R)·H·b.

Robustness: the measurements run in a worker process; this (supervisor) process restarts
the worker without the job it was on if it crashes or stalls (an mbarrier wait that never
completes would hang the GPU), and stops launching work after ``--budget`` seconds. The
table of everything measured is printed last; JSON rows go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

SHAPES = {  # name: (T, H, E, k)
    "seed": (16384, 4096, 128, 2),
    "qwen3_30b_a3b": (16384, 2048, 128, 8),
    "deepseek_v3": (16384, 7168, 256, 8),
}

#: bulk pack configurations (keys of moebench.kernels.pack_bulk.DEFAULTS); the first is the default
BULK_VARIANTS = [
    {},
    {"chunk_bytes": 4096, "stages": 8, "lag": 2},
    {"stages": 6, "lag": 2, "ctas_per_sm": 3},
    {"ctas_per_sm": 6},
    {"stages": 8, "lag": 2, "ctas_per_sm": 2},
    {"stages": 8, "lag": 4, "ctas_per_sm": 3},
    {"stages": 8, "lag": 2, "ctas_per_sm": 6},
    {"persistent": False, "items_per_worker": 8},
    {"hint": "evict_first"},
    {"chunk_bytes": 16384, "stages": 3, "lag": 1, "ctas_per_sm": 4},
]

#: small cases, only checked: (name, dtype, T, H, E, k, capacity_factor, padded, tune)
EDGE = [
    ("bf16 T1000 H4104 (8208 B rows: 4112+4096 chunks) k4", "bfloat16", 1000, 4104, 16, 4, None, False, {}),
    ("bf16 T999 same kernel (no recompile)", "bfloat16", 999, 4104, 16, 4, None, False, {}),
    ("bf16 T1000 H4104 blocked grid, 4 KB chunks", "bfloat16", 1000, 4104, 16, 4, None, False,
     {"persistent": False, "items_per_worker": 3, "chunk_bytes": 4096, "stages": 5, "lag": 2}),
    ("fp32 T777 H520 k1 cf1.0 (drops + zeroed rows)", "float32", 777, 520, 8, 1, 1.0, False, {}),
    ("fp16 T300 H2048 k8 cf1.25 padded", "float16", 300, 2048, 64, 8, 1.25, True, {"warps": 2}),
    ("bf16 T5 H7168 k8 (fewer items than workers)", "bfloat16", 5, 7168, 256, 8, None, False, {}),
]


#: what the memory does with the pack's traffic mix (per shape, x [T, H] and k): read-only x,
#: write-only R rows, 1:1 copies (torch and bulk), 1:k duplication to adjacent rows (torch,
#: existing scatter, bulk), i.e. the same bytes as the pack with sequential writes
DIAG = ["read x (x.sum)", "write R rows (fill_)", "torch copy x -> T rows", "bulk copy x -> T rows (k=1)",
        "torch dup x -> k adjacent rows", "cute scatter dup -> k adjacent rows", "bulk dup -> k adjacent rows",
        "bulk dup -> k adjacent rows, stages=8,lag=2,ctas_per_sm=6"]


def label(v: dict) -> str:
    return ",".join(f"{k}={v[k]}" for k in v) or "default"


def jobs(shapes: list[str], quick: bool) -> list[dict]:
    variants = BULK_VARIANTS[:2] if quick else BULK_VARIANTS
    out = []
    for shape in shapes:  # the default bulk first: the one number that matters most
        out.append({"kind": "bulk", "shape": shape, "cap": None, "tune": variants[0]})
        out.append({"kind": "cute", "shape": shape, "cap": None})
        out.append({"kind": "copy", "shape": shape, "cap": None})
        out += [{"kind": "bulk", "shape": shape, "cap": None, "tune": v} for v in variants[1:]]
    for cap in ("cf1", "cf1-padded"):
        out.append({"kind": "bulk", "shape": "seed", "cap": cap, "tune": {}})
        out.append({"kind": "cute", "shape": "seed", "cap": cap})
    out += [{"kind": "edge", "case": i} for i in range(len(EDGE))]
    for shape in [s for s in ("seed", "qwen3_30b_a3b") if s in shapes]:
        out += [{"kind": "diag", "shape": shape, "cap": "diag", "what": w} for w in DIAG]
    for i, j in enumerate(out):
        j["id"] = i
    return out


# ------------------------------------------------------------------------------------------
# worker: does the measurements, one JSON line per job event in --progress
# ------------------------------------------------------------------------------------------


#: test hooks for the supervisor on a CPU machine: DRYRUN=1 runs on the CPU with the kernels
#: replaced by the reference; HANG=<job id> / CRASH=<job id> make that job stall / kill the worker
DRYRUN = os.environ.get("BENCH_PACK_BULK_DRYRUN") == "1"
HANG = int(os.environ.get("BENCH_PACK_BULK_HANG", "-1"))
CRASH = int(os.environ.get("BENCH_PACK_BULK_CRASH", "-1"))


class Worker:
    def __init__(self, progress: Path):
        import torch

        from moebench.timing import Timer, TimingSpec, copy_bandwidth_GBps

        self.torch = torch
        if DRYRUN:
            torch.cuda.synchronize = lambda *a, **k: None
            self.dev = torch.device("cpu")
            self.name = "cpu (dry run)"
            _fake_kernels()
        else:
            self.dev = torch.device("cuda")
            self.name = torch.cuda.get_device_name(self.dev)
        self.progress = progress.open("a")
        self.timer = Timer(TimingSpec("events", warmup=5, repeats=50), self.dev)
        self.copy = copy_bandwidth_GBps(self.dev)
        self.emit({"event": "copy1g", "device": self.name, "copy_GBps": self.copy})
        print(f"device: {self.name}; copy {self.copy:.0f} GB/s (1 GiB, read+write)", flush=True)
        self.cases: dict = {}

    def emit(self, rec: dict) -> None:
        self.progress.write(json.dumps(rec) + "\n")
        self.progress.flush()

    def case(self, shape: str, cap: str | None):
        """x, metadata and the reference pack of a benchmark shape (cached per shape)."""
        key = (shape, cap)
        if key not in self.cases:
            torch = self.torch
            from moebench import routing as R
            from moebench.logits import make_logits

            self.cases.clear()
            torch.cuda.empty_cache()
            T, H, E, k = SHAPES[shape]
            if DRYRUN:
                T = 256
            spec = {None: R.CapacitySpec(), "cf1": R.CapacitySpec(1.0),
                    "cf1-padded": R.CapacitySpec(1.0, pad_to_capacity=True)}[cap]
            lg = make_logits("uniform", T, E, seed=17, device=self.dev)
            ids, w = R.route(lg, k, R.RouterSpec())
            meta = R.build_metadata(ids, w, E, spec, T * k)
            g = torch.Generator(device=self.dev).manual_seed(18)
            x = torch.randn(T, H, generator=g, device=self.dev).to(torch.bfloat16)
            ref = R.pack(x, meta)
            self.cases[key] = (x, meta, ref, torch.empty_like(ref))
        return self.cases[key]

    def record(self, job, variant, fn, nbytes, **extra):
        t = self.timer.time(fn)
        gbs = nbytes / (t.median_us * 1e-6) / 1e9
        shape = job["shape"] + (f"/{job['cap']}" if job.get("cap") else "")
        row = {"event": "row", "id": job["id"], "device": self.name, "shape": shape, "kernel": job["kind"],
               "variant": variant, "us": t.median_us, "p10_us": t.p10_us, "p90_us": t.p90_us, "GBps": gbs,
               "pct_copy": 100 * gbs / self.copy, "copy_GBps": self.copy, "bytes": nbytes, **extra}
        self.emit(row)
        print(f"  {shape:22s} {job['kind']:5s} {variant:58s} {t.median_us:9.1f} us {gbs:7.0f} GB/s "
              f"{row['pct_copy']:5.1f} %", flush=True)

    def checked(self, job, variant, fn, out, ref, nbytes, **extra):
        from moebench.check import assert_equal, poison

        torch = self.torch
        t0 = time.perf_counter()
        poison(out)
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        assert_equal(out, ref, f"{job['kind']} {variant}")  # raises: reported as a failed job
        self.record(job, variant, fn, nbytes, first_call_s=first, **extra)

    def run(self, job):
        torch = self.torch
        from moebench.kernels import pack_bulk as pb

        if job["id"] == HANG:
            time.sleep(1e6)
        if job["id"] == CRASH:
            os._exit(9)
        if job["kind"] == "edge":
            return self.edge(job)
        if job["kind"] == "diag":
            return self.diag(job)
        x, meta, ref, out = self.case(job["shape"], job["cap"])
        T, H = x.shape
        nbytes = (T + meta.num_rows) * H * x.element_size()
        if job["kind"] == "copy":
            src = torch.empty(nbytes // 8, dtype=torch.float32, device=self.dev)
            dst = torch.empty_like(src)
            self.record(job, "copy, same bytes as pack", lambda: dst.copy_(src), nbytes)
        elif job["kind"] == "cute":
            from moebench.kernels import pack as kp

            tune = kp.scatter_tuning(kp.TORCH_TO_CUTE[x.dtype], H)
            try:
                from moebench.impls.cute_impl import CuteImpl

                im = CuteImpl()
                fn, how = (lambda: im.pack(x, meta, out=out)), "CuteImpl default"
            except Exception as e:  # noqa: BLE001 - cute_impl.py is edited concurrently: call the kernel
                print(f"  CuteImpl unavailable ({type(e).__name__}: {e}); calling moebench.kernels.pack", flush=True)
                fn = lambda: kp.pack(x, meta.gather_idx, meta.scatter_idx, out, mode="scatter",  # noqa: E731
                                     zero_empty=meta.may_have_empty_rows, threads=256, hint="none", **tune)
                how = "kernels.pack, CuteImpl's default tuning"
            self.checked(job, f"existing scatter ({how}, {label(tune)})", fn, out, ref, nbytes)
        else:
            tune = pb.tuning(**job["tune"])
            k = pb.PackBulk(pb.TORCH_TO_CUTE[x.dtype], H, meta.num_slots, zero_empty=meta.may_have_empty_rows,
                            num_sms=pb._num_sms(), **tune)
            info = {"chunks": k.chunks, "chunk_bytes_eff": k.chunk_bytes, "ctas_per_sm_eff": k.ctas_per_sm,
                    "smem_per_cta": k.warps * k.stages * k.chunk_bytes}
            fn = lambda: pb.pack(x, meta.gather_idx, meta.scatter_idx, out,  # noqa: E731
                                 zero_empty=meta.may_have_empty_rows, **job["tune"])
            self.checked(job, f"bulk {label(job['tune'])}", fn, out, ref, nbytes, tune=tune, **info)

    def diag(self, job):
        torch = self.torch
        from moebench.kernels import pack as kp
        from moebench.kernels import pack_bulk as pb

        key = ("diag", job["shape"])
        if key not in self.cases:
            self.cases.clear()
            torch.cuda.empty_cache()
            T, H, E, k = SHAPES[job["shape"]]
            if DRYRUN:
                T = 256
            x = torch.randn(T, H, device=self.dev).to(torch.bfloat16)
            self.cases[key] = (x, torch.empty(T * k, H, device=self.dev, dtype=x.dtype), k)
        x, dup, k = self.cases[key]
        T, H = x.shape
        b = x.element_size()
        w = job["what"]
        ar = torch.arange(T, device=self.dev, dtype=torch.int32)
        adjacent = torch.arange(T * k, device=self.dev, dtype=torch.int32).view(T, k)
        gidx = ar.repeat_interleave(k)
        dup_bytes = (T + T * k) * H * b
        if w.startswith("read"):
            self.record(job, w, lambda: x.sum(), T * H * b)
        elif w.startswith("write"):
            self.record(job, w, lambda: dup.fill_(1.0), T * k * H * b)
        elif w.startswith("torch copy"):
            y = torch.empty_like(x)
            self.record(job, w, lambda: y.copy_(x), 2 * T * H * b)
        elif w.startswith("bulk copy"):
            y = torch.empty_like(x)
            self.checked(job, w, lambda: pb.pack(x, ar, ar.view(T, 1), y, zero_empty=False), y, x, 2 * T * H * b)
        elif w.startswith("torch dup"):
            self.record(job, w, lambda: dup.view(T, k, H).copy_(x[:, None].expand(T, k, H)), dup_bytes)
        else:
            ref = x.repeat_interleave(k, 0)
            if w.startswith("cute"):
                tune = {"threads": 256, "hint": "none", **kp.scatter_tuning(kp.TORCH_TO_CUTE[x.dtype], H)}
                fn = lambda: kp.pack(x, gidx, adjacent, dup, mode="scatter", zero_empty=False, **tune)  # noqa: E731
                self.checked(job, f"{w} ({label(tune)})", fn, dup, ref, dup_bytes)
            else:
                tune = {} if "," not in w else {"stages": 8, "lag": 2, "ctas_per_sm": 6}
                fn = lambda: pb.pack(x, gidx, adjacent, dup, zero_empty=False, **tune)  # noqa: E731
                self.checked(job, w, fn, dup, ref, dup_bytes)
            del ref

    def edge(self, job):
        torch = self.torch
        from moebench import routing as R
        from moebench.check import assert_equal, poison
        from moebench.kernels import pack_bulk as pb
        from moebench.logits import make_logits

        name, dt, T, H, E, k, cf, padded, tune = EDGE[job["case"]]
        dtype = getattr(torch, dt)
        lg = make_logits("uniform", T, E, seed=5 + job["case"], device=self.dev)
        ids, w = R.route(lg, k, R.RouterSpec())
        spec = R.CapacitySpec() if cf is None else R.CapacitySpec(cf, pad_to_capacity=padded)
        meta = R.build_metadata(ids, w, E, spec, T * k)
        x = torch.randn(T, H, device=self.dev).to(dtype)
        ref = R.pack(x, meta)
        out = poison(torch.empty_like(ref))
        misses = pb._cache.misses
        pb.pack(x, meta.gather_idx, meta.scatter_idx, out, zero_empty=meta.may_have_empty_rows, **tune)
        torch.cuda.synchronize()
        assert_equal(out, ref, name)
        empty = int((meta.gather_idx < 0).sum())
        dropped = int((meta.scatter_idx < 0).sum())
        rec = {"event": "edge", "id": job["id"], "case": name, "ok": True, "R": meta.num_rows, "empty_rows": empty,
               "dropped_slots": dropped, "compiled": pb._cache.misses - misses}
        self.emit(rec)
        print(f"  edge ok: {name} (R={meta.num_rows}, empty rows {empty}, dropped slots {dropped}, "
              f"new compiles {rec['compiled']})", flush=True)


def _fake_kernels() -> None:
    """DRYRUN: the reference pack in place of the device kernels (plumbing test only)."""
    from moebench import routing as R
    from moebench.impls.cute_impl import CuteImpl
    from moebench.kernels import pack_bulk as pb

    def fake(x, gather_idx, scatter_idx, out, mode="scatter", zero_empty=True, **tune):
        g = gather_idx.long()
        out.copy_(torch.where((g >= 0)[:, None], x[g.clamp_min(0)], torch.zeros((), dtype=x.dtype)))
        return out

    import torch

    from moebench.kernels import pack as kp

    pb.pack = kp.pack = fake
    CuteImpl.pack = lambda self, x, meta, out=None: R.pack(x, meta, out=out)


def worker_main(args) -> None:
    todo = json.loads(Path(args.jobs).read_text())
    w = Worker(Path(args.progress))
    for job in todo:
        w.emit({"event": "start", "id": job["id"]})
        try:
            w.run(job)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
            print(f"  FAILED job {job}: {msg}", flush=True)
            traceback.print_exc(limit=3)
            w.emit({"event": "fail", "id": job["id"], "error": msg[:2000]})
            if "CUDA error" in msg or "illegal" in msg.lower():
                sys.exit(3)  # a sticky CUDA error: the supervisor starts a fresh worker
        w.emit({"event": "done", "id": job["id"]})


# ------------------------------------------------------------------------------------------
# supervisor
# ------------------------------------------------------------------------------------------


def supervise(args) -> None:
    t_start = time.monotonic()
    out_dir = Path(args.out) if args.out else Path(os.environ.get("TMPDIR", "/tmp")) / "bench_pack_bulk"
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = out_dir / "progress.jsonl"
    progress.write_text("")
    all_jobs = jobs(args.shapes.split(","), args.quick)
    by_id = {j["id"]: j for j in all_jobs}
    finished: set[int] = set()
    failures: dict[int, str] = {}
    attempt = 0
    lost_bulk = 0
    while True:
        remaining = [j for j in all_jobs if j["id"] not in finished]
        left = args.budget - (time.monotonic() - t_start)
        if not remaining or left < 15:
            break
        attempt += 1
        jobs_file = out_dir / f"jobs{attempt}.json"
        jobs_file.write_text(json.dumps(remaining))
        cmd = [sys.executable, __file__, "--worker", "--jobs", str(jobs_file), "--progress", str(progress)]
        print(f"[supervisor] worker {attempt}: {len(remaining)} jobs, {left:.0f} s left", flush=True)
        proc = subprocess.Popen(cmd)
        seen = 0
        current, since = None, time.monotonic()
        startup = True
        while proc.poll() is None:
            time.sleep(0.5)
            lines = progress.read_text().splitlines()
            for line in lines[seen:]:
                rec = json.loads(line)
                if rec["event"] == "start":
                    current, since, startup = rec["id"], time.monotonic(), False
                elif rec["event"] in ("done", "fail"):
                    finished.add(rec["id"])
                    if rec["event"] == "fail":
                        failures[rec["id"]] = rec["error"]
                    current, since = None, time.monotonic()
            seen = len(lines)
            limit = args.startup_s if startup else args.job_s
            over_budget = time.monotonic() - t_start > args.budget
            if time.monotonic() - since > limit or over_budget:
                why = "over budget" if over_budget else f"no progress for {limit} s"
                print(f"[supervisor] killing worker ({why}; job {current})", flush=True)
                proc.kill()
                proc.wait()
                break
        if current is not None:  # it died or hung on this job
            finished.add(current)
            failures.setdefault(current, f"worker died or hung (rc {proc.returncode})")
            print(f"[supervisor] job {by_id[current]} lost the worker: skipped", flush=True)
            if by_id[current]["kind"] == "bulk":
                lost_bulk += 1
            if lost_bulk >= 2:  # the kernel itself hangs / faults: keep the baselines only
                for j in all_jobs:
                    if j["kind"] in ("bulk", "edge") and j["id"] not in finished:
                        finished.add(j["id"])
                        failures[j["id"]] = "skipped: two bulk jobs lost the worker"
        elif proc.returncode not in (0, None) and startup:
            print("[supervisor] worker failed at start-up; giving up", flush=True)
            break
    report(progress, all_jobs, failures, out_dir)


def report(progress: Path, all_jobs, failures, out_dir: Path) -> None:
    recs = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    rows = [r for r in recs if r["event"] == "row"]
    edges = [r for r in recs if r["event"] == "edge"]
    copies = [r for r in recs if r["event"] == "copy1g"]
    result = {"rows": rows, "edge": edges, "copy1g": copies,
              "failures": {str(k): {"job": next(j for j in all_jobs if j["id"] == k), "error": v}
                           for k, v in failures.items()}}
    (out_dir / "bench_pack_bulk.json").write_text(json.dumps(result, indent=1))
    print("\n==== failures ====" if failures else "\n==== no failures ====")
    for k, v in failures.items():
        print(f"  {next(j for j in all_jobs if j['id'] == k)}: {v[:300]}")
    print(f"edge cases checked bit-exact: {len(edges)} of {len(EDGE)}")
    if copies:
        bws = ", ".join(f"{c['copy_GBps']:.0f}" for c in copies)
        print(f"\n{copies[0]['device']}: copy 1 GiB {bws} GB/s (one per worker process)")
    print(f"{'shape':22s} {'kernel':5s} {'variant':58s} {'us':>9s} {'GB/s':>7s} {'%copy':>6s}")
    order = []
    for r in rows:
        if r["shape"] not in order:
            order.append(r["shape"])
    for shape in order:
        sel = [r for r in rows if r["shape"] == shape]
        sel.sort(key=lambda r: ({"copy": 0, "cute": 1, "bulk": 2}.get(r["kernel"], 3),
                                  r["us"] if r["kernel"] != "diag" else 0))
        for r in sel:
            print(f"{shape:22s} {r['kernel']:5s} {r['variant'][:58]:58s} {r['us']:9.1f} {r['GBps']:7.0f} "
                  f"{r['pct_copy']:6.1f}")
    # the serial read + write model: is the pack as fast as reading x and, apart, writing R rows?
    for shape in ("seed", "qwen3_30b_a3b"):
        d = {r["variant"].split(" (")[0]: r["us"] for r in rows if r["shape"] == f"{shape}/diag"}
        best = {kind: min((r["us"] for r in rows if r["shape"] == shape and r["kernel"] == kind), default=None)
                for kind in ("copy", "cute", "bulk")}
        rd, wr = d.get("read x"), d.get("write R rows")
        if rd and wr and best["cute"]:
            print(f"{shape}: read x {rd:.1f} us + write R rows {wr:.1f} us = {rd + wr:.1f} us; copy of the same "
                  f"bytes {best['copy'] or 0:.1f} us; pack: existing {best['cute']:.1f} us, "
                  f"best bulk {best['bulk'] or 0:.1f} us")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for the JSON results")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="two bulk variants per shape")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds after which no new work starts")
    ap.add_argument("--startup-s", type=float, default=90.0, help="worker start-up allowance (imports, copy)")
    ap.add_argument("--job-s", type=float, default=30.0, help="stall limit per job (compile + check + time)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        worker_main(args)
    else:
        supervise(args)


if __name__ == "__main__":
    main()
