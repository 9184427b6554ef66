"""Report readers on hand-written reports in each source's real layout (no dataset text)."""
import csv
import io
import json
import logging
import tarfile
from collections import Counter

import pytest

from open_clip_cxr.reports import (Report, ReportError, clean_text, hash_split, iter_chexpert_plus_csv,
                                   iter_openi_tgz, iter_table, openi_reports_path, parse_sections,
                                   read_mimic_txt, read_openi_xml, split_sentences)
from open_clip_cxr.reports import parsers

# ---------------------------------------------------------------- hand-written MIMIC-CXR style reports

MIMIC_MODERN = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___F with productive cough and fever  // eval for pneumonia
 
 TECHNIQUE:  Chest PA and lateral
 
 COMPARISON:  ___
 
 FINDINGS: 
 
 The cardiomediastinal silhouette is within normal limits.  There is a small left
 pleural effusion with adjacent atelectasis.  No pneumothorax.  The right lung is
 clear.  Degenerative changes of the thoracic spine.
 
 IMPRESSION: 
 
 1. Small left pleural effusion.
 2. No pneumothorax.
 
 NOTIFICATION:  The findings were discussed with Dr. ___ by telephone at 3:15 p.m.
"""

MIMIC_OLD = """                                 FINAL REPORT
 HISTORY:  Shortness of breath, rule out CHF.
 
 PA AND LATERAL VIEWS OF THE CHEST:  Comparison is made to prior study from ___.
 The heart is mildly enlarged.  There is mild pulmonary vascular congestion
 without frank edema.  No pleural effusion.
 
 Conclusion:  Mild cardiomegaly and vascular congestion.
"""

MIMIC_SAME_LINE = """FINAL REPORT
INDICATION: Intubated patient, ET tube placement.
Findings: ETT tip 4 cm above the carina. Right IJ line tip in the SVC. No PTX.
impression: Lines and tubes as described. No pneumothorax.
"""

MIMIC_NO_HEADERS = """                                 FINAL REPORT
 Portable semi-upright radiograph.  Stable moderate cardiomegaly.  No acute change.
"""

MIMIC_WET_READ = """WET READ: ___ ___ 8:30 PM
  No pneumothorax.
 ______________________________________________________________________________
                                 FINAL REPORT
 PORTABLE AP CHEST RADIOGRAPH
 
 Right-sided chest tube in place.  Tiny right apical pneumothorax.
 
 IMPRESSION:  Tiny right apical pneumothorax, unchanged.
"""


def test_clean_text_normalises_marks_numbering_and_spacing():
    assert clean_text("1. No acute process .\n 2) Stable cardiomegaly ,unchanged.") == \
        "No acute process. Stable cardiomegaly, unchanged."
    assert clean_text("Normal chest x-XXXX. XXXX XXXX effusion; ____ and __ .") == \
        "Normal chest x-___. ___ effusion; ___ and ___."
    assert clean_text("Nodule measures 1.5 cm.Follow-up  in 3 months ( CT )") == \
        "Nodule measures 1.5 cm. Follow-up in 3 months (CT)"
    assert clean_text("") == "" and clean_text("  \n ") == ""


def test_split_sentences_respects_abbreviations_and_decimals():
    text = ("Pt s/p CABG. Nodule measures 1.5 cm. Devices, e.g. PICC, are seen. "
            "Dr. ___ was paged at 3:15 p.m. The lungs are clear! Is there effusion? No.")
    assert split_sentences(text) == [
        "Pt s/p CABG.", "Nodule measures 1.5 cm.", "Devices, e.g. PICC, are seen.",
        "Dr. ___ was paged at 3:15 p.m.", "The lungs are clear!", "Is there effusion?", "No."]
    assert split_sentences("") == []
    assert split_sentences("No effusion") == ["No effusion"]


def test_parse_sections_modern_mimic_layout():
    s = parse_sections(MIMIC_MODERN)
    assert set(s) == {"findings", "impression", "indication", "comparison", "technique", "history"}
    assert s["findings"].startswith("The cardiomediastinal silhouette is within normal limits. There is a small left")
    assert "Degenerative changes of the thoracic spine." in s["findings"]
    assert s["impression"] == "Small left pleural effusion. No pneumothorax."     # numbering stripped
    assert s["indication"] == "___F with productive cough and fever // eval for pneumonia"
    assert s["comparison"] == "___"
    assert s["technique"] == "Chest PA and lateral"
    assert s["history"] == ""
    assert "discussed" not in s["impression"]      # NOTIFICATION ends the impression


def test_parse_sections_old_layout_and_conclusion_synonym():
    s = parse_sections(MIMIC_OLD)
    assert s["history"] == "Shortness of breath, rule out CHF."
    assert s["impression"] == "Mild cardiomegaly and vascular congestion."
    assert s["findings"] == ""      # no FINDINGS header: the readers fall back to the exam-title text
    r = read_mimic_txt(MIMIC_OLD, study_id="s1")
    assert r.findings.startswith("Comparison is made to prior study from ___. The heart is mildly enlarged.")
    assert r.text == r.findings + " " + r.impression


def test_parse_sections_same_line_mixed_case_and_missing():
    s = parse_sections(MIMIC_SAME_LINE)
    assert s["findings"] == "ETT tip 4 cm above the carina. Right IJ line tip in the SVC. No PTX."
    assert s["impression"] == "Lines and tubes as described. No pneumothorax."
    assert s["indication"] == "Intubated patient, ET tube placement."
    assert s["comparison"] == "" and s["technique"] == ""
    one_line = parse_sections("Findings: Heart normal. Lungs clear. Impression: No acute disease.")
    assert one_line["findings"] == "Heart normal. Lungs clear." and one_line["impression"] == "No acute disease."
    assert parse_sections("") == {k: "" for k in one_line}


def test_organ_subheadings_stay_in_findings():
    s = parse_sections("FINDINGS:\nLUNGS: Clear.\nHEART: Normal size.\nIMPRESSION: Normal.")
    assert s["findings"] == "LUNGS: Clear. HEART: Normal size."
    assert s["impression"] == "Normal."


def test_read_mimic_txt_from_file_with_ids_from_layout(tmp_path):
    d = tmp_path / "files" / "p10" / "p10000032"
    d.mkdir(parents=True)
    f = d / "s50414267.txt"
    f.write_text(MIMIC_MODERN)
    r = read_mimic_txt(f)
    assert isinstance(r, Report)
    assert (r.study_id, r.patient_id, r.source) == ("50414267", "10000032", "mimic-cxr")
    assert r.impression == "Small left pleural effusion. No pneumothorax."
    assert r.extra["indication"].startswith("___F")
    assert r.text.startswith(r.findings) and r.text.endswith(r.impression)
    assert read_mimic_txt(str(f), study_id="x", patient_id="y").study_id == "x"


def test_read_mimic_txt_fallbacks():
    r = read_mimic_txt(MIMIC_NO_HEADERS, study_id="s2")
    assert r.findings == ""
    assert r.impression == "Portable semi-upright radiograph. Stable moderate cardiomegaly. No acute change."
    r = read_mimic_txt(MIMIC_WET_READ, study_id="s3")
    assert r.findings == "Right-sided chest tube in place. Tiny right apical pneumothorax."
    assert r.impression == "Tiny right apical pneumothorax, unchanged."
    assert "8:30" not in r.text


def test_read_mimic_txt_bad_inputs(tmp_path):
    empty = tmp_path / "s1.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(ReportError, match="s1.txt.*empty"):
        read_mimic_txt(empty)
    headers_only = tmp_path / "s2.txt"
    headers_only.write_text("FINAL REPORT\nFINDINGS:\n\nIMPRESSION:\n")
    with pytest.raises(ReportError, match="s2.txt.*empty"):
        read_mimic_txt(headers_only)
    latin1 = tmp_path / "s3.txt"
    latin1.write_bytes("IMPRESSION: Effusion \u00e9tendue.".encode("latin-1"))
    with pytest.raises(ReportError, match="s3.txt.*UTF-8"):
        read_mimic_txt(latin1)
    with pytest.raises(ReportError, match="not found"):
        read_mimic_txt(tmp_path / "missing.txt")
    assert issubclass(ReportError, ValueError)


# ---------------------------------------------------------------- Open-I (hand-written XML, real layout)

OPENI_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <pmcId id="{n}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{n}"/>
   <licenseType>open-access</licenseType>
   <MedlineCitation>
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">{comparison}</AbstractText>
            <AbstractText Label="INDICATION">{indication}</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
      {mesh}
   </MeSH>
   {images}
</eCitation>
"""


def _openi_xml(n, findings, impression, comparison="XXXX chest films.", indication="XXXX-year-old with cough",
               mesh=("<major>normal</major>",), image_ids=()):
    images = "\n".join(f'<parentImage id="{i}"><figureId>F1</figureId><caption>Frontal chest film'
                       f'</caption></parentImage>' for i in image_ids)
    return OPENI_XML.format(n=n, findings=findings, impression=impression, comparison=comparison,
                            indication=indication, mesh="\n".join(mesh), images=images).encode("utf-8")


def _write_tgz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("ecgen-radiology")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def openi_tgz(tmp_path):
    members = [
        ("1.xml", _openi_xml(1, "The heart is normal in size. The lungs are clear. No pneumothorax or pleural "
                                "effusion. XXXX degenerative changes of the spine.",
                             "No acute abnormality on this chest x-XXXX.", image_ids=("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"))),
        ("2.xml", _openi_xml(2, "", "1. Small right pleural effusion. 2. No focal consolidation.",
                             mesh=("<major>Pleural Effusion/right/small</major>",
                                   "<automatic>pleural effusion</automatic>"),
                             image_ids=("CXR2_IM-0652-1001",))),
        ("3.xml", _openi_xml(3, "", "")),                                    # empty report
        ("4.xml", "<eCitation><uId id='CXR4'/><Abstract>".encode()),          # truncated XML
        ("5.xml", _openi_xml(5, "Stable cardiomegaly.", "No acute disease.").replace(b"Stable", b"\xe9table")),
    ]
    path = tmp_path / "NLMCXR_reports.tgz"
    _write_tgz(path, members)
    return path


def test_iter_openi_tgz_reads_reports_and_counts_bad_ones(openi_tgz):
    errors = []
    reports = list(iter_openi_tgz(openi_tgz, on_error=errors.append))
    assert [r.study_id for r in reports] == ["CXR1", "CXR2"]
    r1, r2 = reports
    assert r1.source == "openi"
    assert r1.findings.endswith("___ degenerative changes of the spine.")
    assert r1.impression == "No acute abnormality on this chest x-___."
    assert r1.images == [{"id": "CXR1_1_IM-0001-3001"}, {"id": "CXR1_1_IM-0001-4001"}]
    assert r1.extra["mesh_major"] == ["normal"] and r1.extra["mesh_automatic"] == []
    assert r1.extra["indication"] == "___-year-old with cough"
    assert r1.split in ("train", "validate", "test") and r1.split == hash_split("CXR1")
    assert r2.findings == "" and r2.impression == "Small right pleural effusion. No focal consolidation."
    assert r2.extra["mesh_major"] == ["Pleural Effusion/right/small"]
    assert r2.extra["mesh_automatic"] == ["pleural effusion"]
    assert len(errors) == 3 and all(isinstance(e, ReportError) for e in errors)
    msgs = " ".join(map(str, errors))
    assert "3.xml" in msgs and "empty" in msgs
    assert "4.xml" in msgs and "XML" in msgs
    assert "5.xml" in msgs and "UTF-8" in msgs


def test_iter_openi_tgz_default_skips_with_warning_and_raise_mode(openi_tgz, caplog):
    with caplog.at_level(logging.WARNING):
        assert len(list(iter_openi_tgz(openi_tgz))) == 2
    assert "skipped 3" in caplog.text
    with pytest.raises(ReportError, match="3.xml"):
        list(iter_openi_tgz(openi_tgz, on_error="raise"))
    with pytest.raises(ReportError, match="not found"):
        list(iter_openi_tgz(openi_tgz.parent / "nope.tgz"))


def test_read_openi_xml_from_path_and_bytes(tmp_path):
    data = _openi_xml(7, "Left lower lobe opacity.", "Left lower lobe pneumonia.", image_ids=("CXR7_IM-1-1001",))
    f = tmp_path / "7.xml"
    f.write_bytes(data)
    for src in (f, str(f), data):
        r = read_openi_xml(src)
        assert r.study_id == "CXR7" and r.images == [{"id": "CXR7_IM-1-1001"}]
        assert r.text == "Left lower lobe opacity. Left lower lobe pneumonia."
    with pytest.raises(ReportError, match="not found"):
        read_openi_xml(tmp_path / "missing.xml")


def test_openi_reports_path(monkeypatch):
    try:
        p = openi_reports_path()
        assert p.name == "NLMCXR_reports.tgz" and p.is_file()
    except FileNotFoundError:
        pass     # torchxrayvision not installed here: the message is checked below
    monkeypatch.setattr(parsers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps torchxrayvision==1\.5\.7"):
        openi_reports_path()


# ---------------------------------------------------------------- CheXpert Plus CSV

CHEXPERT_COLUMNS = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
                    "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
                    "section_history", "section_comparison", "section_technique", "section_procedure_comments",
                    "section_findings", "section_impression", "section_end_of_impression", "section_summary",
                    "section_accession_number", "age", "sex", "split"]


def _chexpert_row(image, patient, findings="", impression="", report="", split="train", view="Frontal",
                  ap_pa="AP", history=""):
    row = dict.fromkeys(CHEXPERT_COLUMNS, "")
    row.update(path_to_image=image, path_to_dcm=image.replace(".jpg", ".dcm"), frontal_lateral=view,
               ap_pa=ap_pa if view == "Frontal" else "", deid_patient_id=patient, patient_report_date_order="1",
               report=report, section_findings=findings, section_impression=impression,
               section_history=history, age="67", sex="Female", split=split)
    return row


def _write_csv(path, columns, rows, encoding="utf-8"):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))


def test_iter_chexpert_plus_csv_groups_images_by_study(tmp_path):
    f1 = "Heart size is normal.\nLungs are clear. No pleural effusion or pneumothorax."
    rows = [
        _chexpert_row("train/patient00001/study1/view1_frontal.jpg", "patient00001", findings=f1,
                      impression="1. No acute cardiopulmonary abnormality.", history="Chest pain."),
        _chexpert_row("train/patient00001/study1/view2_lateral.jpg", "patient00001", findings=f1,
                      impression="1. No acute cardiopulmonary abnormality.", view="Lateral"),
        _chexpert_row("train/patient00002/study3/view1_frontal.jpg", "patient00002", split="valid",
                      report="NARRATIVE:\nPORTABLE CHEST\nFINDINGS: ETT tip 5 cm above the carina. Mild "
                             "bibasilar atelectasis.\nIMPRESSION: Satisfactory ETT position."),
        _chexpert_row("train/patient00003/study1/view1_frontal.jpg", "patient00003"),   # no report at all
        _chexpert_row("train/patient00001/study2/view1_frontal.jpg", "patient00001",
                      impression="Interval development of a small right pleural effusion."),
    ]
    path = tmp_path / "df_chexpert_plus_240401.csv"
    _write_csv(path, CHEXPERT_COLUMNS, rows)
    errors = []
    reports = {r.study_id: r for r in iter_chexpert_plus_csv(path, on_error=errors.append)}
    assert list(reports) == ["train/patient00001/study1", "train/patient00002/study3", "train/patient00001/study2"]
    r = reports["train/patient00001/study1"]
    assert r.source == "chexpert-plus" and r.patient_id == "patient00001" and r.split == "train"
    assert [i["path"] for i in r.images] == ["train/patient00001/study1/view1_frontal.jpg",
                                             "train/patient00001/study1/view2_lateral.jpg"]
    assert [i["view"] for i in r.images] == ["Frontal", "Lateral"]
    assert r.findings == "Heart size is normal. Lungs are clear. No pleural effusion or pneumothorax."
    assert r.impression == "No acute cardiopulmonary abnormality."
    assert r.extra["history"] == "Chest pain."
    r = reports["train/patient00002/study3"]
    assert r.split == "validate"
    assert r.findings == "ETT tip 5 cm above the carina. Mild bibasilar atelectasis."
    assert r.impression == "Satisfactory ETT position."
    assert reports["train/patient00001/study2"].findings == ""
    assert len(errors) == 1 and "patient00003/study1" in str(errors[0])


# ---------------------------------------------------------------- generic CSV / JSONL exports

def test_iter_table_csv_impression_only_and_report_column(tmp_path):
    rows = [
        {"accession": "A1", "mrn": "M1", "image": "img/a1_pa.png", "report": "No acute cardiopulmonary process."},
        {"accession": "A1", "mrn": "M1", "image": "img/a1_lat.png", "report": "No acute cardiopulmonary process."},
        {"accession": "A2", "mrn": "M2", "image": "img/a2.png",
         "report": "FINDINGS: Small left effusion. IMPRESSION: Small left pleural effusion, new."},
        {"accession": "A3", "mrn": "M3", "image": "img/a3.png", "report": ""},
        {"accession": "A4", "mrn": "M3", "image": "img/a4a.png;img/a4b.png",
         "report": "1. Moderate cardiomegaly.\n2. Mild interstitial edema."},
    ]
    path = tmp_path / "export.csv"
    _write_csv(path, ["accession", "mrn", "image", "report"], rows)
    errors = []
    reports = list(iter_table(path, study_col="accession", patient_col="mrn", on_error=errors.append))
    assert [r.study_id for r in reports] == ["A1", "A2", "A4"]
    a1, a2, a4 = reports
    assert a1.images == [{"path": "img/a1_pa.png"}, {"path": "img/a1_lat.png"}]
    assert (a1.findings, a1.impression) == ("", "No acute cardiopulmonary process.")
    assert (a2.findings, a2.impression) == ("Small left effusion.", "Small left pleural effusion, new.")
    assert a4.impression == "Moderate cardiomegaly. Mild interstitial edema."
    assert a4.images == [{"path": "img/a4a.png"}, {"path": "img/a4b.png"}]
    assert a1.source == "table" and a1.patient_id == "M1" and a1.split == hash_split("M1")
    assert len(errors) == 1 and "A3" in str(errors[0]) and "export.csv" in str(errors[0])


def test_iter_table_separate_columns_split_and_bad_bytes(tmp_path):
    header = b"id,png,findings,impression,set\n"
    good = b"1,p1.png,Clear lungs.,No acute disease.,val\n"
    bad = b"2,p2.png,Effusion \xe9tendue.,Effusion.,train\n"
    good2 = b"3,p3.png,,Right upper lobe pneumonia.,test\n"
    path = tmp_path / "export.csv"
    path.write_bytes(header + good + bad + good2)
    errors = []
    reports = list(iter_table(path, image_col="png", findings_col="findings", impression_col="impression",
                              study_col="id", split_col="set", on_error=errors.append))
    assert [(r.study_id, r.split) for r in reports] == [("1", "validate"), ("3", "test")]
    assert reports[0].text == "Clear lungs. No acute disease."
    assert len(errors) == 1 and "UTF-8" in str(errors[0]) and "export.csv:3" in str(errors[0])


def test_iter_table_jsonl(tmp_path):
    lines = [
        json.dumps({"study": "S1", "images": ["a.png", "b.png"], "impression": "No pneumothorax."}).encode(),
        b"",
        b"{not json",
        json.dumps({"study": "S2", "images": "c.png", "impression": None}).encode(),
        "{\"study\": \"S3\", \"images\": \"d.png\", \"impression\": \"Stable \xe9\"}".encode("latin-1"),
        json.dumps({"study": "S4", "images": "e.png", "impression": "Mild pulmonary edema."}).encode(),
    ]
    path = tmp_path / "export.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    errors = []
    reports = list(iter_table(path, image_col="images", impression_col="impression", on_error=errors.append))
    assert [r.impression for r in reports] == ["No pneumothorax.", "Mild pulmonary edema."]
    assert reports[0].images == [{"path": "a.png"}, {"path": "b.png"}]
    assert reports[0].study_id == "a.png"     # no study column: one study per row, named by its image
    assert len(errors) == 3
    msgs = " | ".join(map(str, errors))
    assert "export.jsonl:3" in msgs and "export.jsonl:4" in msgs and "export.jsonl:5" in msgs


def test_iter_table_missing_file(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        list(iter_table(tmp_path / "nope.csv"))
    with pytest.raises(ReportError, match="not found"):
        list(iter_table(tmp_path / "nope.jsonl"))


def test_hash_split_is_deterministic_and_proportional():
    assert hash_split("CXR1") == hash_split("CXR1")
    counts = Counter(hash_split(f"patient{i}") for i in range(20000))
    assert set(counts) == {"train", "validate", "test"}
    assert abs(counts["validate"] / 20000 - 0.1) < 0.01 and abs(counts["test"] / 20000 - 0.1) < 0.01
    assert Counter(hash_split(f"p{i}", val=0.0, test=0.5) for i in range(2000))["validate"] == 0
