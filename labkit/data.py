"""Text corpora and deterministic, disjoint calibration / evaluation splits in tokens.

Corpora (``documents(name)``):

- ``"pydoc"``: the topic help of the CPython Language Reference that every Python ships (``pydoc_data.topics``):
  79 documents, about 465k characters (~110k SmolLM2 tokens) in Python 3.11; technical English with code.
  The text changes with the Python version (3.11: 64,497 evaluation tokens; 3.12: 69,748), so compare
  perplexities on this corpus only between runs of the same Python minor version (results record it).
- ``"lab"``: original English prose written for this project, in ``data/lab_prose/`` (see ``data/README.md``).
- ``"wikitext2"``: WikiText-2 (raw) through the ``datasets`` package, when it is installed and the hub is reachable
  (or the data set is in the local HF cache); its own train/test splits are used.

``load_splits(tokenizer, corpus)`` assigns each document to calibration or evaluation by a hash of its name, so
the split never depends on the tokenizer, the machine or the order files are listed in, and no document appears
in both. Calibration batches are random windows (fixed seed) of the calibration tokens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from labkit import env
from labkit.env import LabkitError

CORPORA = ("pydoc", "lab", "wikitext2")
CALIB_FRACTION = 0.25  # share of documents that go to calibration


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass
class Splits:
    """Token ids of one corpus: ``calib`` and ``eval`` are 1-D LongTensors from disjoint documents."""

    corpus: str
    calib: "torch.Tensor"  # noqa: F821
    eval: "torch.Tensor"  # noqa: F821
    calib_docs: list = field(default_factory=list)
    eval_docs: list = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"Splits({self.corpus!r}: calib {self.calib.numel():,} tokens from {len(self.calib_docs)} docs, "
                f"eval {self.eval.numel():,} tokens from {len(self.eval_docs)} docs)")


def documents(corpus: str) -> list[Document]:
    """The documents of a corpus, sorted by name (wikitext2: use ``load_splits``, which keeps its own splits)."""
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        return [Document(k, v) for k, v in sorted(topics.items())]
    if corpus == "lab":
        folder = env.repo_root() / "data" / "lab_prose"
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise LabkitError(f"No texts found in {folder}: the checkout's data/ folder is missing; "
                              "run from a full clone of the repository.")
        return [Document(f.stem, f.read_text(encoding="utf-8")) for f in files]
    if corpus == "wikitext2":
        raise LabkitError("wikitext2 comes with its own splits: call load_splits(tokenizer, corpus='wikitext2').")
    raise LabkitError(f"Unknown corpus {corpus!r}; choose one of {CORPORA}.")


def is_calibration(name: str, fraction: float = CALIB_FRACTION) -> bool:
    """Deterministic document-level assignment: a hash of the name, not the tokenizer or the machine."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def _tokenize(tokenizer, texts: list[str]):
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)  # a document boundary the model knows
    return torch.tensor(ids, dtype=torch.long)


def _wikitext2(tokenizer) -> tuple[list[str], list[str]]:
    try:
        datasets = env.require_package("datasets", "the wikitext2 corpus")
    except LabkitError as exc:
        raise LabkitError(f"{exc} Or use corpus='pydoc' or 'lab', which ship offline.") from exc
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
    except Exception as exc:  # offline: ConnectionError, or datasets' own errors
        raise LabkitError("wikitext-2 could not be loaded (no network to the Hugging Face hub and no local copy). "
                          f"Use corpus='pydoc' or 'lab', which ship offline. ({exc!s:.200})") from exc
    return ["".join(ds["train"]["text"])], ["".join(ds["test"]["text"])]


def load_splits(tokenizer, corpus: str = "pydoc", calib_tokens: int | None = None,
                eval_tokens: int | None = None) -> Splits:
    """Tokenize a corpus into disjoint calibration and evaluation token streams.

    ``calib_tokens`` / ``eval_tokens`` cut each stream to its first N tokens (None keeps all). Asking for more
    evaluation tokens than the corpus holds is an error, not a silent shortfall.
    """
    if corpus == "wikitext2":
        calib_texts, eval_texts = _wikitext2(tokenizer)
        calib_names, eval_names = ["wikitext-2 train"], ["wikitext-2 test"]
    else:
        docs = documents(corpus)
        calib = [d for d in docs if is_calibration(d.name)]
        evals = [d for d in docs if not is_calibration(d.name)]
        calib_texts, eval_texts = [d.text for d in calib], [d.text for d in evals]
        calib_names, eval_names = [d.name for d in calib], [d.name for d in evals]
    calib_ids = _tokenize(tokenizer, calib_texts)
    eval_ids = _tokenize(tokenizer, eval_texts)
    for label, ids, want in (("calibration", calib_ids, calib_tokens), ("evaluation", eval_ids, eval_tokens)):
        if want is not None and want > ids.numel():
            raise LabkitError(f"Corpus {corpus!r} has only {ids.numel():,} {label} tokens, {want:,} were asked for; "
                              "ask for fewer or use a larger corpus.")
    if calib_tokens is not None:
        calib_ids = calib_ids[:calib_tokens]
    if eval_tokens is not None:
        eval_ids = eval_ids[:eval_tokens]
    return Splits(corpus, calib_ids, eval_ids, calib_names, eval_names)


def calibration_batches(ids, n_samples: int, seq_len: int, seed: int = 0):
    """``n_samples`` random windows of ``seq_len`` tokens from a 1-D token stream: LongTensor (n_samples, seq_len)."""
    import torch

    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    if ids.numel() < seq_len + 1:
        raise LabkitError(f"Need more than {seq_len} tokens for windows of {seq_len}, have {ids.numel()}.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])  # (n_samples, seq_len)
