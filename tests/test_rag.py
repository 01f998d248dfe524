"""labkit.rag: the question set, the pure functions against references, faiss against exact search, and recall."""
import pytest
import torch

from labkit import rag


def test_question_set_is_labelled_and_consistent():
    qs = rag.questions()
    assert len(qs) >= 100
    assert len({q.id for q in qs}) == len(qs)
    rows = {p.id: p for p in rag.passages()}
    for q in qs:
        assert q.passage_id in rows, q.id
        assert rows[q.passage_id].text == q.passage, f"{q.id}: passage differs from the corpus paragraph"
        assert q.answer.lower() in q.passage.lower(), f"{q.id}: answer not in its passage"
    assert len({q.doc for q in qs}) == 24  # every document has questions


def test_mean_pool_ignores_padding():
    h = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = rag.mean_pool(h, mask)
    ref0 = torch.nn.functional.normalize(h[0, :3].mean(0), dim=0)
    torch.testing.assert_close(got[0], ref0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))


def test_int8_embeddings_round_trip_and_search():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(300, 64), dim=1)
    q, scale = rag.quantize_embeddings(emb)
    assert q.dtype == torch.int8
    err = (rag.dequantize_embeddings(q, scale) - emb).abs().max()
    assert err <= scale.max() / 2 + 1e-7  # rounding to the nearest step, at most half a step
    queries = emb[:40] + 0.05 * torch.randn(40, 64)
    exact = rag.search_reference(queries, emb, 1)
    assert (rag.search_reference_int8(queries, q, scale, 1) == exact).float().mean() >= 0.95


def test_recall_at_k_by_hand():
    top = torch.tensor([[3, 1, 2], [0, 4, 5], [9, 8, 7]])
    gold = torch.tensor([3, 5, 1])
    assert rag.recall_at_k(top, gold, ks=(1, 3)) == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}


def test_faiss_indexes_against_exact_search():
    torch.manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(50, 32), dim=1)
    exact = rag.search_reference(queries, emb, 5)
    assert torch.equal(rag.search(rag.build_index(emb, "flat"), queries, 5), exact)
    ivf_all = rag.build_index(emb, "ivf", nlist=8, nprobe=8)  # every cell searched: exact again
    assert torch.equal(rag.search(ivf_all, queries, 5), exact)
    sq8 = rag.search(rag.build_index(emb, "sq8"), queries, 1)
    assert (sq8[:, 0] == exact[:, 0]).float().mean() >= 0.9
    assert rag.index_bytes(rag.build_index(emb, "sq8")) < rag.index_bytes(rag.build_index(emb, "flat")) / 3


def test_contains_answer():
    assert rag.contains_answer("It was finished in  1894.", "1894")
    assert rag.contains_answer("Priya OSEI", "Priya Osei")
    assert not rag.contains_answer("It was 1895", "1894")
    # number words and digits, thousands separators, punctuation, articles
    assert rag.contains_answer("The tally stick carries 23 notches.", "twenty-three")
    assert rag.contains_answer("She was 14 years old.", "fourteen") and rag.contains_answer("fourteen!", "14")
    assert rag.contains_answer("about 40000 kilometres", "40,000")
    assert rag.contains_answer("Eleven thousand people came", "eleven thousand")
    assert rag.contains_answer("It is called the Winter Ferry.", "The Winter Ferry")
    assert rag.contains_answer("It cost £13.80 then", "£13.80")
    # whole words only, and citation marks are not numbers
    assert not rag.contains_answer("She was fourteen.", "four")
    assert not rag.contains_answer("In 2021.", "2")
    assert not rag.contains_answer("As [3] says, there are 12 arches.", "three")
    assert not rag.contains_answer("anything", "")


def test_number_words_to_digits():
    conv = rag.number_words_to_digits
    assert conv("fifty one days".split()) == ["51", "days"]
    assert conv("two or three weeks".split()) == ["2", "or", "3", "weeks"]
    assert conv("three hundred twelve".split()) == ["312"]
    assert conv("eleven thousand".split()) == ["11000"]
    assert conv("twenty twenty".split()) == ["20", "20"]
    assert conv("nineteen eighty".split()) == ["19", "80"]
    assert conv("one hundred".split()) == ["100"] and conv(["hundred"]) == ["hundred"]


def test_every_labelled_answer_matches_its_own_passage():
    # the matching rule must not lose an answer that is written in its passage
    for q in rag.questions():
        assert rag.contains_answer(q.passage, q.answer), q.id


def test_bad_requests_fail_clearly():
    with pytest.raises(rag.LabkitError, match="fp32"):
        rag.Encoder("fp16")
    with pytest.raises(rag.LabkitError, match="kind"):
        rag.build_index(torch.randn(10, 4), "hnsw2")


def test_retriever_recall_fp32_and_int8():
    pas, qs = rag.passages(), rag.questions()
    r32 = rag.retrieval_eval(rag.Encoder("fp32"), pas, qs)["recall"]
    r8 = rag.retrieval_eval(rag.Encoder("int8"), pas, qs, int8_store=True)["recall"]
    assert r32[5] >= 0.8, r32
    assert abs(r8[5] - r32[5]) <= 0.02, (r32, r8)


def test_bench_rag_refuses_bad_counts(capsys):
    from labkit import cli

    assert cli.main(["bench", "rag", "--answer", "0"]) == 1
    assert "--answer must be between 1 and" in capsys.readouterr().err
    assert cli.main(["bench", "rag", "--k-context", "0"]) == 1
    assert "--k-context" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from labkit import models

    return AutoTokenizer.from_pretrained(models.smollm2_checkpoint(), local_files_only=True)


def _tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


def test_prompt_puts_the_best_passage_last_and_closed_book_has_none(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = tok.decode(rag.prompt_ids(tok, "Which bridge?", ["BEST passage", "second passage"])[0])
    assert text.index("second passage") < text.index("BEST passage") < text.index("Which bridge?")
    closed = tok.decode(rag.prompt_ids(tok, "Which bridge?", [])[0])
    assert "Passages" not in closed and "Which bridge?" in closed and rag.SYSTEM in closed


def test_answer_eval_contexts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = _tiny_llama(len(tok))
    pas, qs = rag.passages(), rag.questions()[:2]

    class FixedEncoder:  # every question embeds to passage 5's vector: the index returns row 5
        def encode(self, texts):
            return emb[5:6].expand(len(texts), -1)

    emb = torch.nn.functional.normalize(torch.randn(len(pas), 8), dim=1)
    index = rag.build_index(emb, "flat")
    gold = rag.gold_rows(pas, qs).tolist()
    got = {}
    for ctx in rag.CONTEXTS:
        recs, stages = rag.answer_eval(model, tok, FixedEncoder(), index, pas, qs, k=1, max_new_tokens=3,
                                       progress=False, context=ctx)
        got[ctx] = recs
        assert [r["context"] for r in recs] == [ctx] * 2 and set(stages) == {"embed", "search", "prefill", "decode"}
        assert all(1 <= r["new_tokens"] <= 3 and r["prefill_ms"] > 0 for r in recs)
    assert [r["retrieved_gold"] for r in got["gold"]] == [True, True]
    assert [r["retrieved_gold"] for r in got["none"]] == [False, False]
    assert [r["retrieved_gold"] for r in got["retrieved"]] == [g == 5 for g in gold]
    assert all(r["embed_ms"] == 0 and r["search_ms"] == 0 for ctx in ("gold", "none") for r in got[ctx])
    with pytest.raises(rag.LabkitError, match="context"):
        rag.answer_eval(model, tok, None, None, pas, qs, context="oracle")


def test_generate_timed_names_the_cache_argument_as_the_model_does(smollm2_tokenizer):
    # transformers 5.17 (the GPU runner) takes ``past_key_values``; newer releases take ``cache`` and deprecate the
    # old name. generate_timed reads the forward's signature: both spellings give the same greedy tokens.
    tok = smollm2_tokenizer
    model = _tiny_llama(len(tok))
    new_name = "cache" in __import__("inspect").signature(model.forward).parameters

    class OldSignature(torch.nn.Module):  # a model whose forward knows only ``past_key_values``
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
            kw = {"cache" if new_name else "past_key_values": past_key_values}
            return self.inner(input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep, **kw)

    ids = rag.prompt_ids(tok, "How many arches?", ["The bridge has three arches."])
    a = rag.generate_timed(model, tok, ids, 5)
    b = rag.generate_timed(OldSignature(model), tok, ids, 5)
    assert a["text"] == b["text"] and a["new_tokens"] == b["new_tokens"]


def test_batched_answers_match_one_at_a_time(smollm2_tokenizer):
    # left padding and the attention mask make a batch answer each prompt as it would alone (tiny model, fp32)
    tok = smollm2_tokenizer
    model = _tiny_llama(len(tok))
    pas, qs = rag.passages(), rag.questions()[:3]
    ctxs = rag.context_passages(pas, qs, "gold")
    prompts = [rag.prompt_ids(tok, q.question, c) for q, c in zip(qs, ctxs)]
    assert len({p.shape[1] for p in prompts}) > 1  # different lengths: padding is exercised
    alone = [rag.generate_timed(model, tok, p, 4) for p in prompts]
    batched = rag.generate_batch(model, tok, prompts, 4, batch_size=2)
    assert batched == [a["text"] for a in alone]
    recs = rag.accuracy_eval(model, tok, pas, qs, "none", max_new_tokens=2)
    assert [r["context"] for r in recs] == ["none"] * 3 and all(isinstance(r["correct"], bool) for r in recs)
    with pytest.raises(rag.LabkitError, match="top"):
        rag.context_passages(pas, qs, "retrieved")
