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


def fold_capitals(text: str, threshold: float = FOLD_THRESHOLD) -> str:
    """`text` with each mostly-capital part lower-cased (parts: split at instruction separators)."""
    parts = _SEPARATORS.split(text)
    if len(parts) == 1:
        return text.lower() if is_shouted(text, threshold) else text
    # odd indices are the separators themselves
    return "".join(p if i % 2 or not is_shouted(p, threshold) else p.lower() for i, p in enumerate(parts))
