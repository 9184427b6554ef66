"""Rebuild `byte/`: the download-free byte-level tokenizer of `cxr-llm-tiny`.

Run `python -m open_clip_cxr.text.tokenizers.build_byte_tokenizer` to regenerate. Ids 0-3 are
<pad>, <s>, </s>, <instruction>; ids 4-259 are the 256 byte symbols, so any text encodes
and the vocabulary stays at 260 (a tiny model's embedding table stays tiny).
"""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<instruction>"]


def build(out_dir: Path) -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<instruction>"], model_max_length=1024)
    tok.save_pretrained(out_dir)
    return tok


if __name__ == "__main__":
    build(Path(__file__).parent / "byte")
