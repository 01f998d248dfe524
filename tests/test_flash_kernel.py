"""The Triton FlashAttention kernels, the teaching one (flash_attn) and the TMA one (flash_attn_fast): fp16 under
the interpreter on CPU (small sizes), bf16 on a GPU.

Criterion (flash-attention's own): against an upcast reference, the kernel's error is at most twice the error
of PyTorch's attention computed in the same low dtype (``labkit.attention.compare_to_reference``).
"""
import pytest
import torch

from labkit import attention as A
from labkit.kernels import flash_attn as fa
from labkit.kernels import flash_attn_fast as fast

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# both kernels answer to the same checks
KERNELS = pytest.mark.parametrize("kernel", [fa.flash_attention, fast.flash_attention_fast],
                                  ids=["teaching", "tma"])


def _qkv(b, h, h_kv, n_q, n_kv, d, dtype=torch.float16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g, device=DEV, dtype=dtype)
    k = torch.randn(b, h_kv, n_kv, d, generator=g, device=DEV, dtype=dtype)
    v = torch.randn(b, h_kv, n_kv, d, generator=g, device=DEV, dtype=dtype)
    return q, k, v


@KERNELS
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1, 97, 130])
def test_fp16_matches_reference(n, d, causal, kernel):
    q, k, v = _qkv(1, 3, 3, n, n, d, seed=n + d)
    r = A.compare_to_reference(kernel, q, k, v, causal)
    assert r["ok"], r
    assert r["lse_err"] < 1e-4, r


@KERNELS
@pytest.mark.parametrize("n_q,n_kv", [(1, 70), (5, 70), (70, 70)])
def test_gqa_decode_and_chunked_prefill(n_q, n_kv, kernel):
    """SmolLM2's 9 query / 3 KV heads, head dim 64; q_len < kv_len is bottom-right causal (a KV cache)."""
    q, k, v = _qkv(2, 9, 3, n_q, n_kv, 64, seed=n_q)
    r = A.compare_to_reference(kernel, q, k, v, causal=True)
    assert r["ok"], r
    # the decode step attends to the whole cache: the same as non-causal attention
    if n_q == 1:
        o_c, _ = kernel(q, k, v, causal=True)
        o_f, _ = kernel(q, k, v, causal=False)
        assert torch.equal(o_c, o_f)


def test_same_signature_as_reference_and_tiled():
    q, k, v = _qkv(1, 4, 2, 33, 33, 64)
    o, lse = fa.flash_attention(q, k, v, True, 0.2)
    o_ref, lse_ref = fa.flash_attention_reference(q, k, v, True, 0.2)
    o_tiled, lse_tiled = A.tiled_attention(q, k, v, True, 0.2)
    assert o.shape == o_ref.shape == o_tiled.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == lse_ref.shape == (1, 4, 33) and lse.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(lse, lse_tiled, atol=1e-4, rtol=0)


@KERNELS
def test_out_argument_with_transposed_layout(kernel):
    """Hugging Face wants (batch, seqlen, heads, head_dim): the kernel writes through a transposed view."""
    q, k, v = _qkv(1, 4, 4, 20, 20, 64)
    buf = torch.full((1, 20, 4, 64), float("nan"), device=DEV, dtype=torch.float16)
    kernel(q, k, v, True, out=buf.transpose(1, 2))
    torch.testing.assert_close(buf.transpose(1, 2), kernel(q, k, v, True)[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_tuner_without_a_gpu_says_what_it_needs():
    from labkit import env

    with pytest.raises(env.LabkitError, match="GPU|CUDA"):
        fast.tune((64,), log=lambda *a: None)


def test_tma_kernel_agrees_with_the_teaching_kernel_and_refuses_unaligned_rows():
    """Ragged lengths over tiles of 32 (the TMA kernel's bounds are each head's own sequence, so the rows past the
    end of one head are neither read from nor written into the next), then a row stride TMA cannot take."""
    q, k, v = _qkv(2, 4, 2, 45, 77, 64, seed=3)
    for causal in (False, True):
        o_t, lse_t = fa.flash_attention(q, k, v, causal)
        for opts in ({}, {"pipe": True}, {"pipe": True, "block_n": 16}):  # the software-pipelined loop too
            o_f, lse_f = fast.flash_attention_fast(q, k, v, causal, **opts)
            torch.testing.assert_close(o_f, o_t, atol=2e-3, rtol=0)
            torch.testing.assert_close(lse_f, lse_t, atol=1e-4, rtol=0)
    odd = torch.randn(1, 2, 8, 68, device=DEV, dtype=torch.float16)[..., :64]  # rows 136 bytes apart
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        fast.flash_attention_fast(odd, odd, odd)
    fa.flash_attention(odd, odd, odd)  # the teaching kernel takes any strides


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(1, 2, 2, 8, 8, 64)
    with pytest.raises(TypeError, match="fp16 or bf16"):
        fa.flash_attention(q.float(), k.float(), v.float())
    q96, k96, v96 = _qkv(1, 2, 2, 8, 8, 96)
    with pytest.raises(ValueError, match="head_dim=96 is not supported"):
        fa.flash_attention(q96, k96, v96)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        fa.flash_attention(q, k[:, :1].expand(1, 3, 8, 64).contiguous(), v[:, :1].expand(1, 3, 8, 64).contiguous())
    with pytest.raises(ValueError, match="at least as many keys"):
        fa.flash_attention(q, k[:, :, :4], v[:, :, :4], causal=True)


def test_plugged_into_a_llama_model():
    """A small random Llama with SmolLM2's head layout: the kernel as its attention gives SDPA's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=128)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(DEV, torch.float16).eval()
    ids = torch.randint(0, 256, (1, 21), device=DEV)
    with torch.inference_mode():
        ref = model(ids).logits.float()
        ref_gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with A.use_triton_attention(model):
            assert model.config._attn_implementation == A.HF_ATTENTION_NAME
            got = model(ids).logits.float()
            got_gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # decode steps
    assert model.config._attn_implementation == "sdpa"
    assert (got - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    assert torch.equal(got_gen, ref_gen)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n_q,n_kv", [(1, 1), (97, 97), (1025, 1025), (1, 1025), (300, 1025)])
@KERNELS
def test_gpu_bf16_fp16(dtype, causal, d, n_q, n_kv, kernel):
    q, k, v = _qkv(2, 9, 3, n_q, n_kv, d, dtype=dtype, seed=n_q + n_kv)
    r = A.compare_to_reference(kernel, q, k, v, causal)
    assert r["ok"], r
    if kernel is fast.flash_attention_fast and d == 128 and (n_q, n_kv) == (300, 1025):
        # every configuration the tuner may pick gives the same answer (one ragged case: a compile per config)
        for cfg in fast.CONFIGS[1:]:
            r = A.compare_to_reference(lambda *a: kernel(*a, **cfg), q, k, v, causal)
            assert r["ok"], (cfg, r)
