"""Case folding of shouted input: a text written mostly in capitals is read in sentence case
(or, in exports made before the sentence fold existed, in lower case).

Our towers read case (SmolLM2's tokenizer splits `PNEUMOTHORAX` into other pieces than
`pneumothorax`), and reports from some institutions come in capitals. Trained on sentence-case
reports, the tower does not recognise them (style-held-out protocol, README: `caps_headers`
R@1 about 0.12 against a bag of words' 0.98). So a text whose cased letters are more than
`threshold` capitals is folded, whole; any other text, normal mixed case with its acronyms
(`No PTX in the RLL`), is left exactly as it is.

Two folds (`FOLD_STYLES`). "sentence" (our model configs since 2026-12-05): lower case, then a
capital at the start of the text, of each line and after `.`, `!`, `?` or `:` and a space, so
`FINDINGS: THE LUNGS ARE CLEAR.` reads `Findings: The lungs are clear.`, as the sentence-case
reports the tower was trained on are written. "lower" (`fold_capitals: true`, what earlier exports
record): lower case throughout, so every sentence's first word meets the tower in a form it rarely
saw there. Held-out style protocol, adapter recipe, seeds 0 / 1 / 2: `caps_headers` 0.988 / 0.973 /
0.990 -> 0.993 / 0.990 / 0.993, `hospital_mix` 0.938 / 0.931 / 0.931 -> 0.953 / 0.945 / 0.931
(docs/stage1_heldout_rounds.md, "A sentence-case fold").

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
from typing import Optional

FOLD_THRESHOLD = 0.6
FOLD_STYLES = ("lower", "sentence")

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


def per_part(text: str, fold) -> str:
    """`text` with `fold(part)` applied to each part between instruction separators (the separators kept)."""
    parts = _SEPARATORS.split(text)
    # odd indices are the separators themselves
    return "".join(p if i % 2 else fold(p) for i, p in enumerate(parts))


# a sentence starts the text or a line, or follows end punctuation or a header's colon and a space
_SENTENCE_START = re.compile(r"(^\s*|[.!?:]\s+|\n\s*)([a-z])")


def sentence_case(text: str) -> str:
    """`text` lower-cased, with a capital at the start of the text, of each line and of each
    sentence or header value (after `.`, `!`, `?` or `:` and a space; `3.5 mm` stays as it is)."""
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text.lower())


def fold_style(setting) -> Optional[str]:
    """The fold a `fold_capitals` setting asks for: None (off: false / null), "lower" (true, as
    exports made before the sentence fold record it) or "sentence"."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return "lower"
    if isinstance(setting, str) and setting in FOLD_STYLES:
        return setting
    raise ValueError(f"fold_capitals must be true, false or one of {', '.join(repr(s) for s in FOLD_STYLES)}; "
                     f"got {setting!r}")


_FOLDS = {"lower": str.lower, "sentence": sentence_case}


def fold_capitals(text: str, threshold: float = FOLD_THRESHOLD, style: str = "lower") -> str:
    """`text` with each mostly-capital part folded, lower-cased (`style` "lower") or in sentence
    case ("sentence"); parts are split at instruction separators."""
    fold = _FOLDS[fold_style(style)]
    return per_part(text, lambda p: fold(p) if is_shouted(p, threshold) else p)


def lower_case(text: str) -> str:
    """`text` lower-cased, its instruction separators kept as they are."""
    return per_part(text, str.lower)
