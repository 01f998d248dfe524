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
