"""Quantization-aware training: fake quantization with a straight-through estimator (STE), and a QAT loop.

- ``FakeQuantSTE``: forward ``w -> dequantize(quantize(w))`` on a given grid; backward written out: the gradient
  passes straight through where ``w`` fell inside the grid's range and is zero where it was clipped
  (Bengio et al. 2013, "Estimating or propagating gradients through stochastic neurons"; the clipped form as in
  Jacob et al. 2018, "Quantization and training of neural networks for efficient integer-arithmetic-only
  inference"). ``fake_quant_ste_reference`` is the same estimator built from autograd and ``detach`` only.
- ``FakeQuantLinear``: an ``nn.Linear`` whose forward uses the fake-quantized weight, with per-group min-max scales
  taken from the current (detached) weights: exactly the RTN quantizer of ``labkit.gptq``, so ``convert`` to a
  ``QuantLinear`` gives the very weights the forward pass trained with.
- ``qat_finetune``: distillation from the unquantized model (KL(teacher ‖ student) per token), so QAT recovers
  what quantization lost instead of adapting the model to a new corpus.
- ``ao_qat_demo``: PyTorch's eager-mode ``torch.ao.quantization`` QAT flow (prepare_qat → train → convert to int8)
  on a small MLP, for comparison with what LLM quantization needs.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from labkit import gptq, quant
from labkit.quant import QuantLinear


# ---------------------------------------------------------------------------------------------- STE
class FakeQuantSTE(torch.autograd.Function):
    """``y = (clamp(round(w / scale) + zero, 0, maxq) - zero) * scale`` with the clipped straight-through gradient.

    ``round`` has zero gradient almost everywhere; the STE pretends it is the identity, so ``dy/dw = 1`` where the
    unclamped code ``round(w / scale) + zero`` lies in ``[0, maxq]`` and ``0`` where it was clipped.
    scale and zero are treated as constants (no gradient).
    """

    @staticmethod
    def forward(ctx, w, scale, zero, maxq):
        code = torch.round(w / scale) + zero
        inside = (code >= 0) & (code <= maxq)
        ctx.save_for_backward(inside)
        return (torch.clamp(code, 0, maxq) - zero) * scale

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None


def fake_quant_ste(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return FakeQuantSTE.apply(w, scale, zero, maxq)


def fake_quant_ste_reference(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The same estimator from autograd alone: ``w_pass + (fq(w) - w_pass).detach()``, where ``w_pass`` is ``w`` on
    unclipped entries and a detached copy elsewhere. Value = fq(w); gradient = 1 inside the range, 0 outside."""
    with torch.no_grad():
        code = torch.round(w / scale) + zero
        inside = (code >= 0) & (code <= maxq)
        fq = (torch.clamp(code, 0, maxq) - zero) * scale
    w_pass = torch.where(inside, w, w.detach())
    return w_pass + (fq - w_pass).detach()


def group_params(w: torch.Tensor, bits: int, groupsize: int | None):
    """Per-group min-max (scale, zero) of ``w (rows, columns)``, expanded to w's shape (the RTN quantizer)."""
    rows, columns = w.shape
    g = groupsize or columns
    scale, zero = quant.zeropoint_params(w.detach(), bits, "group", g)  # (rows, ceil(columns / g))
    return quant.expand_groups(scale, columns, g), quant.expand_groups(zero, columns, g)  # (rows, columns)


# ---------------------------------------------------------------------------------------------- modules
class FakeQuantLinear(nn.Module):
    """``nn.Linear`` that computes with ``fake_quant_ste(W)``; W stays in full precision and is what trains."""

    def __init__(self, linear: nn.Linear, bits: int, groupsize: int | None = 128):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.groupsize = bits, groupsize
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def quantized_weight(self) -> torch.Tensor:
        scale, zero = group_params(self.weight.float(), self.bits, self.groupsize)
        return fake_quant_ste(self.weight.float(), scale, zero, 2 ** self.bits - 1).to(self.weight.dtype)

    def forward(self, x):
        return nn.functional.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    def to_quant_linear(self) -> QuantLinear:
        q, scale, zero = gptq.rtn_quantize(self.weight.detach(), self.bits, self.groupsize)
        return QuantLinear(q, scale, zero, self.bits, self.bias, self.groupsize or self.in_features).to(self.weight.device)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groupsize={self.groupsize}"


def prepare(model: nn.Module, bits: int, groupsize: int | None = 128, skip=("lm_head",)) -> int:
    """Swap linear layers for ``FakeQuantLinear`` (in place); returns how many."""
    return quant.replace_linear(model, lambda name, lin: FakeQuantLinear(lin, bits, groupsize), skip)


def convert(model: nn.Module) -> int:
    """Swap every ``FakeQuantLinear`` for the ``QuantLinear`` holding its integer weights (in place)."""
    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not names:
        raise ValueError("convert found no FakeQuantLinear: call labkit.qat.prepare(model, ...) first")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).to_quant_linear())
    return len(names)


# ---------------------------------------------------------------------------------------------- training
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher ‖ student) per token, logits ``(B, T, V)``, in nats."""
    lt = torch.log_softmax(teacher_logits.float(), dim=-1)
    ls = torch.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def qat_finetune(model: nn.Module, teacher: nn.Module, batches: torch.Tensor, steps: int, lr: float = 5e-5,
                 batch_size: int = 4, train_norms: bool = True, log_every: int = 10, progress: bool = True) -> dict:
    """Distil ``teacher`` into the fake-quantized ``model`` on token windows ``batches (n, seq_len)``.

    Trains the ``FakeQuantLinear`` weights (and the RMSNorm gains if ``train_norms``) with AdamW and a cosine
    learning-rate decay; embeddings stay frozen (tied to ``lm_head`` in SmolLM2, which is not quantized).
    Returns ``{"loss": [...per step], "seconds": ...}``.
    """
    params = []
    for mod in model.modules():
        if isinstance(mod, FakeQuantLinear):
            params.append(mod.weight)
        elif train_norms and "RMSNorm" in type(mod).__name__:
            params.extend(mod.parameters(recurse=False))
    if not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("qat_finetune needs a model prepared with labkit.qat.prepare(model, bits, groupsize)")
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(steps, 1)))).item())
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    history = []
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="QAT", unit="step")
    t0 = time.perf_counter()
    model.train()
    teacher.eval()
    for step in bar:
        idx = torch.randint(0, batches.shape[0], (batch_size,), generator=gen)
        x = batches[idx].to(dev)  # (batch_size, seq_len)
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits
        loss = kd_loss(model(input_ids=x).logits, t_logits.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append(loss.item())
        if progress and step % log_every == 0:
            bar.set_postfix(kd=f"{loss.item():.4f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"loss": history, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- torch.ao eager QAT
class SmallMLP(nn.Module):
    """A 2-hidden-layer MLP wrapped in Quant/DeQuant stubs, as eager-mode ``torch.ao.quantization`` requires."""

    def __init__(self, d_in: int = 16, hidden: int = 64, n_classes: int = 4):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc1, self.relu1 = nn.Linear(d_in, hidden), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(hidden, hidden), nn.ReLU()
        self.fc3 = nn.Linear(hidden, n_classes)

    def forward(self, x):
        x = self.quant(x)  # fp32 -> quint8 after convert
        x = self.relu2(self.fc2(self.relu1(self.fc1(x))))
        return self.dequant(self.fc3(x))  # quint8 -> fp32


def _toy_task(n: int, d_in: int, n_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, d_in, generator=torch.Generator().manual_seed(1234)) * 1.2
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d_in, generator=g)
    return x, y


def _train(model, x, y, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def ao_qat_demo(steps: int = 200, qat_steps: int = 100, backend: str = "x86", seed: int = 0) -> dict:
    """Eager-mode QAT with ``torch.ao.quantization`` on ``SmallMLP`` (CPU): train fp32, fuse, ``prepare_qat``
    (inserts FakeQuantize observers on weights and activations), fine-tune, ``convert`` to int8 modules.

    Returns accuracies (fp32, QAT-fake-quant, converted int8), state-dict sizes and the converted model.
    """
    import io

    import torch.ao.quantization as tq

    torch.manual_seed(seed)
    x, y = _toy_task(4096, 16, 4, seed)
    xt, yt = _toy_task(2048, 16, 4, seed + 1)
    model = SmallMLP()
    _train(model, x, y, steps, 1e-2)

    def acc(m):
        with torch.no_grad():
            return float((m(xt).argmax(-1) == yt).float().mean())

    def size(m):
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        return buf.tell()

    acc_fp32, size_fp32 = acc(model.eval()), size(model)
    torch.backends.quantized.engine = backend
    qat_model = SmallMLP()
    qat_model.load_state_dict(model.state_dict())
    qat_model.train()
    qat_model = tq.fuse_modules_qat(qat_model, [["fc1", "relu1"], ["fc2", "relu2"]])
    qat_model.qconfig = tq.get_default_qat_qconfig(backend)
    tq.prepare_qat(qat_model, inplace=True)
    _train(qat_model, x, y, qat_steps, 1e-3)
    qat_model.eval()
    acc_fake = acc(qat_model)
    int8_model = tq.convert(qat_model)
    return {"acc_fp32": acc_fp32, "acc_qat_fake": acc_fake, "acc_int8": acc(int8_model),
            "bytes_fp32": size_fp32, "bytes_int8": size(int8_model), "model": int8_model, "test": (xt, yt)}
