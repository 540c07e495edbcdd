"""Caption tokens from a CLIP BPE tokenizer: start token, BPE tokens, end token, truncated to a
fixed length with the end token kept last (`token_ids`). The two users differ only in length and
padding: StableRep++'s text tower takes what the reference's `clip.tokenize(text,
truncate=True)` produces, 77 ids zero-padded (`clip_token_ids`); Stable Diffusion's text encoder
takes the tokenizer's `model_max_length` ids padded with its pad token
(`generation.captions.sd_prompt_ids`)."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

CONTEXT_LENGTH = 77


def load_tokenizer(directory: str):
    """`transformers.CLIPTokenizer` from a local directory; a clear error when it is not one."""
    from transformers import CLIPTokenizer   # heavy import, only for StableRep++
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data.tokenizer={directory!r} is not a directory")
    try:
        return CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"data.tokenizer={directory!r}: not a CLIP tokenizer directory "
                         f"(vocab.json + merges.txt): {e}") from e


def token_ids(tokenizer, texts: Sequence, length: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 [N, length] ids (start token, BPE tokens, end token, then `pad_id`), and a bool [N]
    mask of the texts longer than `length` that lost their tail (the end token stays last).
    Bytes are decoded as UTF-8."""
    texts = [t.decode("utf-8", errors="replace") if isinstance(t, (bytes, np.bytes_)) else str(t)
             for t in texts]
    full = tokenizer(texts, add_special_tokens=True, truncation=False, padding=False,
                     verbose=False)["input_ids"]
    ids = np.full((len(full), length), pad_id, np.int32)
    truncated = np.zeros(len(full), bool)
    for row, seq in enumerate(full):
        if len(seq) > length:    # keep the start token and the first tokens, end token last
            seq = list(seq[:length - 1]) + [seq[-1]]
            truncated[row] = True
        ids[row, :len(seq)] = seq
    return ids, truncated


def clip_token_ids(tokenizer, captions: Sequence,
                   context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """The text tower's input, int32 [len(captions), context_length], zero-padded as the
    reference's `clip.tokenize(truncate=True)`."""
    return token_ids(tokenizer, captions, context_length, pad_id=0)[0]
