"""Evaluation text for `moecc eval`: any UTF-8 text file or folder, split into domains and windows.

Domain of a file, by its extension: source code (CODE_SUFFIXES) -> "code", prose
(.txt, .md, .rst or no extension) -> "english", anything else -> "other". The default data is the
held-out sample shipped with the trained models (moecc/trained/heldout: code/*.py,
english/*.txt), so numbers are comparable across machines.

Text is scored as a byte language model reads it: each domain's files are joined by a
blank line and cut into non-overlapping windows of `seq_len` bytes; within a window every
byte after the first is predicted from the bytes before it (no context crosses windows).
Bad input fails with a message that says what to give instead (EvalDataError).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

CODE_SUFFIXES = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".ts", ".java", ".go", ".rs", ".sh")
PROSE_SUFFIXES = (".txt", ".md", ".rst", "")
DOMAIN_ORDER = ("code", "english", "other")
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", "node_modules"}


class EvalDataError(ValueError):
    """The evaluation data path cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class EvalText:
    path: str
    domain: str
    data: bytes


def domain_of(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in CODE_SUFFIXES:
        return "code"
    if suffix in PROSE_SUFFIXES:
        return "english"
    return "other"


def _files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return found


def _is_binary(data: bytes) -> bool:
    if b"\x00" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def load_texts(path: str) -> list[EvalText]:
    """Every text file at `path` (a file, or a folder searched recursively), with its domain."""
    if not os.path.exists(path):
        raise EvalDataError(f"--data {path}: no such file or folder; give a text file or a folder of text files")
    files = _files_under(path)
    if not files:
        raise EvalDataError(f"--data {path}: the folder holds no files; give a folder with text files "
                            "(.py counts as code, .txt/.md/.rst as English)")
    texts, binary = [], []
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        if _is_binary(data):
            binary.append(f)
        elif data:
            texts.append(EvalText(f, domain_of(f), data))
    if binary:
        shown = ", ".join(binary[:5]) + (f" and {len(binary) - 5} more" if len(binary) > 5 else "")
        raise EvalDataError(f"--data {path}: not UTF-8 text (binary?): {shown}; remove them or point --data "
                            "at a folder of text files only")
    if not texts:
        raise EvalDataError(f"--data {path}: every file is empty; give text to evaluate on")
    return texts


def domain_windows(texts: list[EvalText], seq_len: int, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """{domain: [N, W] byte ids}: each domain's text cut into windows of W = seq_len bytes.

    A domain shorter than one window gives a single shorter window; a domain with fewer
    than 2 bytes (nothing to predict) is left out. max_bytes caps each domain (the
    first max_bytes bytes, in file order).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    out = {}
    for dom in DOMAIN_ORDER:
        data = b"\n\n".join(t.data for t in texts if t.domain == dom)
        if max_bytes is not None:
            data = data[:max_bytes]
        if len(data) < 2:
            continue
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        n = len(ids) // seq_len
        out[dom] = ids[: n * seq_len].view(n, seq_len) if n else ids.view(1, -1)
    if not out:
        raise EvalDataError("the evaluation text has fewer than 2 bytes in every domain; nothing to predict")
    return out
