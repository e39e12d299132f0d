"""The training text: the running interpreter's standard library, as code and as English.

- code: every `.py` file under `sysconfig.get_paths()["stdlib"]`, test suites and
  site-packages excluded (third-party code differs between machines).
- English: the docstrings of those files (module, class and function, via
  `ast.get_docstring`) and the help topics of `pydoc_data.topics`.

Held-out split: a file (or pydoc topic) is held out when a stable hash (SHA-256) of its
path relative to the stdlib root falls in 1/HELDOUT_MODULUS of the range, so the split is
the same on every machine with the same Python version, and a file's docstrings are held
out with its code. The stdlib differs between Python versions, so moecc ships a fixed
sample of the held-out files (`write_heldout_sample`, moecc/trained/heldout/) and
evaluates on that by default.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
import warnings
from dataclasses import dataclass

import numpy as np

HELDOUT_MODULUS = 20  # 5% of files held out
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
SEPARATOR = b"\n\n"


def is_heldout(relpath: str) -> bool:
    """Whether a file (path relative to the stdlib root, '/' separators) is held out."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


@dataclass(frozen=True)
class Document:
    """One unit of text: a source file, the docstrings of one file, or one pydoc topic."""

    name: str      # path relative to the stdlib root ("json/decoder.py"), or "pydoc_data/topics/<key>"
    domain: str    # "code" or "english"
    text: str
    heldout: bool


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _source_files(root: str) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in sorted(filenames):
            if f.endswith(".py"):
                paths.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return paths


def _docstrings(source: str) -> list[str]:
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences in old modules: not our concern
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a stdlib file newer than this parser: skip its docstrings
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = (ast.get_docstring(n) for n in nodes)
    return [d for d in docs if d and len(d) >= 40]  # one-liners like "Return x." carry little English


def stdlib_documents(root: str | None = None) -> list[Document]:
    """All code and English documents, in a deterministic order."""
    import pydoc_data.topics

    root = root or stdlib_root()
    docs = []
    for rel in _source_files(root):
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            source = f.read()
        held = is_heldout(rel)
        docs.append(Document(rel, "code", source, held))
        strings = _docstrings(source)
        if strings:
            docs.append(Document(rel, "english", "\n\n".join(strings), held))
    for key in sorted(pydoc_data.topics.topics):
        name = f"pydoc_data/topics/{key}"
        docs.append(Document(name, "english", pydoc_data.topics.topics[key], is_heldout(name)))
    return docs


def byte_stream(docs: list[Document]) -> np.ndarray:
    """The documents' UTF-8 bytes joined by blank lines, as uint8 (the tokens of a byte LM)."""
    return np.frombuffer(SEPARATOR.join(d.text.encode("utf-8") for d in docs), dtype=np.uint8).copy()


def training_streams(docs: list[Document]) -> dict[str, np.ndarray]:
    """{domain: bytes} of the training (not held-out) documents."""
    return {dom: byte_stream([d for d in docs if d.domain == dom and not d.heldout]) for dom in ("code", "english")}


def write_heldout_sample(docs: list[Document], out_dir: str, *, code_bytes: int = 120_000,
                         english_bytes: int = 80_000) -> dict[str, list[str]]:
    """Write held-out text under out_dir/code/*.py and out_dir/english/*.txt; returns the names.

    Code: whole held-out source files, smallest-first among those over 2 kB (a sample of
    many modules, not one long one; generated encodings/ tables left out), up to code_bytes. English: held-out docstrings and
    pydoc topics concatenated, cut at a paragraph boundary near english_bytes.
    """
    written: dict[str, list[str]] = {"code": [], "english": []}
    os.makedirs(os.path.join(out_dir, "code"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "english"), exist_ok=True)
    # encodings/ modules are mostly generated character tables: not representative code.
    code = sorted((d for d in docs if d.heldout and d.domain == "code" and len(d.text) > 2000
                   and not d.name.startswith("encodings/")),
                  key=lambda d: (len(d.text), d.name))
    total = 0
    for d in code:
        size = len(d.text.encode("utf-8"))
        if total + size > code_bytes:
            continue
        fname = d.name.replace("/", "__")
        with open(os.path.join(out_dir, "code", fname), "w", encoding="utf-8") as f:
            f.write(d.text)
        written["code"].append(fname)
        total += size
    for label, pred in (("docstrings", lambda d: not d.name.startswith("pydoc_data/")),
                        ("pydoc_topics", lambda d: d.name.startswith("pydoc_data/"))):
        parts = [d.text for d in docs if d.heldout and d.domain == "english" and pred(d)]
        text = "\n\n".join(parts)
        if len(text) > english_bytes // 2:
            text = text[: text.rfind("\n\n", 0, english_bytes // 2)]
        fname = f"{label}.txt"
        with open(os.path.join(out_dir, "english", fname), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        written["english"].append(fname)
    return written


class BatchSampler:
    """Random training windows: [B, S+1] byte ids, a fixed share from each domain, seeded."""

    def __init__(self, streams: dict[str, np.ndarray], seq_len: int, batch: int, code_share: float, seed: int):
        for dom, s in streams.items():
            if len(s) <= seq_len + 1:
                raise ValueError(f"the {dom} training text has {len(s)} bytes; need more than seq_len+1 = {seq_len + 1}")
        self.streams, self.seq_len, self.batch, self.code_share = streams, seq_len, batch, code_share
        self.rng = np.random.default_rng(seed)

    def next(self):
        import torch

        n_code = int(round(self.batch * self.code_share))
        rows = []
        for dom, n in (("code", n_code), ("english", self.batch - n_code)):
            s = self.streams[dom]
            starts = self.rng.integers(0, len(s) - self.seq_len - 1, size=n)
            rows.extend(s[i: i + self.seq_len + 1] for i in starts)
        return torch.from_numpy(np.stack(rows).astype(np.int64))
