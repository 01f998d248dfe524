"""labkit.ptq: method names, bits per weight, the one-pass evaluation, the CLI on a tiny run."""
import json
import math

import pytest
import torch

from labkit import env, ptq


def test_parse_method():
    assert ptq.parse_method("gptq_w4g128") == {"kind": "gptq", "bits": 4, "groupsize": 128}
    assert ptq.parse_method("rtn_w8") == {"kind": "rtn", "bits": 8, "groupsize": None}
    assert ptq.parse_method("nf4_dq") == {"kind": "bnb", "quant": "nf4-dq"}
    with pytest.raises(Exception, match="Unknown method"):
        ptq.parse_method("awq_w4")


def test_bnb_bits():
    assert ptq.bnb_bits_per_weight("nf4") == 4.5
    assert math.isclose(ptq.bnb_bits_per_weight("nf4-dq"), 4.127, abs_tol=1e-3)


def test_evaluate_quality_matches_manual_loss():
    from labkit import models

    model, _ = models.load("tiny-llama-shape", device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    out = ptq.evaluate_quality(model, ids, reference=model, ctx_len=64, batch_size=2)
    x = ids[:192].view(3, 64)
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss  # mean over the 3 x 63 predicted tokens
    assert math.isclose(out["ppl"], math.exp(loss.item()), rel_tol=1e-4)
    assert out["n_tokens"] == 3 * 63 and abs(out["kl"]) < 1e-6 and out["top1"] == 1.0
    cache = ptq.reference_logprobs_of(model, ids, 64, 2)
    assert ptq.evaluate_quality(model, ids, ctx_len=64, batch_size=2, reference_logprobs=cache)["kl"] < 1e-6


def test_cli_writes_summary(tmp_path):
    out = tmp_path / "quality.json"
    rc = ptq.cli_main(["--methods", "reference,rtn_w8,rtn_w2g64", "--profile", "quick", "--eval-tokens", "512",
                       "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    s = doc["summary"]
    ref = "bf16" if torch.cuda.is_available() else "fp32"  # the unquantized reference on this device
    assert set(s) == {ref, "rtn_w8", "rtn_w2g64"}
    assert s[ref] < s["rtn_w2g64"] and abs(s["rtn_w8"] / s[ref] - 1) < 0.02
    assert doc["meta"]["device_slug"] == env.device_slug()
