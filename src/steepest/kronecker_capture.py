r"""What K-FAC measures: the layers' inputs and output gradients, and the factor statistics.

For each Kronecker-shaped layer (``Linear``, ``Conv1d``, ``Conv2d``) a forward with module hooks
(the point's own when it recorded the layers, :func:`steepest.point.forward`'s ``record``; else
one extra) and a backward (:class:`_Capture`) give the input rows :math:`\bar a` (a bias column
when the layer has a trainable bias; unfolded patches for convolutions, KFC) and the gradients
:math:`g_k` of its outputs along the columns of a square root S of the base's output-space
matrix (:func:`_sqrt_cotangents`); :func:`factor_statistics` turns them into
:math:`A = E[\bar a\bar a^T]` and :math:`G = E_n[\sum_k g_k g_k^T]` (expand or reduce over
shared dimensions), and every other parameter gets the exact diagonal of the base.
:class:`_GradientRecorder` keeps the rows of the user's own backward (the Preconditioner's fast
path). The operators built from these statistics live in :mod:`steepest.kronecker`; this module
knows nothing of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import BatchAxisError, ConfigurationError
from .metrics import GGN, Fisher, GaussNewton, GradientCovariance, Metric

try:  # whether a torch.func transform (vmap, grad) is running: the recorder stays out of it
    from torch._C._functorch import peek_interpreter_stack
except ImportError:  # pragma: no cover - older torch

    def peek_interpreter_stack():
        return None


_KRON_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


# ---------------------------------------------------------------------------------- capture
@dataclass
class _Layer:
    """A Kronecker-shaped layer: its weight (and bias) as indices into the flat parameter
    list, and what one forward/backward captured for it."""

    module: nn.Module
    wi: int
    bi: int | None
    groups: int
    out_g: int  # output rows per group
    calls: list  # [(input a, output s)] of the forward, one per call of the module
    # per call, the axis of the input that holds the samples (None: none found)
    axes: list = field(default_factory=list)


def _sqrt_cotangents(metric: Metric, point, z: Tensor, y) -> tuple[Tensor, Tensor | None]:
    """S (N, C, K) with the base's output-space matrix = S diag(w) S^T, and the signs w (N, K)
    (None: all +1)."""
    loss = point.loss
    zd = z.detach()
    n = zd.shape[0]
    if isinstance(metric, GaussNewton):
        c = zd.reshape(n, -1).shape[1]
        return torch.eye(c, dtype=zd.dtype, device=zd.device).expand(n, c, c), None
    if isinstance(metric, Fisher):
        metric.check(point)
        if metric.mc_samples is None:
            return loss.fisher_sqrt(zd), None
        k = metric.mc_samples
        zk = zd.unsqueeze(0).expand(k, *zd.shape).reshape(k * n, *zd.shape[1:])
        ys = loss.sample(zk, point.generator)
        return _output_grads(loss, zk, ys).reshape(k, n, -1).permute(1, 2, 0) / k**0.5, None
    if isinstance(metric, GGN):
        if getattr(loss, "hessian_is_fisher", False):
            return loss.fisher_sqrt(zd), None
        mu, q = torch.linalg.eigh(loss.output_matrix(zd, y, "hessian"))
        return q * mu.abs().sqrt().unsqueeze(1), torch.sign(mu)
    if isinstance(metric, GradientCovariance) and not metric.centered:  # EmpiricalFisher too
        metric.check(point)
        return _output_grads(loss, zd, y).reshape(n, -1, 1), None
    raise ConfigurationError(
        f"KFAC/EKFAC: base must be Fisher(mc_samples=k), Fisher(), GGN(), EmpiricalFisher() or "
        f"GaussNewton(), got {metric!r}; for other metrics use Diagonal(base) or the exact metric."
    )


def _output_grads(loss, z: Tensor, y: Tensor) -> Tensor:
    zz = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (gz,) = torch.autograd.grad(loss.value(zz, y).sum(), zz)
    return gz


def _conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Unfolded input patches of a Conv1d/Conv2d: (N, C_in * prod(kernel), L)."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dil, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
        pad = (0, module.padding[0]) if not isinstance(module.padding, str) else None
    else:
        kernel, dil, stride = module.kernel_size, module.dilation, module.stride
        pad = module.padding if not isinstance(module.padding, str) else None
    if pad is None or module.padding_mode != "zeros":  # 'same'/'valid' or reflect/replicate
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        rp = module._reversed_padding_repeated_twice
        if isinstance(module, nn.Conv1d):
            rp = (*rp, 0, 0)
        x = F.pad(x, rp, mode=mode)
        pad = (0, 0)
    return F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)


class _Capture:
    """One extra forward and backward pass with module hooks: for each Kronecker layer the
    inputs and the gradients of its outputs along the columns of S; for the other parameters
    the exact diagonal of the base."""

    def __init__(
        self,
        metric: Metric,
        point,
        sequence: str,
        samples: Tensor | None = None,
        per_sample: bool = False,
    ) -> None:
        self.point, self.sequence, self.samples = point, sequence, samples
        self.per_sample = per_sample
        params = point.space.params
        self.params = params
        self.sizes = [p.numel() for p in params]
        index = {id(p): i for i, p in enumerate(params)}
        self.layers: list[_Layer] = []
        model = point.space.model
        closure = model is None
        by_module: dict[int, _Layer] = {}

        def consider(m: nn.Module) -> _Layer | None:
            w = m._parameters.get("weight")
            if w is None or id(w) not in index or id(w) in shared:
                return None
            b = m._parameters.get("bias")
            bi = index.get(id(b)) if b is not None else None
            if b is not None and id(b) in shared:
                bi = None
            groups = getattr(m, "groups", 1)
            layer = _Layer(m, index[id(w)], bi, groups, w.shape[0] // groups, [])
            return layer

        if not closure:
            count: dict[int, int] = {}
            for m in model.modules():
                for p in m._parameters.values():
                    if p is not None:
                        count[id(p)] = count.get(id(p), 0) + 1
            shared = {k for k, v in count.items() if v > 1}
            for m in model.modules():
                if isinstance(m, _KRON_TYPES):
                    layer = consider(m)
                    if layer is not None:
                        by_module[id(m)] = layer
        else:
            shared = set()
        self.by_module = by_module
        self.closure = closure
        self.names = {} if closure else {id(m): nm for nm, m in model.named_modules()}
        self.consider = consider

    # ------------------------------------------------------------------ the forward
    def _hook(self, module: nn.Module, inputs, output):
        layer = self.by_module.get(id(module))
        if layer is None:
            if not (self.closure and isinstance(module, _KRON_TYPES)):
                return None
            layer = self.consider(module)
            if layer is None:
                return None
            self.by_module[id(module)] = layer
        if not isinstance(output, Tensor) or not inputs or not isinstance(inputs[0], Tensor):
            return None
        s = output if output.requires_grad else output.detach().requires_grad_(True)
        layer.calls.append((inputs[0].detach(), s))
        return s.clone()  # later in-place ops (ReLU(inplace=True)) must not touch s

    def _kept(self, tensors: list[Tensor]) -> Tensor:
        """Drop the layers whose forward never ran (MultiheadAttention's out_proj is applied
        functionally: a diagonal block like any other parameter); the other parameters'
        tensors of the forward (``tensors``, per parameter) are the leaves of their diagonal.
        Returns the point's outputs (for the recorded forward)."""
        self.by_module = {k: v for k, v in self.by_module.items() if v.calls}
        kron = {layer.wi for layer in self.by_module.values()}
        kron |= {layer.bi for layer in self.by_module.values() if layer.bi is not None}
        self.leaves = {i: t for i, t in enumerate(tensors) if i not in kron}
        return self.point.z

    def run(self) -> tuple[Tensor, object]:
        """Evaluate the model with hooks; returns (z, y)."""
        point = self.point
        recorded = getattr(point, "calls", None)
        # the point's recording serves only if it covers every Kronecker layer (a forward
        # recording fewer types would turn the others into diagonal blocks): else a forward
        if recorded is not None and not all(m.module in recorded for m in self.by_module.values()):
            recorded = None
        if not self.closure and self.samples is None and recorded is not None:
            # the point's own forward recorded the layers (Optimizer, K-FAC's record_layers):
            # its graph, outputs and per-parameter views serve, no second forward
            for layer in self.by_module.values():
                layer.calls = list(recorded.get(layer.module, ()))
            return self._kept(point.pieces), point.y
        if not self.closure:
            space = point.space
            pieces = space.unflatten(point.theta.detach())
            tensors = [t.detach().clone().requires_grad_(True) for t in pieces]
            handles = [
                layer.module.register_forward_hook(self._hook) for layer in self.by_module.values()
            ]
            try:
                with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                    xs = point.inputs if isinstance(point.inputs, tuple) else (point.inputs,)
                    if self.samples is not None:  # the statistics of a sub-batch
                        xs = tuple(t[self.samples] for t in xs)
                    z = torch.func.functional_call(space.model, dict(zip(space.names, tensors)), xs)
            finally:
                for h in handles:
                    h.remove()
            self._kept(tensors)
            return z, point.y if self.samples is None else point.y[self.samples]
        handle = nn.modules.module.register_module_forward_hook(self._hook)
        try:
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                result = point.closure()
        finally:
            handle.remove()
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise ConfigurationError(
                "KFAC/EKFAC with TorchOptimizer need a closure returning (outputs, targets)."
            )
        # a weight shared by several modules is no Kronecker block: a diagonal one instead
        seen: dict[int, int] = {}
        for layer in self.by_module.values():
            seen[layer.wi] = seen.get(layer.wi, 0) + 1
        self.by_module = {k: v for k, v in self.by_module.items() if seen[v.wi] == 1}
        kron = {layer.wi for layer in self.by_module.values()}
        kron |= {layer.bi for layer in self.by_module.values() if layer.bi is not None}
        self.leaves = {i: p for i, p in enumerate(self.params) if i not in kron}
        return result[0], result[1]

    # ------------------------------------------------------------------ the backward
    def backward(self, metric: Metric) -> None:
        z, y = self.run()
        self.z = z
        n = z.shape[0]
        s, w = _sqrt_cotangents(metric, self.point, z, y)
        k = s.shape[-1]
        self.n, self.k, self.w = n, k, w
        # each call's batch axis; the per-sample rows matter for K-FAC-reduce, EKFAC's
        # scalings and a signed GGN's rows (expand's sums over rows ignore their order)
        self._batch_axes(z, n, self.per_sample or self.sequence == "reduce" or w is not None)
        cots = s.permute(2, 0, 1).reshape(k, *z.shape)  # (K, *z.shape)
        outs = [c[1] for layer in self.by_module.values() for c in layer.calls]
        self.out_grads: list[Tensor] = []
        if outs:
            grads = _batched_grad(z, outs, cots)
            self.out_grads = [
                g if g is not None else torch.zeros(k, *o.shape, dtype=o.dtype, device=o.device)
                for g, o in zip(grads, outs)
            ]
        # per-sample gradients of the other parameters for each column: rows (i, k)
        self.other_diag: dict[int, Tensor] = {}
        others = [i for i in sorted(self.leaves) if self.leaves[i].requires_grad]
        for i in self.leaves:
            if i not in others:
                self.other_diag[i] = torch.zeros(self.sizes[i], dtype=z.dtype, device=z.device)
        if others:
            eye = torch.eye(n, dtype=z.dtype, device=z.device)
            rows = torch.einsum("ni,knc->kinc", eye, cots.reshape(k, n, -1))
            rows = rows.reshape(k * n, *z.shape)
            weight = None if w is None else w.T.reshape(-1)  # (K*N,) matching rows
            grads = _batched_grad(z, [self.leaves[i] for i in others], rows)
            for i, g in zip(others, grads):
                if g is None:
                    self.other_diag[i] = torch.zeros(self.sizes[i], dtype=z.dtype, device=z.device)
                    continue
                sq = g.reshape(k * n, -1).pow(2)
                if weight is not None:
                    sq = sq * weight[:, None]
                self.other_diag[i] = sq.sum(0) / n

    def _batch_axes(self, z: Tensor, n: int, need: bool) -> None:
        """Find where each call's input holds the N samples of the loss (sets ``layer.axes``
        to (leading shape, batch axis) per call, None where none is found): a Linear's input
        (..., d) may hold them on any leading axis (a sequence-first (T, N, d) as torch's
        ``TransformerEncoderLayer(batch_first=False)`` feeds its Linear layers), a
        convolution's on axis 0, and an axis of size m N may hold them merged with another
        dimension (a flattened (N T, d), batch-major (N, m) or inner-major (m, N)).

        The one axis of size N when there is exactly one. Otherwise (several axes of size N,
        T = N; or merged axes) the candidate along which the gradient of the second sample's
        outputs (a random cotangent on z[1], one backward for all such calls) vanishes except
        at index 1 (the second sample, not the first: a model reading position 0, a class
        token, leaves the first sample's gradient at [0, 0] only, on either axis); axis 0
        where that tells nothing (a model that couples its samples) and axis 0 has size N.
        Only where ``need`` (the per-sample rows matter: K-FAC-reduce, EKFAC's scalings, a
        signed GGN's rows); otherwise the order of the rows is immaterial (expand's sums) and
        no backward is spent. One sample (N = 1): all rows are its own. Where nothing is
        found and ``need``, raise :class:`~steepest.errors.BatchAxisError` naming the layer;
        nothing has changed yet."""
        need = need and n > 1
        pending = []
        for layer in self.by_module.values():
            layer.axes = []
            for j, (a, _) in enumerate(layer.calls):
                lead = tuple(a.shape[:-1] if isinstance(layer.module, nn.Linear) else a.shape[:1])
                axes = [(lead, c) for c, size in enumerate(lead) if size == n]
                if not need:  # any order of the rows serves: no probe
                    layer.axes.append(axes[0] if axes else None)
                    continue
                layer.axes.append(axes[0] if len(axes) == 1 else None)
                if len(axes) == 1:
                    continue
                merged = []
                for c, size in enumerate(lead):
                    if size > n and size % n == 0:
                        m = size // n
                        merged.append((lead[:c] + (n, m) + lead[c + 1 :], c))
                        merged.append((lead[:c] + (m, n) + lead[c + 1 :], c + 1))
                if axes or merged:
                    pending.append((layer, j, axes + merged, len(lead)))
        if not need:
            return
        if pending:
            gen = torch.Generator(device=z.device).manual_seed(0)
            u = torch.zeros_like(z)
            u[1] = torch.randn(z.shape[1:], generator=gen, dtype=z.dtype, device=z.device)
            outs = [layer.calls[j][1] for layer, j, _, _ in pending]
            grads = torch.autograd.grad(z, outs, u, retain_graph=True, allow_unused=True)
            for (layer, j, cand, nlead), gr in zip(pending, grads):
                ok = []
                if gr is not None:
                    rest = gr.shape[nlead:]  # the output's dimensions after the leading ones
                    ok = [
                        (shape, c)
                        for shape, c in cand
                        if _only_at_index_one(gr.reshape(*shape, *rest), c)
                    ]
                first = [(shape, c) for shape, c in cand if c == 0 and shape[0] == n]
                layer.axes[j] = ok[0] if len(ok) == 1 else (first[0] if first else None)
        for layer in self.by_module.values():
            for (a, _), ax in zip(layer.calls, layer.axes):
                if ax is not None:
                    continue
                m = layer.module
                name = self.names.get(id(m), "")
                raise BatchAxisError(
                    f"KFAC/EKFAC: cannot tell where the input of layer {name!r} "
                    f"({type(m).__name__}) holds the samples: its shape is {tuple(a.shape)} and "
                    f"the loss has N = {n} samples, and no axis (of size N, or of a multiple of "
                    "N that merges the batch with another dimension) is the one the gradient "
                    "of a sample's outputs is confined to. K-FAC-reduce, EKFAC's scalings and a "
                    "signed GGN need each sample's rows. Make one axis of the layer's input "
                    "the batch, preferably axis 0 (e.g. nn.TransformerEncoderLayer(..., "
                    "batch_first=True)), or use KFAC(sequence='expand') with an unsigned base, "
                    "which needs no per-sample rows."
                )

    def rows(self, layer: _Layer, grads: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-group input rows a (groups, R, d) and output-gradient rows g (K, groups, R, o)
        of all calls of a layer, R = N * positions (expand) or N (reduce), grouped by sample
        (each call's batch axis, :meth:`_batch_axes`, moved first). A call without batch axis
        (only where the order of the rows does not matter) makes the rows ungrouped."""
        a_all, g_all, grouped = [], [], True
        n_all = self.n
        for (a, _), gs, ax in zip(layer.calls, grads, layer.axes):
            if isinstance(layer.module, nn.Linear):
                d, o, k = a.shape[-1], gs.shape[-1], gs.shape[0]
                if ax is None:
                    grouped = False
                    a3, g3 = a.reshape(1, -1, d), gs.reshape(k, 1, -1, o)
                else:
                    shape, b = ax
                    a3 = a.reshape(*shape, d).movedim(b, 0).reshape(n_all, -1, d)  # (N, T, d)
                    g3 = gs.reshape(k, *shape, o).movedim(b + 1, 1).reshape(k, n_all, -1, o)
                if self.sequence == "reduce":
                    a3 = a3.mean(1, keepdim=True)
                    g3 = g3.sum(2, keepdim=True)
                if layer.bi is not None:
                    a3 = torch.cat([a3, torch.ones_like(a3[..., :1])], -1)
                a_all.append(a3.unsqueeze(0))  # (1, N, T, d)
                g_all.append(g3.unsqueeze(1))  # (K, 1, N, T, o)
            else:  # KFC: unfolded patches, expand over the L output positions
                pat = _conv_patches(layer.module, a)  # (N, Cin*kk, L)
                n, _, length = pat.shape
                grp = layer.groups
                pat = pat.reshape(n, grp, -1, length).permute(1, 0, 3, 2)  # (grp, N, L, d)
                if layer.bi is not None:
                    pat = torch.cat([pat, torch.ones_like(pat[..., :1])], -1)
                k = gs.shape[0]
                go = gs.reshape(k, n, grp, layer.out_g, -1)  # (K, N, grp, o, L)
                go = go.permute(0, 2, 1, 4, 3)  # (K, grp, N, L, o)
                if ax is None:
                    grouped = False
                elif len(ax[0]) > 1:  # a merged batch (N m or m N): each sample's rows
                    shape, b = ax
                    dp, o = pat.shape[-1], go.shape[-1]
                    pat = pat.reshape(grp, *shape, length, dp).movedim(1 + b, 1)
                    pat = pat.reshape(grp, n_all, -1, dp)
                    go = go.reshape(k, grp, *shape, length, o).movedim(2 + b, 2)
                    go = go.reshape(k, grp, n_all, -1, o)
                a_all.append(pat)  # (grp, N, L, d)
                g_all.append(go)  # (K, grp, N, L, o)
        # rows grouped by sample (a module called several times: its calls' positions side by
        # side within each sample), as _scalings and _row_signs read them
        if grouped:
            return torch.cat(a_all, 2).flatten(1, 2), torch.cat(g_all, 3).flatten(2, 3)
        # a call without batch axis: no per-sample grouping exists
        a = torch.cat([t.flatten(1, 2) for t in a_all], 1)
        return a, torch.cat([t.flatten(2, 3) for t in g_all], 2)


def _only_at_index_one(gr: Tensor, c: int) -> bool:
    """Whether ``gr`` vanishes along axis c except at index 1, where it does not."""
    rest = torch.cat([gr.narrow(c, 0, 1), gr.narrow(c, 2, gr.shape[c] - 2)], c)
    return bool((rest == 0).all()) and bool((gr.select(c, 1) != 0).any())


def _batched_grad(out: Tensor, wrt: list[Tensor], cots: Tensor) -> list[Tensor | None]:
    """Rows ``d<out, cots[r]>/d wrt`` stacked along a first axis (vmapped over r, with a loop
    fallback for models vmap cannot batch)."""
    try:
        return list(
            torch.autograd.grad(
                out, wrt, cots, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        )
    except RuntimeError:
        per = [torch.autograd.grad(out, wrt, c, retain_graph=True, allow_unused=True) for c in cots]
        res = []
        for j, t in enumerate(wrt):
            col = [p[j] for p in per]
            res.append(
                None
                if all(c is None for c in col)
                else torch.stack([torch.zeros_like(t) if c is None else c for c in col])
            )
        return res


def factor_statistics(
    base: Metric,
    point,
    sequence: str = "expand",
    samples: Tensor | None = None,
    per_sample: bool = False,
) -> dict:
    r"""The Kronecker factors of one batch: one extra forward and backward pass with hooks
    (:class:`_Capture`), then per layer :math:`A = E[\bar a\bar a^T]` (grp, d, d) and
    :math:`G = E_n[\sum_k w_k g_k g_k^T]` (grp, o, o), the exact diagonal of ``base`` for every
    other parameter, means over every rank's samples under torch.distributed. ``samples``
    (indices into the point's batch) takes the statistics, forward and backward on that
    sub-batch only (``KFAC(stats_batch=k)``; a model point, not a closure's). ``per_sample``:
    the rows must be grouped by sample (EKFAC's scalings); a layer whose input has no batch
    axis is then refused (:class:`~steepest.errors.BatchAxisError`), as with ``"reduce"``.

    Returns ``{"blocks": {(wi, bi): (A, G)}, "others": {i: diag}, "raw": {(wi, bi): (a, g)},
    "n": N, "w": signs or None}`` (``raw``: the rows, for EKFAC's scalings).

    >>> factor_statistics(GGN(), point)["blocks"]
    """
    cap = _Capture(base, point, sequence, samples, per_sample)
    cap.backward(base)
    blocks, grads_at = {}, 0
    raw = {}
    w = cap.w
    for layer in cap.by_module.values():
        ncalls = len(layer.calls)
        grads = cap.out_grads[grads_at : grads_at + ncalls]
        grads_at += ncalls
        if not layer.calls:
            continue
        a, g = cap.rows(layer, grads)  # (grp, R, d), (K, grp, R, o)
        A = (a.transpose(1, 2) @ a).div_(a.shape[1])  # new tensors: divided in place
        gw = g if w is None else g * _row_signs(w, g, cap.n)
        G = torch.einsum("kgro,kgrp->gop", gw, g).div_(cap.n)
        key = (layer.wi, layer.bi)
        blocks[key] = (A, G)
        raw[key] = (a, g)
    others = {i: d for i, d in cap.other_diag.items()}
    # parameters in no layer and not reached by the graph (unused) keep a zero diagonal
    in_blocks = {i for key in blocks for i in key if i is not None}
    for i in range(len(cap.sizes)):
        if i not in in_blocks and i not in others:
            others[i] = torch.zeros(cap.sizes[i], dtype=point.grad.dtype, device=point.grad.device)
    # under torch.distributed: means over every rank's samples (one all_reduce)
    keys, okeys = list(blocks), sorted(others)
    flat = [t for key in keys for t in blocks[key]] + [others[i] for i in okeys]
    flat = point.mean_over_ranks(flat)
    blocks = {key: (flat[2 * j], flat[2 * j + 1]) for j, key in enumerate(keys)}
    others = {i: flat[2 * len(keys) + j] for j, i in enumerate(okeys)}
    return {"blocks": blocks, "others": others, "raw": raw, "n": cap.n, "w": w}


def _row_signs(w: Tensor, g: Tensor, n: int) -> Tensor:
    """The signs w (N, K) broadcast onto rows g (K, grp, R, o) with R = N * positions."""
    k, _, r, _ = g.shape
    per = w.T.reshape(k, 1, n, 1, 1).expand(k, 1, n, r // n, 1)
    return per.reshape(k, 1, r, 1)


class _GradientRecorder:
    r"""Forward hooks on a model's ``Linear`` layers that keep, for the user's own forward and
    backward (grad mode on, outputs requiring grad), each call's input rows a and the gradient
    of the output, g = dL/ds, so that the gradient of the layer's [W b] is
    :math:`\sum_{rows} g^T \bar a` and K-FAC can precondition it as
    :math:`(G^{-1} g^T)(\bar a A^{-1})`. One iteration is kept: a forward after a completed
    backward starts afresh. ``enabled = False`` while the library runs its own passes."""

    def __init__(self, model: nn.Module) -> None:
        self.enabled = True
        self.records: dict[nn.Module, list[list]] = {}
        self.handles = [
            m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.Linear)
        ]

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if not (self.enabled and torch.is_grad_enabled()) or peek_interpreter_stack() is not None:
            return
        if not (isinstance(output, Tensor) and output.requires_grad and inputs):
            return
        if not isinstance(inputs[0], Tensor):
            return
        calls = self.records.setdefault(module, [])
        if calls and calls[-1][1] is not None:  # the previous iteration's backward ran
            calls.clear()
        entry = [inputs[0].detach(), None]
        calls.append(entry)

        def keep(grad: Tensor) -> None:
            entry[1] = grad.detach() if entry[1] is None else entry[1] + grad.detach()

        output.register_hook(keep)

    def rows(self, space) -> dict:
        """{(weight index, bias index): (a (R, d), g (R, o))} for every recorded layer whose
        calls all received their gradient (a the inputs alone: a layer with bias has
        :math:`\\bar a = [a\\ 1]`, whose column of ones the products add); the records are
        consumed."""
        index = {id(p): i for i, p in enumerate(space.params)}
        out = {}
        for module, calls in self.records.items():
            w, b = module.weight, module.bias
            if not calls or any(c[1] is None for c in calls) or id(w) not in index:
                continue
            a_s = [c[0].reshape(-1, c[0].shape[-1]) for c in calls]
            g_s = [c[1].reshape(-1, c[1].shape[-1]) for c in calls]
            # one call (the usual case): the recorded tensors themselves, no copy
            a = a_s[0] if len(a_s) == 1 else torch.cat(a_s)
            g = g_s[0] if len(g_s) == 1 else torch.cat(g_s)
            bi = index.get(id(b)) if b is not None else None
            out[(index[id(w)], bi)] = (a, g)
        self.records = {}
        return out

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles, self.records = [], {}
