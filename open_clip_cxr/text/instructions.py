"""Instruction prefixes (LLM2Vec-style): read by the model, excluded from pooling.

The instruction and the text are joined by the tower's separator token; `CXRTextModel` pools
only the tokens after it. Because the separator is an ordinary special token of the tokenizer,
OpenCLIP's plain `HFTokenizer` handles it, and so does every data loader.
"""
from typing import List, Sequence, Union

# Separator token strings of our tokenizers, by `instruction_separator_id`'s owner.
SEPARATORS = {"byte": "<instruction>", "smollm2": "<file_sep>", "llama3": "<|reserved_special_token_0|>"}

RETRIEVAL_INSTRUCTION = "Retrieve the chest X-ray report that describes the same findings"


def with_instruction(texts: Union[str, Sequence[str]], instruction: str, tokenizer) -> List[str]:
    """Prefix each text with `instruction` and the tokenizer's separator token."""
    if isinstance(texts, str):
        texts = [texts]
    hf = getattr(tokenizer, "tokenizer", tokenizer)  # OpenCLIP's HFTokenizer wraps the HF one
    specials = set(getattr(hf, "all_special_tokens", [])) | set(getattr(hf, "additional_special_tokens", []) or [])
    vocab = hf.get_vocab() if hasattr(hf, "get_vocab") else {}
    sep = next((s for s in SEPARATORS.values() if s in specials or s in vocab), None)
    if sep is None:
        raise ValueError("this tokenizer has no instruction separator token; known: " + ", ".join(SEPARATORS.values()))
    return [f"{instruction.strip()} {sep}{t}" for t in texts]
