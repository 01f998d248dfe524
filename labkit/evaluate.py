"""Quality of a (quantized) model: strided perplexity, KL divergence and top-1 agreement against a reference.

- ``perplexity(model, ids, ctx_len, stride)``: the sliding-window perplexity of a token stream. Each window of
  ``ctx_len`` tokens scores only the tokens the previous window did not score, so every token is predicted once,
  with at least ``ctx_len - stride`` tokens of context (except at the very start).
- ``compare_to_reference(model, reference, ids)``: on the same windows, the mean KL(reference ‖ model) per token
  (in nats) and how often both models' most likely next token agree. These see changes that perplexity averages
  away, and need no labels.
- ``chat(model, tokenizer, prompt)``: a greedy answer through the tokenizer's chat template.
"""
from __future__ import annotations

import math


def _model_device(model):
    return next(model.parameters()).device


def _windows(n_tokens: int, ctx_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) for each window: the last ``n_scored`` tokens of ids[begin:end] are new targets."""
    out, prev_end, begin = [], 0, 0
    while prev_end < n_tokens:
        end = min(begin + ctx_len, n_tokens)
        n_new = end - prev_end if begin > 0 else end - 1  # the first token of the stream has no context
        if n_new > 0:
            out.append((begin, end, n_new))
        prev_end = end
        begin += stride
    return out


def nll_sum(model, ids, ctx_len: int = 512, stride: int | None = None, batch_size: int = 8) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (nats) over ``ids`` and the number of tokens scored."""
    import torch

    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"expected a 1-D token stream of at least 2 tokens, got shape {tuple(ids.shape)}")
    stride = stride or ctx_len // 2
    if not 0 < stride < ctx_len:
        raise ValueError(f"stride must be in (0, ctx_len) so every window has context; got {stride} with ctx_len {ctx_len}")
    dev = _model_device(model)
    wins = _windows(ids.numel(), ctx_len, stride)
    total, count = 0.0, 0
    # batch windows of equal length (all but the last ones have length ctx_len)
    groups: dict[int, list] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    with torch.inference_mode():
        for length, ws in groups.items():
            for i in range(0, len(ws), batch_size):
                chunk = ws[i: i + batch_size]
                x = torch.stack([ids[b:e] for b, e, _ in chunk]).to(dev)  # (B, length)
                keep = max(n for _, _, n in chunk) + 1
                logits = model(input_ids=x, logits_to_keep=min(keep, length)).logits.float()  # (B, keep, V)
                logp = torch.log_softmax(logits, dim=-1)
                for j, (_, _, n_new) in enumerate(chunk):
                    # logits at position t predict token t+1: the last n_new targets use the n_new positions
                    # before the final one
                    pred = logp[j, -n_new - 1:-1]  # (n_new, V)
                    tgt = x[j, -n_new:]  # (n_new,)
                    total -= pred.gather(-1, tgt[:, None]).sum().item()
                    count += n_new
    return total, count


def perplexity(model, ids, ctx_len: int = 512, stride: int | None = None, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) of a 1-D token stream, with a sliding window of ``ctx_len`` and ``stride``."""
    total, count = nll_sum(model, ids, ctx_len, stride, batch_size)
    return math.exp(total / count)


def compare_to_reference(model, reference, ids, ctx_len: int = 512, batch_size: int = 4) -> dict:
    """Mean KL(reference ‖ model) per token (nats) and top-1 agreement, on non-overlapping windows of ``ids``.

    Both models see the same windows; their logits are compared in fp32 on the model's device.
    """
    import torch

    n_win = ids.numel() // ctx_len
    if n_win == 0:
        raise ValueError(f"need at least ctx_len={ctx_len} tokens, have {ids.numel()}")
    dev, ref_dev = _model_device(model), _model_device(reference)
    windows = ids[: n_win * ctx_len].view(n_win, ctx_len)  # (n_win, ctx_len)
    kl_sum, agree, count = 0.0, 0, 0
    with torch.inference_mode():
        for i in range(0, n_win, batch_size):
            x = windows[i: i + batch_size]
            lp = torch.log_softmax(model(input_ids=x.to(dev)).logits.float(), dim=-1)  # (B, T, V)
            lq = torch.log_softmax(reference(input_ids=x.to(ref_dev)).logits.float(), dim=-1).to(lp.device)
            kl_sum += (lq.exp() * (lq - lp)).sum().item()
            agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
            count += x.numel()
    return {"kl": kl_sum / count, "top1": agree / count, "n_tokens": count}


def chat(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy answer to one user message through the tokenizer's chat template."""
    import torch

    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    enc = {k: v.to(_model_device(model)) for k, v in enc.items()}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
