"""GPTQ: one-shot weight quantization with second-order error compensation, and round-to-nearest (RTN) beside it.

Frantar, Ashkboos, Hoefler, Alistarh. "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023 (arXiv:2210.17323). Names follow the paper and its reference code:

- ``W (rows, columns)``: a linear layer's weight (rows = output features, columns = input features).
- ``H = 2 X Xᵀ / n`` ``(columns, columns)``: the Hessian of the layer's squared output error ``‖WX - QX‖²`` with
  respect to one row of W, from ``n`` calibration inputs ``X``. ``add_batch`` accumulates it.
- ``damp``: ``percdamp × mean(diag H)`` added to the diagonal so H is safely invertible.
- ``Hinv``: the upper Cholesky factor of ``H⁻¹``. Row ``j`` of it gives, for quantizing column ``j``, both the
  error scale ``d = Hinv[j, j]`` and how the error spreads onto the later columns ``Hinv[j, j:]`` (the OBS update
  restricted to the not-yet-quantized columns, in a fixed order).
- ``blocksize``: lazy batch updates. Columns are processed in blocks; inside a block updates are immediate, the
  rest of W receives one matrix product per block, ``W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]`` (memory bound → compute
  bound). Same result as the column-by-column loop (``gptq_quantize_reference``), up to rounding.
- ``groupsize``: one (scale, zero) per ``groupsize`` consecutive columns of a row, computed when the quantizer
  reaches the group, from the weights *as updated so far*.
- ``actorder``: quantize columns in order of decreasing ``diag(H)`` (the inputs with the most energy first).
  With groups, act-order uses *static* groups (scales from the original weights in storage order), so a
  column's group remains the contiguous range it sits in and the storage format stays that of RTN.

The quantizer is asymmetric min-max on ``[0, 2^bits - 1]`` (``labkit.quant.zeropoint_params``), the same for RTN
and GPTQ, so that the only difference between the two is the error compensation.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from labkit import quant
from labkit.quant import QuantLinear, dequantize, quantize


# ---------------------------------------------------------------------------------------------- quantizer
def minmax_params(w: torch.Tensor, bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of ``w (rows, k)`` on the grid ``[0, 2^bits-1]``; both ``(rows, 1)``.

    Asymmetric: the zeropoint scheme of ``labkit.quant``. Symmetric: range ±absmax, zero in the middle.
    """
    if sym:
        maxq = 2 ** bits - 1
        xmax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        scale = 2 * xmax / maxq
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    scale, zero = quant.zeropoint_params(w, bits, "channel")  # (rows, 1) each
    return scale, zero


def rtn_quantize(W: torch.Tensor, bits: int, groupsize: int | None = 128, sym: bool = False):
    """Round-to-nearest with per-row groups. ``W (rows, columns)`` -> ``(q (rows, columns), scale, zero (rows, G))``."""
    rows, columns = W.shape
    g = groupsize or columns
    _check_groups(g)
    W = W.float()
    scales, zeros, qs = [], [], []
    for c in range(0, columns, g):
        scale, zero = minmax_params(W[:, c:c + g], bits, sym)
        qs.append(quantize(W[:, c:c + g], scale, zero, 2 ** bits - 1))
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(qs, 1), torch.cat(scales, 1), torch.cat(zeros, 1)


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, groupsize: int) -> torch.Tensor:
    """``q (rows, columns)`` with ``scale, zero (rows, G)`` -> real weights ``(rows, columns)``."""
    cols = q.shape[1]
    return dequantize(q, quant.expand_groups(scale, cols, groupsize), quant.expand_groups(zero, cols, groupsize))


def _check_groups(g: int, blocksize: int | None = None) -> None:
    """Groups are ``[0, g), [g, 2g), ...``; the last may be shorter (576 input features = 4 x 128 + 64)."""
    if g < 1:
        raise ValueError(f"groupsize must be positive, got {g}")
    if blocksize and not (blocksize % g == 0 or g % blocksize == 0):
        raise ValueError(f"blocksize {blocksize} and groupsize {g} must divide one another (e.g. 128 and 128), "
                         "so each group's scale is taken from fully updated weights")


# ---------------------------------------------------------------------------------------------- GPTQ
def prepare_hessian(H: torch.Tensor, W: torch.Tensor, percdamp: float):
    """Dead inputs (zero diagonal) get H=1 and W=0; add ``damp``; return ``(H, W, damp)`` (new tensors)."""
    H, W = H.clone(), W.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H, W, damp


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹``: ``Hinv`` with ``Hinvᵀ Hinv = H⁻¹``."""
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, groupsize: int | None = 128, blocksize: int = 128,
                  percdamp: float = 0.01, actorder: bool = False, sym: bool = False):
    """GPTQ for one layer (Algorithm 1 of the paper, with groups and act-order).

    W: ``(rows, columns)``; H: ``(columns, columns)``; computed in fp32 (fp64 if W is fp64). Returns ``(q, scale, zero, loss)``: integer codes
    ``q (rows, columns)`` in storage (original column) order, ``scale, zero (rows, columns / groupsize)``,
    and ``loss`` = the sum over columns of ``(w - q)² / d²`` / 2, GPTQ's estimate of the output error it added.
    """
    if W.device.type == "cpu" and torch.get_num_threads() > 1:
        # the column loop is thousands of small ops: one thread is as fast and does not stall on a busy machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return gptq_quantize(W, H, bits, groupsize, blocksize, percdamp, actorder, sym)
        finally:
            torch.set_num_threads(threads)
    W = W.to(torch.promote_types(W.dtype, torch.float32))  # fp32 (or fp64 when given)
    H = H.to(W)
    rows, columns = W.shape
    g = groupsize or columns
    _check_groups(g, blocksize)
    maxq = 2 ** bits - 1
    H, W, damp = prepare_hessian(H, W, percdamp)

    if actorder:
        # static groups: scale/zero per contiguous group of the original weights, looked up by original column
        static = [minmax_params(W[:, c:c + g], bits, sym) for c in range(0, columns, g)]
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
        group_of = [c // g for c in perm.tolist()]  # on the host: no device sync per column
    Hinv = inverse_cholesky_upper(H)

    Q = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    scale = zero = None
    scales, zeros = [None] * -(-columns // g), [None] * -(-columns // g)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (rows, count): receives immediate updates
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            w = W1[:, i]
            d = Hinv1[i, i]
            if actorder:
                grp = group_of[col]
                scale, zero = static[grp]
                scales[grp], zeros[grp] = scale, zero
            elif col % g == 0:
                # this group's columns, with every update so far: W1 for this block, W beyond it
                # (up to date at a block start, or when the group lies inside the block)
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                scale, zero = minmax_params(current, bits, sym)
                scales[col // g], zeros[col // g] = scale, zero
            q = quantize(w.unsqueeze(1), scale, zero, maxq)  # (rows, 1) integer codes
            Q1[:, i] = q.flatten()
            wq = dequantize(q, scale, zero).flatten()
            Losses1[:, i] = (w - wq) ** 2 / d ** 2
            err1 = (w - wq) / d  # (rows,)
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))  # spread onto this block's later columns
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])  # lazy batch update of everything after the block

    if actorder:
        Q = Q[:, invperm]
    return Q, torch.cat(scales, 1), torch.cat(zeros, 1), float(Losses.sum())


def gptq_quantize_reference(W: torch.Tensor, H: torch.Tensor, bits: int, groupsize: int | None = 128,
                            blocksize: int = 128, percdamp: float = 0.01, actorder: bool = False, sym: bool = False):
    """The same algorithm without lazy batches: after each column, update *all* later columns at once.

    Same signature and result as ``gptq_quantize`` (``blocksize`` is ignored); slow (one rank-1 update of the whole
    remaining W per column), for tests.
    """
    W = W.to(torch.promote_types(W.dtype, torch.float32))  # fp32 (or fp64 when given)
    H = H.to(W)
    rows, columns = W.shape
    g = groupsize or columns
    _check_groups(g)
    maxq = 2 ** bits - 1
    H, W, _ = prepare_hessian(H, W, percdamp)
    order = torch.arange(columns, device=W.device)
    if actorder:
        static = [minmax_params(W[:, c:c + g], bits, sym) for c in range(0, columns, g)]
        order = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, order], H[order][:, order]
    Hinv = inverse_cholesky_upper(H)
    Q = torch.zeros_like(W)
    loss = 0.0
    scales, zeros = [None] * -(-columns // g), [None] * -(-columns // g)
    for j in range(columns):
        if actorder:
            grp = int(order[j]) // g
            scale, zero = static[grp]
        elif j % g == 0:
            grp = j // g
            scale, zero = minmax_params(W[:, j:j + g], bits, sym)
        scales[grp], zeros[grp] = scale, zero
        q = quantize(W[:, j:j + 1], scale, zero, maxq)
        Q[:, j] = q.flatten()
        err = (W[:, j] - dequantize(q, scale, zero).flatten()) / Hinv[j, j]
        loss += float((err ** 2).sum()) / 2
        W[:, j:] -= err.unsqueeze(1) * Hinv[j, j:].unsqueeze(0)
    if actorder:
        Q = Q[:, torch.argsort(order)]
    return Q, torch.cat(scales, 1), torch.cat(zeros, 1), loss


class GPTQ:
    """Collects ``H`` for one ``nn.Linear`` from its inputs (``add_batch``), then quantizes it (``quantize``)."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros(self.columns, self.columns, device=layer.weight.device, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """inp: ``(..., columns)``, the layer's input. Keeps ``H = 2/n Σ x xᵀ`` as a running mean over n rows."""
        X = inp.reshape(-1, self.columns).float()  # (n, columns)
        n = X.shape[0]
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        X = math.sqrt(2 / self.nsamples) * X
        self.H += X.t() @ X

    def quantize(self, bits: int, groupsize: int | None = 128, **kw):
        return gptq_quantize(self.layer.weight.data, self.H, bits, groupsize, **kw)


def layer_output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    """Mean squared output error ``‖X Wᵀ - X Wqᵀ‖² / n`` of a linear layer on inputs ``X (n, columns)``."""
    diff = X.float() @ (W.float() - Wq.float()).t()  # (n, rows)
    return float((diff ** 2).sum() / X.shape[0])


# ---------------------------------------------------------------------------------------------- whole models
def rtn_quantize_model(model: nn.Module, bits: int, groupsize: int | None = 128, sym: bool = False,
                       skip=("lm_head",)) -> int:
    """Swap every linear layer for a ``QuantLinear`` with round-to-nearest weights; returns how many."""
    def make(name, lin):
        q, scale, zero = rtn_quantize(lin.weight.data, bits, groupsize, sym)
        return QuantLinear(q, scale, zero, bits, lin.bias, groupsize or lin.in_features)

    return quant.replace_linear(model, make, skip)


class _Captured(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family model (``model.model.layers``)."""
    try:
        return model.model.layers
    except AttributeError as exc:
        raise TypeError("gptq_quantize_model expects a Llama-family causal LM (model.model.layers); "
                        f"got {type(model).__name__}") from exc


@torch.no_grad()
def layer_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int = 8):
    """Run the model up to its first decoder layer: the ``(hidden_states, args, kwargs)`` it receives, per batch."""
    layers = decoder_layers(model)
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), args[1:], kwargs))
        raise _Captured

    _forward_until_hook(model, layers[0].register_forward_pre_hook(hook, with_kwargs=True), calib, batch_size)
    return captured


def _forward_until_hook(model: nn.Module, handle, ids: torch.Tensor, batch_size: int) -> None:
    """Run ``model`` on ``ids (n, seq_len)`` batch by batch; the hook behind ``handle`` ends each forward by raising
    ``_Captured`` once it has what it wants. The hook is removed afterwards."""
    dev = next(model.parameters()).device
    try:
        for i in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[i:i + batch_size].to(dev), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()


@torch.no_grad()
def linear_inputs(model: nn.Module, name: str, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The inputs that the linear layer ``name`` receives on token ids ``(n, seq_len)``: ``(n * seq_len, in)`` fp32.

    The forward stops as soon as the layer has its input, so an early layer costs a few decoder layers only.
    """
    layer = model.get_submodule(name)
    got = []

    def hook(module, args):
        got.append(args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu())
        raise _Captured

    _forward_until_hook(model, layer.register_forward_pre_hook(hook), ids, batch_size)
    if not got:
        raise ValueError(f"{name} did not run in the forward pass; is it a layer of this model?")
    return torch.cat(got)


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calib: torch.Tensor, bits: int, groupsize: int | None = 128,
                        blocksize: int = 128, percdamp: float = 0.01, actorder: bool = True, sym: bool = False,
                        batch_size: int = 8, progress: bool = True, skip=("lm_head",)) -> dict:
    """Quantize a Llama-family model layer by layer with GPTQ.

    calib: ``(n_samples, seq_len)`` token ids. For each decoder layer: record its linear layers' inputs into
    their H (forward hooks; one H per distinct input), quantize each linear with GPTQ and swap in a ``QuantLinear``, then run the layer
    again with quantized weights to make the next layer's inputs, so each layer compensates the errors of the
    quantized layers below it. Returns a summary: layers, linears, seconds, summed GPTQ loss per linear name.
    """
    t0 = time.perf_counter()
    layers = decoder_layers(model)
    inputs = layer_inputs(model, calib, batch_size)
    losses: dict[str, float] = {}
    bar = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"GPTQ w{bits}g{groupsize or 'row'}", unit="layer")
    n_linear = 0
    for li in bar:
        layer = layers[li]
        linears = quant.linear_layers(layer, skip)
        # layers that read the same input tensor (q/k/v; gate/up) share one H: accumulate it once per input
        seen: dict[str, torch.Tensor] = {}
        handles = [lin.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, inp[0]))
                   for name, lin in linears.items()]
        shared: dict[str, str] = {}  # name -> the name that owns its H
        gptqs: dict[str, GPTQ] = {}
        for hs, args, kwargs in inputs:
            seen.clear()
            layer(hs, *args, **kwargs)
            for name, x in seen.items():
                if name not in shared:
                    owner = next((o for o in gptqs if seen[o] is x), None)
                    shared[name] = owner or name
                    if owner is None:
                        gptqs[name] = GPTQ(linears[name])
                if shared[name] == name:
                    gptqs[name].add_batch(x)
        seen.clear()
        for h in handles:
            h.remove()
        # GPTQ treats rows independently: layers sharing an H are quantized as one stacked W (same result as one
        # by one, fewer passes over the columns)
        for owner in gptqs:
            names = [n for n in linears if shared.get(n) == owner]
            W = torch.cat([linears[n].weight.data for n in names])  # (sum of rows, columns)
            q, scale, zero, loss = gptq_quantize(W, gptqs[owner].H, bits, groupsize, blocksize=blocksize,
                                                 percdamp=percdamp, actorder=actorder, sym=sym)
            losses[f"{li}." + "+".join(names)] = loss
            row = 0
            for name in names:
                lin = linears[name]
                r = slice(row, row + lin.out_features)
                row += lin.out_features
                parent_name, _, child = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, child, QuantLinear(q[r], scale[r], zero[r], bits, lin.bias,
                                                   groupsize or lin.in_features).to(lin.weight.device))
                n_linear += 1
        del gptqs
        outs = []
        for hs, args, kwargs in inputs:
            out = layer(hs, *args, **kwargs)
            outs.append((out[0] if isinstance(out, tuple) else out, args, kwargs))
        inputs = outs
    return {"layers": len(layers), "linears": n_linear, "seconds": time.perf_counter() - t0, "losses": losses}
