"""The training rows of ``bench=moe_layer`` (``bench.direction`` bwd / fwdbwd): each stage's
backward, alone or after its forward, checked against torch autograd (the bench's docstring
says what each row runs). A mixin of :class:`~moebench.benches.moe_layer.bench.MoeLayerBench`:
it reads the bench's job, references, buffers and forward calls."""

from __future__ import annotations

import torch

from moebench import routing
from moebench.benches.base import Call
from moebench.benches.moe_layer.gemms import prepoison, torch_ffn_grads, torch_layer_grads
from moebench.benches.moe_layer.reference import grad_tolerance, moe_layer_reference_grads
from moebench.benches.stages import grad_input
from moebench.check import assert_close, poison
from moebench.errors import Unsupported

#: rows of the dense GEMM checked against fp32
DENSE_CHECK_ROWS = 256


class LayerTraining:
    """The backward calls of the layer's stages (``_train_call``), their seeded upstream
    gradients and their torch-autograd references (computed once per job, on first use)."""

    def _assert_grad(self, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        rtol, atol = grad_tolerance(want, self.job.dtype)
        assert_close(got, want, what, rtol=rtol, atol=atol)

    def _upstream(self, name: str) -> torch.Tensor:
        """The seeded upstream gradients (drawn once per job): d_out [T, H] of the layer, d_y
        [R, H] of the expert rows, d_logits [T, E] of the gate, d_h / d_y of the dense GEMMs."""
        if name not in self._grad_refs:
            j, n, I = self.job, self.ref.rows, self.s.intermediate
            shape, salt = {"d_out": ((j.tokens, j.hidden), 21), "d_y": ((self.ref.meta.num_rows, j.hidden), 22),
                           "d_logits": ((j.tokens, j.experts), 23), "dense_d_h": ((n, 2 * I), 24),
                           "dense_d_y": ((n, j.hidden), 25)}[name]
            self._grad_refs[name] = grad_input(j, shape, j.dtype, salt)
        return self._grad_refs[name]

    def _ffn_refs(self) -> list[tuple[str, dict]]:
        """torch autograd of the torch expert FFN on the reference's packed rows from the seeded
        d_y: in the job's dtype, and in fp32 where enabled (rows [0, offsets[E]))."""
        if "ffn" not in self._grad_refs:
            ref, d_y = self.ref, self._upstream("d_y")
            refs = [("torch autograd", torch_ffn_grads(ref.packed, self.w, ref.meta, d_y, self.job.dtype))]
            if self._fp32():
                refs.append(("fp32 autograd", torch_ffn_grads(ref.packed, self.w, ref.meta, d_y, torch.float32)))
            self._grad_refs["ffn"] = refs
        return self._grad_refs["ffn"]

    def _layer_refs(self, ids: torch.Tensor, meta: routing.RoutingMetadata) -> list[tuple[str, tuple]]:
        """(out, d_x, d_Wg, d_W1, d_W2) of the layer on the routing ``ids`` / ``meta``: torch
        autograd of the torch layer in the job's dtype and, where enabled, of the fp32 reference."""
        cached = self._grad_refs.setdefault("layer", [])  # [(ids, refs)]: the reference's routing, a chain's
        for key, refs in cached:
            if key.shape == ids.shape and torch.equal(key, ids):
                return refs
        job, ref, d_out = self.job, self.ref, self._upstream("d_out")

        def weights_of(logits):
            return routing.reference_weights(logits, ids, job.router, ref.bias)

        refs = [("torch autograd", torch_layer_grads(self.x, self.w, ref.prior, meta, weights_of, job.weighted,
                                                     d_out))]
        if self._fp32():
            refs.append(("fp32 autograd", moe_layer_reference_grads(self.x, self.w, ref.prior, ids,
                                                                    meta.scatter_idx >= 0, weights_of,
                                                                    job.weighted, d_out)))
        cached.append((ids, refs))
        return refs

    def _check_ffn_grads(self, got: dict) -> None:
        """Gradients ``got`` (name -> tensor; row gradients over the packed rows) against the FFN references."""
        n = self.ref.rows
        for label, want in self._ffn_refs():
            for name, g in got.items():
                self._assert_grad(g[:n] if name.startswith(("d_a", "d_h", "d_packed")) else g, want[name],
                                  f"{name} vs {label}")

    def _reset_grads(self, *shapes):
        """Poison the gradient buffers (those the path writes) and leave poisoned blocks of the
        gradients it allocates (torch autograd, the routing backward) in the caching allocator."""
        g, dt, dev = self.grads, self.job.dtype, self.job.device

        def reset():
            for t in g.all():
                poison(t)
            for shape in shapes:
                prepoison(shape, dt, dev)
        return reset

    def _directed(self, fwd: Call | None, bwd: Call) -> Call:
        """An independent backward (from seeded gradients) alone (bwd) or after the forward (fwdbwd)."""
        if self.direction == "bwd":
            return bwd
        return Call(lambda: (fwd.fn(), bwd.fn()), lambda got: (fwd.check(got[0]), bwd.check(got[1])),
                    lambda: (fwd.reset(), bwd.reset()))

    def _chained(self, forward, backward, check_fwd, check_bwd, reset_fwd, reset_bwd, reference_ctx=None) -> Call:
        """A stage whose backward reads its forward's activations: ``forward() -> (out, ctx)``,
        ``backward(ctx) -> grads``. bwd: the backward alone on the context of one untimed forward
        (``reference_ctx()``, default ``forward``) of the reference's inputs; fwdbwd: both."""
        if self.direction == "bwd":
            ctx = (reference_ctx or (lambda: forward()[1]))()
            return Call(lambda: backward(ctx), check_bwd, reset_bwd)

        def fn():
            out, ctx = forward()
            return out, backward(ctx)

        return Call(fn, lambda got: (check_fwd(got[0]), check_bwd(got[1])), lambda: (reset_fwd(), reset_bwd()))

    def _train_call(self, stage: str) -> Call:
        job, ref, eg, w, b, g = self.job, self.ref, self.eg, self.w, self.bufs, self.grads
        H, R, I, n = job.hidden, ref.meta.num_rows, self.s.intermediate, ref.rows
        dt, meta = job.dtype, ref.meta
        if stage == "gate":
            d_logits = self._upstream("d_logits")
            want_x, want_wg = d_logits.float() @ w.wg.float().T, self.x.float().T @ d_logits.float()

            def check(got):
                assert_close(got[0], want_x, "gate d_x", dt)
                self._assert_grad(got[1], want_wg, "d_Wg")

            bwd = Call(lambda: (torch.mm(d_logits, w.wg.T, out=g.d_x), torch.mm(self.x.T, d_logits, out=g.d_wg)),
                       check, self._reset_grads())
            return self._directed(self._forward_call("gate") if self.direction == "fwdbwd" else None, bwd)
        if stage == "dense_gemm":
            return self._dense_train_call()
        if stage == "total" and self.impls[job.impl].fused_layer:
            return self._fused_total(self.impls[job.impl])
        if stage in ("gemm1", "activation", "gemm2", "experts", "total"):
            self._gemm_check()
            eg.check_backward()
        if stage in ("gemm1", "activation", "gemm2") and eg.fuses_act:
            raise Unsupported(f"bench.gemm={eg.name}: SwiGLU's backward is fused into gemm2's backward GEMM (quack's "
                              "gemm_dgated) and its forward into gemm1: the expert FFN's backward is timed as a "
                              "whole in the experts and total rows")
        refs = self._ffn_refs() if stage != "total" else None
        up = refs[0][1] if refs else None  # the job-dtype reference's gradients feed the stages inside the FFN

        def rows(t: torch.Tensor) -> torch.Tensor:  # reference rows [0, n) as a [R, *] upstream gradient
            return torch.cat([t.to(dt), t.new_zeros(R - n, t.shape[1], dtype=dt)]) if R > n else t.to(dt)

        if stage == "gemm1":
            d_h = rows(up["d_h"])
            return self._chained(lambda: eg.gemm1_train(ref.packed, meta, w, b),
                                 lambda ctx: eg.gemm1_backward(ctx, d_h, meta, w, g),
                                 lambda got: self._compare_rows(got, ref.h, "gemm1 output"),
                                 lambda got: self._check_ffn_grads({"d_packed": got[0], "d_w1": got[1]}),
                                 self._reset(b.h, rows_of=(R, 2 * I)),
                                 self._reset_grads((R, H), tuple(w.w1.shape)))
        if stage == "activation":
            d_a = rows(up["d_a"])
            return self._chained(lambda: eg.activation_train(ref.h, b), lambda ctx: eg.activation_backward(ctx, d_a),
                                 lambda got: self._compare_rows(got, ref.a, "activation"),
                                 lambda got: self._check_ffn_grads({"d_h": got}), self._reset(b.a),
                                 self._reset_grads((R, 2 * I)))
        if stage == "gemm2":
            d_y = self._upstream("d_y")
            return self._chained(lambda: eg.gemm2_train(ref.a, meta, w, b),
                                 lambda ctx: eg.gemm2_backward(ctx, d_y, meta, w, g),
                                 lambda got: self._compare_rows(got, ref.y, "gemm2 output"),
                                 lambda got: self._check_ffn_grads({"d_a": got[0], "d_w2": got[1]}),
                                 self._reset(b.y, rows_of=(R, H)), self._reset_grads((R, I), tuple(w.w2.shape)))
        if stage == "experts":
            d_y = self._upstream("d_y")
            return self._chained(lambda: eg.ffn_train(ref.packed, meta, w, b),
                                 lambda ctx: eg.ffn_backward(ctx, d_y, meta, w, g),
                                 lambda got: self._compare_rows(got, ref.y, "expert FFN output", after_act=True),
                                 lambda got: self._check_ffn_grads({"d_packed": got[0], "d_w1": got[1],
                                                                    "d_w2": got[2]}),
                                 self._reset(*b.all(), rows_of=(R, H)),
                                 self._reset_grads((R, H), (R, 2 * I), tuple(w.w1.shape), tuple(w.w2.shape)))
        if stage == "total":
            return self._total_train_call()
        raise ValueError(stage)

    def _total_train_call(self) -> Call:
        """The layer's forward (fwdbwd) and its backward from the seeded d_out, through the job's
        routing implementations and the GEMM path."""
        job, ref, eg, w, b, g = self.job, self.ref, self.eg, self.w, self.bufs, self.grads
        if job.capacity.renormalize_after_drop and not job.capacity.dropless:
            raise Unsupported("capacity.renormalize_after_drop=true: the layer's backward through the renormalised "
                              "kept weights is not built")
        ims = {s: self.impls[job.stage_impls[s]] for s in ("route", "metadata", "pack", "combine")}
        for im in ims.values():
            im.check_device(job.device)
        k, E, T, H, R = job.topk, job.experts, job.tokens, job.hidden, ref.meta.num_rows
        d_out = self._upstream("d_out")

        def forward():
            logits = self.gate(ref.prior, out=b.logits)
            ids, wts = ims["route"].route(logits, k, job.router, ref.bias)
            meta = ims["metadata"].metadata(ids, wts, E, job.capacity, self.inputs.num_rows)
            y, ctx = eg.ffn_train(ims["pack"].pack(self.x, meta, out=b.packed), meta, w, b)
            out = ims["combine"].combine(y, meta, out=b.out, weighted=job.weighted)
            return out, (logits, ids, wts, meta, y, ctx)

        def reference_ctx():  # bwd: the reference forward's routing and activations
            return ref.logits, ref.ids, ref.weights, ref.meta, ref.y, eg.ffn_train(ref.packed, ref.meta, w, b)[1]

        def backward(c):
            logits, ids, wts, meta, y, ctx = c
            d_y, d_w = ims["combine"].combine_backward(d_out, y, meta, weighted=job.weighted)
            d_rows, d_w1, d_w2 = eg.ffn_backward(ctx, d_y, meta, w, g)
            d_x = ims["pack"].pack_backward(d_rows, meta)
            if not job.weighted:  # an unweighted combine does not read the gate weights: no router gradient
                return d_x, g.d_wg.zero_(), d_w1, d_w2
            # the kept weights' gradient passes the metadata straight through (a dropped slot's d_w is 0)
            d_logits = ims["route"].route_backward(logits, ids, wts, d_w, job.router, ref.bias)
            return torch.addmm(d_x, d_logits, w.wg.T), torch.mm(self.x.T, d_logits, out=g.d_wg), d_w1, d_w2

        chain_route = ims["route"] if self.direction == "fwdbwd" else None

        def check_bwd(got):
            ids, meta = ref.ids, ref.meta
            if chain_route is not None and not chain_route.exact_ties_for(job.router):
                ids, wts = chain_route.route(ref.logits, k, job.router, ref.bias)
                ids = ids.contiguous()
                meta = routing.build_metadata(ids, wts.contiguous(), E, job.capacity, self.inputs.num_rows)
            for label, (_, *want) in self._layer_refs(ids, meta):
                for name, gv, wv in zip(("d_x", "d_Wg", "d_W1", "d_W2"), got, want):
                    self._assert_grad(gv, wv, f"{name} vs {label}")

        return self._chained(forward, backward, lambda got: self._check_layer(got, chain_route), check_bwd,
                             self._reset(*b.all(), rows_of=(R, H)),
                             self._reset_grads((T, H), (R, H), (R, 2 * self.s.intermediate), tuple(w.w1.shape),
                                               tuple(w.w2.shape)),
                             reference_ctx)

    def _dense_train_call(self) -> Call:
        """The dense GEMMs' backward: d_x = d_h W1[0], d_W1 = d_h^T x; d_a = d_y W2[0], d_W2 = d_y^T a."""
        job, ref, w = self.job, self.ref, self.w
        n, H, I, dt, dev = ref.rows, job.hidden, self.s.intermediate, job.dtype, job.device
        x_in, a_in = ref.packed[:n], ref.a[:n]
        d_h, d_y = self._upstream("dense_d_h"), self._upstream("dense_d_y")
        outs = [torch.empty(shape, dtype=dt, device=dev) for shape in ((n, H), (2 * I, H), (n, I), (H, I))]

        def bwd():
            o = outs
            return (torch.mm(d_h, w.w1[0], out=o[0]), torch.mm(d_h.T, x_in, out=o[1]),
                    torch.mm(d_y, w.w2[0], out=o[2]), torch.mm(d_y.T, a_in, out=o[3]))

        def check(got):
            m = min(n, DENSE_CHECK_ROWS)
            assert_close(got[0][:m], d_h[:m].float() @ w.w1[0].float(), "dense d_x rows", dt)
            assert_close(got[2][:m], d_y[:m].float() @ w.w2[0].float(), "dense d_a rows", dt)
            # the weight gradients sum over the n rows: a sample of their columns
            self._assert_grad(got[1][:, :m], d_h.float().T @ x_in[:, :m].float(), "dense d_W1 columns")
            self._assert_grad(got[3][:, :m], d_y.float().T @ a_in[:, :m].float(), "dense d_W2 columns")

        bwd_call = Call(bwd, check, lambda: [poison(t) for t in outs])
        return self._directed(self._forward_call("dense_gemm") if self.direction == "fwdbwd" else None, bwd_call)
