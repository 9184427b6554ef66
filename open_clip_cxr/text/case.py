"""Case folding of shouted input: a text written mostly in capitals is read in lower case.

Our towers read case (SmolLM2's tokenizer splits `PNEUMOTHORAX` into other pieces than
`pneumothorax`), and reports from some institutions come in capitals. Trained on sentence-case
reports, the tower does not recognise them (style-held-out protocol, README: `caps_headers`
R@1 about 0.12 against a bag of words' 0.98). So a text whose cased letters are more than
`threshold` capitals is lower-cased, whole; any other text, normal mixed case with its
acronyms (`No PTX in the RLL`), is left exactly as it is.

Applied by the tokenizer (`text_cfg.tokenizer_kwargs.fold_capitals`, see `openclip_hooks`),
so training, evaluation, search and plain `open_clip.get_tokenizer` use alike get it, and an
exported folder records it in its `open_clip_config.json`. An instruction prefix is judged
apart from the text it introduces: the text after a separator token or the LLM2Vec marker is
folded on its own, the instruction and the separator are kept.

The rule is self-contained (no lexicon): an exported model tokenizes the same with any later
version of this package's report tables.

`lower_case` is the uncased alternative (`text_cfg.tokenizer_kwargs.lowercase`): every text is
read in lower case, so a shouted report and its sentence-case original tokenize alike, and so do
`RLL` and `rll`. Off in the shipped model configs; a stage-1 recipe turns it on (`lowercase:
true`) and the exported folder records it.
"""
import re

FOLD_THRESHOLD = 0.6

# instruction separators of our tokenizers and the authors' marker (text/instructions.py); kept as they are
_SEPARATORS = re.compile(r"(<file_sep>|<instruction>|<\|reserved_special_token_0\|>|!@#\$%\^&\*\(\))")


def is_shouted(text: str, threshold: float = FOLD_THRESHOLD) -> bool:
    """More than `threshold` of the cased letters of `text` are capitals."""
    upper = lower = 0
    for c in text:
        if c.isupper():
            upper += 1
        elif c.islower():
            lower += 1
    return upper + lower > 0 and upper / (upper + lower) > threshold


def _fold_parts(text: str, fold) -> str:
    """`text` with `fold(part)` applied to each part between instruction separators."""
    parts = _SEPARATORS.split(text)
    # odd indices are the separators themselves
    return "".join(p if i % 2 else fold(p) for i, p in enumerate(parts))


def fold_capitals(text: str, threshold: float = FOLD_THRESHOLD) -> str:
    """`text` with each mostly-capital part lower-cased (parts: split at instruction separators)."""
    return _fold_parts(text, lambda p: p.lower() if is_shouted(p, threshold) else p)


def lower_case(text: str) -> str:
    """`text` lower-cased, its instruction separators kept as they are."""
    return _fold_parts(text, str.lower)
