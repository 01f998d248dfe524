"""Reference results (committed, measured on GPUs) and a learner's own results (untracked), kept apart.

Layout::

    results/<device-slug>/<name>.json          reference runs, committed (written with ``labkit bench ... --reference``)
    results/local/<device-slug>/<name>.json    this machine's runs, ignored by git (the default output)

Notebooks read committed results **only** through :func:`references` / :func:`reference`: what they return carries
its device, commit and date, and :meth:`Reference.heading` is the label every notebook prints above a reference
figure. Asserts and takeaways use the run's own measurements; a reference is shown beside them, labelled.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from labkit import env

LOCAL = "local"  # results/local/ holds a learner's runs (git-ignored)


def root() -> Path:
    """``results/`` of this checkout."""
    return env.repo_root() / "results"


def local_dir(slug: str | None = None) -> Path:
    """``results/local/<device-slug>/`` (created): where this machine's benchmark runs go by default."""
    path = root() / LOCAL / (slug or env.device_slug())
    path.mkdir(parents=True, exist_ok=True)
    return path


def reference_dir(slug: str | None = None) -> Path:
    """``results/<device-slug>/`` (created): the committed reference runs of a device."""
    path = root() / (slug or env.device_slug())
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_dir(reference: bool = False, slug: str | None = None) -> Path:
    """Where a benchmark writes: the local folder, or the reference folder when asked explicitly."""
    return reference_dir(slug) if reference else local_dir(slug)


@dataclass
class Reference:
    """One committed results file: ``doc`` is its JSON (``meta``, ``summary``, ``records``)."""

    path: Path
    doc: dict = field(repr=False)

    @property
    def meta(self) -> dict:
        return self.doc.get("meta", {})

    @property
    def summary(self) -> dict:
        return self.doc.get("summary", {})

    @property
    def records(self) -> list[dict]:
        return self.doc.get("records", [])

    @property
    def device(self) -> str:
        return self.meta.get("device") or self.path.parent.name

    @property
    def slug(self) -> str:
        return self.path.parent.name

    @property
    def commit(self) -> str:
        return self.meta.get("git_commit") or "unknown commit"

    @property
    def date(self) -> str:
        return (self.meta.get("utc") or "unknown date")[:10]

    local: bool = False  # a run of this machine's from results/local/ (not committed), not a reference run

    def heading(self) -> str:
        """The label printed above a reference figure: not this run, and where and when it was measured."""
        commit = f"commit {self.commit}" if self.meta.get("git_commit") else "commit not recorded"
        kind = "Earlier run on this machine (not this run)" if self.local else "Reference run (not this run)"
        return f"{kind}: {self.device}, {commit}, {self.date}"


def references(name: str, devices: list[str] | None = None) -> list[Reference]:
    """Every committed ``results/<device>/<name>.json`` (``name`` without ``.json``), sorted by device slug.

    ``devices`` restricts to those slugs (in that order). The local folder is never read here.
    """
    base = root()
    if devices is None:
        paths = sorted(p for p in base.glob(f"*/{name}.json") if p.parent.name != LOCAL)
    else:
        paths = [base / d / f"{name}.json" for d in devices if (base / d / f"{name}.json").exists()]
    return [Reference(p, json.loads(p.read_text())) for p in paths]


def reference(name: str, device: str | None = None) -> Reference | None:
    """The committed ``<name>.json`` of ``device`` (a slug; default: the first device that has one), or None."""
    refs = references(name, [device] if device else None)
    return refs[0] if refs else None


def local_run(name: str) -> Reference | None:
    """This machine's own earlier ``results/local/<device>/<name>.json`` (written by ``labkit bench ...``), or None."""
    path = root() / LOCAL / env.device_slug() / f"{name}.json"
    return Reference(path, json.loads(path.read_text()), local=True) if path.exists() else None


def print_reference(ref: Reference, lines: list[str] | str) -> None:
    """Print reference figures under their heading, so that they are never mistaken for this run's."""
    print(f"── {ref.heading()}")
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"   {line}")
