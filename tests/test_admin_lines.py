"""Administrative header lines dropped before the tower reads a text (`reports/admin_lines.py`,
the tokenizer's `drop_admin_lines`)."""
import json

import pytest
import torch

from open_clip_cxr.reports.admin_lines import ADMIN_LABELS, drop_admin_lines, is_admin_line

BODY = "FINDINGS: No pneumothorax.\nIMPRESSION: No acute disease."


def test_labelled_admin_lines_are_dropped_and_nothing_else():
    report = ("EXAM: CHEST 2 VIEWS\nClinical  History: cough\n  comparison : none.\nPrior studies: 1/2/2020\n"
              + BODY)
    assert drop_admin_lines(report) == BODY
    # labels only at a line's start, followed by a colon (not a time); other headers stay
    kept = ("Priority: routine\nDISCUSSION: Left effusion.\nFindings: Comparison: none.\nHistory 3 views\n"
            "The study is limited.\nStudy:12 images")
    assert drop_admin_lines(kept) == kept
    assert not is_admin_line("Priorities: none") and is_admin_line("TYPE OF EXAM: PA")


def test_a_line_is_never_cut_and_a_text_is_never_emptied():
    flat = "EXAM: CHEST 2 VIEWS. FINDINGS: No pneumothorax."   # a one-line export: its findings stay
    assert drop_admin_lines(flat) == flat
    only = "Comparison: none.\nTechnique: PA and lateral."    # all admin: a query that means this
    assert drop_admin_lines(only) == only
    assert drop_admin_lines("") == "" and drop_admin_lines("\n\n") == "\n\n"


def test_the_section_parser_reads_the_same_labels():
    """`reports.sections` builds its administrative entries from the frozen table."""
    from open_clip_cxr.reports.sections import split_all_sections
    for key, labels in ADMIN_LABELS.items():
        for label in labels:
            found = split_all_sections(f"{label.upper()}: something\nFINDINGS: No pneumothorax.")
            assert found.get(key) == "something", (label, found)


def test_tokenizer_drops_admin_lines_per_model_config(tmp_path):
    import open_clip
    import open_clip_cxr  # noqa: F401  (registers the configs)
    from open_clip_cxr_convert.export import export_folder
    tok = open_clip.get_tokenizer("cxr-llm-tiny")
    assert tok.drop_admin_lines
    shouted = "EXAM: CHEST 2 VIEWS\nPRIORS: NONE.\nOPINION: NO ACUTE DISEASE."
    assert torch.equal(tok([shouted]), tok(["OPINION: NO ACUTE DISEASE."]))   # then the capitals fold
    # the instruction before a separator is kept; the text after it is judged on its own
    assert torch.equal(tok(["Retrieve the report <file_sep>Exam: chest\nNo PTX."]),
                       tok(["Retrieve the report <file_sep>No PTX."]))
    raw = open_clip.get_tokenizer("cxr-llm-tiny", drop_admin_lines=False)
    assert not torch.equal(raw([shouted]), raw(["OPINION: NO ACUTE DISEASE."]))
    with pytest.raises(ValueError, match="drop_admin_lines must be true or false; got 'yes'"):
        open_clip.get_tokenizer("cxr-llm-tiny", drop_admin_lines="yes")
    # the authors' model keeps the authors' tokenization
    assert "drop_admin_lines" not in open_clip.get_model_config("cxr-llm")["text_cfg"].get("tokenizer_kwargs", {})
    # the option travels with an exported folder
    model = open_clip.create_model("cxr-llm-tiny")
    out = export_folder(model, open_clip.get_model_config("cxr-llm-tiny"), tok, tmp_path / "out", merge_lora=False)
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["text_cfg"]["tokenizer_kwargs"]["drop_admin_lines"] is True
    assert open_clip.get_tokenizer(f"local-dir:{out}").drop_admin_lines

