"""Radiology report handling: parsing sources, cleaning, and rewriting reports.

`LLMParaphraser` is imported on first use: only LLM paraphrasing needs torch and
transformers; the readers and the rule-based rewrites are plain Python.
"""
from .clean import clean_text, join_sections, split_sentences
from .lexicon import LEXICON, abbreviate, expand
from .mentions import Mention, classify_edit, extract_mentions, mention_keys
from .parsers import (ReportError, hash_split, iter_chexpert_plus_csv, iter_openi_tgz, iter_table,
                      openi_reports_path, parse_sections, read_mimic_txt, read_openi_xml)
from .types import Report, Variant
from .variants import ERROR_TYPES, VARIANT_STYLES, equivalent_variants, hard_negatives, make_variants

__all__ = [
    "Report", "Variant", "ReportError",
    "clean_text", "split_sentences", "join_sections",
    "parse_sections", "read_mimic_txt", "iter_openi_tgz", "read_openi_xml", "openi_reports_path",
    "iter_chexpert_plus_csv", "iter_table", "hash_split",
    "LEXICON", "abbreviate", "expand",
    "Mention", "extract_mentions", "mention_keys", "classify_edit",
    "VARIANT_STYLES", "ERROR_TYPES", "equivalent_variants", "hard_negatives", "make_variants",
    "LLMParaphraser",
]


def __getattr__(name):
    if name == "LLMParaphraser":
        from .paraphrase import LLMParaphraser
        return LLMParaphraser
    raise AttributeError(name)
