"""labkit.qat: the straight-through estimator, fake-quant modules, prepare/convert, the torch.ao flow."""
import pytest
import torch

from labkit import gptq, qat


def test_ste_hand_computed():
    w = torch.tensor([-2.0, -0.6, 0.2, 0.74, 1.3], requires_grad=True)
    scale, zero = torch.tensor(0.5), torch.tensor(2.0)
    y = qat.fake_quant_ste(w, scale, zero, 3)
    # codes round(w/0.5)+2 = [-2, 1, 2, 3, 5] -> clamp [0, 1, 2, 3, 3] -> (q-2)*0.5
    assert y.tolist() == [-1.0, -0.5, 0.0, 0.5, 0.5]
    c = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (y * c).sum().backward()
    assert w.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]  # passes straight through, zero where clipped


def test_ste_equals_autograd_reference():
    torch.manual_seed(0)
    w1 = (torch.randn(16, 24) * 2).requires_grad_()
    w2 = w1.detach().clone().requires_grad_()
    scale, zero = torch.full((16, 1), 0.3), torch.full((16, 1), 7.0)
    c = torch.randn(16, 24)
    y1 = qat.fake_quant_ste(w1, scale, zero, 15)
    y2 = qat.fake_quant_ste_reference(w2, scale, zero, 15)
    assert torch.equal(y1, y2)
    (y1 * c).sum().backward()
    (y2 * c).sum().backward()
    assert torch.equal(w1.grad, w2.grad)
    assert (w1.grad == 0).any() and (w1.grad != 0).any()  # both clipped and unclipped entries occur


def test_fake_quant_linear_forward_matches_rtn_and_converts():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 16)
    fq = qat.FakeQuantLinear(lin, 3, 32)
    x = torch.randn(4, 96)
    w_rtn = gptq.dequantize_grouped(*gptq.rtn_quantize(lin.weight.data, 3, 32), 32)
    assert torch.allclose(fq(x), torch.nn.functional.linear(x, w_rtn, lin.bias), atol=1e-5)
    model = torch.nn.Sequential(fq)
    assert qat.convert(model) == 1
    assert torch.allclose(model[0](x), fq(x), atol=1e-5)


def test_qat_reduces_distillation_loss_on_tiny_llama():
    from labkit import models

    teacher, _ = models.load("tiny-llama-shape", device="cpu", dtype=torch.float32)
    student, _ = models.load("tiny-llama-shape", device="cpu", dtype=torch.float32)
    student.load_state_dict(teacher.state_dict())
    qat.prepare(student, 2, 32)
    data = torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(0))
    hist = qat.qat_finetune(student, teacher, data, steps=40, lr=3e-3, batch_size=8, progress=False)["loss"]
    assert sum(hist[-5:]) / 5 < 0.7 * sum(hist[:5]) / 5


def test_prepare_requires_linears():
    with pytest.raises(ValueError):
        qat.convert(torch.nn.Sequential(torch.nn.ReLU()))


def test_ao_qat_flow():
    r = qat.ao_qat_demo(steps=60, qat_steps=30)
    assert r["acc_fp32"] > 0.9
    assert r["acc_int8"] > r["acc_fp32"] - 0.05
    assert r["bytes_int8"] < 0.7 * r["bytes_fp32"]
    assert r["model"].fc1.weight().dtype == torch.qint8
