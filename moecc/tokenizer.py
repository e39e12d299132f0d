"""A byte tokenizer for moecc's trained models: token id = byte value (vocabulary 256).

The shipped models (moecc/trained/) read UTF-8 bytes directly, so there is nothing to
learn or ship for the tokenizer: encode is `list(text.encode())`, decode turns ids back
into bytes and decodes them, replacing an invalid UTF-8 sequence (a model can emit one
mid-character) rather than raising. No special tokens: generation stops on a length.
"""

from __future__ import annotations

VOCAB_SIZE = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids; `__call__` mirrors the transformers tokenizer call shape."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = [i for i in ids if not 0 <= int(i) < VOCAB_SIZE]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the byte range 0..255")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str, return_tensors: str | None = None):
        """{"input_ids": ...}: a list, or a [1, T] LongTensor with return_tensors="pt"."""
        ids = self.encode(text)
        if return_tensors is None:
            return {"input_ids": ids}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (torch) is supported")
        import torch

        return {"input_ids": torch.tensor([ids], dtype=torch.long)}
