"""Instruction prefixes (LLM2Vec-style): read by the model, excluded from pooling.

Two formats, a per-model setting (`CXRTextConfig.instruction_format`):

- "separator" (our own models): the instruction and the text are joined by the tower's
  separator token; the decoder reads it and `CXRTextModel` pools only the tokens after it. The
  separator is an ordinary special token of the tokenizer, so OpenCLIP's plain `HFTokenizer`
  handles it, and so does every data loader.
- "llm2vec" (the authors' converted models, e.g. `cxr-llm`): exactly as their `LLM2Vec.tokenize`
  and CLIP data collator do. Instruction and text are joined by the marker `!@#$%^&*()`; the
  marker is removed and the joined string is tokenised (with the tokenizer's own special tokens,
  truncated to their max_length); the pooled tokens are the last n, where n is the length of the
  text tokenised alone without special tokens (their `embed_mask`). `LLM2VecTokenizer` does this
  and puts the tower's separator id in front of those n tokens, only as a mark: the tower masks
  it out of attention and positions, so the decoder reads what theirs reads. Their left padding
  is not needed: positions count real tokens only, and RoPE attention depends only on position
  differences, so right padding gives their numbers (tests/test_conversion_parity.py). A text
  without the marker pools all its tokens (their `encode_text`); text is not whitespace-cleaned
  (theirs is not). `open_clip_cxr.get_tokenizer` returns this tokenizer for models whose
  `text_cfg.tokenizer_mode` is "llm2vec" (an OpenCLIP field; plain `open_clip.get_tokenizer`
  tokenises such models' plain texts the same, but does not understand the marker).
"""
from typing import List, Sequence, Union

import torch

# Separator token strings of our tokenizers, by `instruction_separator_id`'s owner.
SEPARATORS = {"byte": "<instruction>", "smollm2": "<file_sep>", "llama3": "<|reserved_special_token_0|>"}
LLM2VEC_MARKER = "!@#$%^&*()"   # the authors' instruction/text marker (llm2vec)

RETRIEVAL_INSTRUCTION = "Retrieve the chest X-ray report that describes the same findings"


def _hf(tokenizer):
    return getattr(tokenizer, "tokenizer", tokenizer)  # OpenCLIP's HFTokenizer wraps the HF one


def separator_token(tokenizer) -> str:
    """The instruction separator token of `tokenizer` (one of SEPARATORS)."""
    hf = _hf(tokenizer)
    specials = set(getattr(hf, "all_special_tokens", [])) | set(getattr(hf, "additional_special_tokens", []) or [])
    vocab = hf.get_vocab() if hasattr(hf, "get_vocab") else {}
    sep = next((s for s in SEPARATORS.values() if s in specials or s in vocab), None)
    if sep is None:
        raise ValueError("this tokenizer has no instruction separator token; known: " + ", ".join(SEPARATORS.values()))
    return sep


def with_instruction(texts: Union[str, Sequence[str]], instruction: str, tokenizer) -> List[str]:
    """Prefix each text with `instruction`, in the format of the model `tokenizer` belongs to."""
    if isinstance(texts, str):
        texts = [texts]
    if getattr(tokenizer, "instruction_format", None) == "llm2vec":
        # `LLM2Vec._convert_to_str`: "<instruction> !@#$%^&*()<text>"
        return [f"{instruction.strip()} {LLM2VEC_MARKER}{t}" for t in texts]
    sep = separator_token(tokenizer)
    return [f"{instruction.strip()} {sep}{t}" for t in texts]


class LLM2VecTokenizer:
    """OpenCLIP-style tokenizer (texts -> LongTensor [B, context_length]) in the authors' format.

    Wraps OpenCLIP's `HFTokenizer` for the same model. One of the `context_length` slots is
    reserved for the mark, so the joined text is truncated to `context_length - 1` tokens (the
    authors' max_length; `cxr-llm` sets 513 for their 512).
    """

    instruction_format = "llm2vec"

    def __init__(self, hf_tokenizer, context_length: int):
        self.base = hf_tokenizer
        self.tokenizer = _hf(hf_tokenizer)
        self.context_length = context_length
        self.marker_id = self.tokenizer.convert_tokens_to_ids(separator_token(self.tokenizer))
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.tokenizer.eos_token_id if pad is None else pad

    def save_pretrained(self, dest):
        self.tokenizer.save_pretrained(dest)

    def encode_one(self, text: str, max_length: int) -> List[int]:
        parts = text.split(LLM2VEC_MARKER)
        ids = list(self.tokenizer("".join(parts), truncation=True, max_length=max_length)["input_ids"])
        if len(parts) > 1:   # as theirs: the text is the part right after the first marker
            n = len(self.tokenizer(parts[1], add_special_tokens=False, truncation=True,
                                   max_length=max_length)["input_ids"])
            if n > 0:        # (no text tokens: pool everything rather than nothing)
                ids.insert(max(len(ids) - n, 0), self.marker_id)
        return ids

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        fold = getattr(self.base, "fold", None)    # `text_cfg.tokenizer_kwargs.fold_capitals` (openclip_hooks)
        texts = fold(texts) if fold is not None else texts
        out = torch.full((len(texts), ctx), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode_one(text, ctx - 1)
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
