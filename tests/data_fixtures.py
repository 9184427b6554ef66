"""Small dataset layouts built inside a test's tmp dir from real radiographs and hand-written reports.

Real images: the adult PA DICOM shipped with pydicom-data and the paediatric chest JPEGs of
pneumonia-model-package. Reports are written here by hand (no Open-I / MIMIC text).
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
from PIL import Image

REPORTS = [
    ("The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
     "No acute cardiopulmonary process."),
    ("Patchy opacity in the right lower lobe. No pleural effusion. Heart size is normal.",
     "Right lower lobe pneumonia."),
    ("Small left pleural effusion with adjacent atelectasis. Mild cardiomegaly.",
     "Small left effusion. Mild cardiomegaly."),
    ("Diffuse interstitial markings, worse at the bases. No focal consolidation.",
     "Findings suggest mild interstitial edema."),
    ("Endotracheal tube terminates 4 cm above the carina. Lungs are clear.",
     "Lines and tubes in standard position."),
    ("Hyperinflated lungs with flattened diaphragms. No focal opacity.",
     "Hyperinflation, consistent with COPD."),
]


def jpeg_paths() -> List[Path]:
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None:
        pytest.skip("pneumonia-model-package not installed (see requirements-assets.txt)")
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "pneumonia-data" / "val"
    paths = sorted(root.rglob("*.jpeg"))
    if not paths:
        pytest.skip("no JPEGs in pneumonia-model-package")
    return paths


def dicom_path() -> Path:
    data = pytest.importorskip("pydicom.data")
    path = data.get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data not installed")
    return Path(path)


def small_copy(src: Path, dst: Path, side: int = 320, fmt: str = None) -> Path:
    """A real radiograph, downscaled so tests stay fast; still a real film."""
    from open_clip_cxr.vision.io import load_image
    img = load_image(src, mode="L")
    img.thumbnail((side, side))
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst, format=fmt or ("JPEG" if dst.suffix.lower() in (".jpg", ".jpeg") else "PNG"))
    return dst


def truncated_copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])
    return dst


def report_text(i: int, header: str = "") -> str:
    findings, impression = REPORTS[i % len(REPORTS)]
    return f"{header}FINDINGS: {findings}\n\nIMPRESSION: {impression}\n"


# ---------------------------------------------------------------- MIMIC-CXR-JPG

def _write_csv_gz(path: Path, header: List[str], rows: List[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())


def make_mimic(root: Path, n_studies: int = 4, bad: bool = False) -> Dict[str, object]:
    """MIMIC-CXR-JPG layout: 2 images per study (PA + LATERAL), official split/metadata/chexpert tables.

    With `bad`, adds one study per bad-input kind; returns the expected counts.
    """
    jpgs = jpeg_paths()
    split_rows, meta_rows, label_rows = [], [], []
    splits = ["train", "train", "validate", "test"]
    rep_root = root / "mimic-cxr-reports"

    def study(i, subject, study_id, report_bytes, images):
        folder = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}"
        if report_bytes is not None:
            (rep_root / folder.parent).mkdir(parents=True, exist_ok=True)
            (rep_root / folder.parent / f"s{study_id}.txt").write_bytes(report_bytes)
        for j, (dicom, maker) in enumerate(images):
            if maker is not None:
                maker(root / folder / f"{dicom}.jpg")
            split_rows.append([dicom, study_id, subject, splits[i % len(splits)]])
            meta_rows.append([dicom, subject, study_id, "PA" if j == 0 else "LATERAL"])
        label_rows.append([subject, study_id, "1.0" if i % 2 else "", "0.0", "-1.0" if i % 3 == 0 else ""])

    good = 0
    for i in range(n_studies):
        subject, study_id = f"1{i:07d}", f"5{i:07d}"
        text = report_text(i, header="                                 FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n")
        study(i, subject, study_id, text.encode(), [
            (f"d{i:03d}a", lambda p, s=jpgs[(2 * i) % len(jpgs)]: small_copy(s, p)),
            (f"d{i:03d}b", lambda p, s=jpgs[(2 * i + 1) % len(jpgs)]: small_copy(s, p))])
        good += 2
    expected = {"samples": good, "skipped": {}}
    if bad:
        one = lambda p: small_copy(jpgs[0], p)  # noqa: E731
        study(90, "19000090", "59000090", report_text(1).encode(),
              [("truncated", lambda p: truncated_copy(jpgs[1], p))])
        study(91, "19000091", "59000091", report_text(2).encode(), [("missing", None)])
        study(92, "19000092", "59000092", b"   \n", [("emptyrep", one)])
        study(93, "19000093", "59000093", "FINDINGS: Kein Erguss. Gr\u00f6\u00dfe normal.".encode("latin-1"),
              [("latin1rep", one)])
        study(94, "19000094", "59000094", report_text(3).encode(), [("dup", one)])
        split_rows.append(list(split_rows[-1]))  # the same image listed twice -> same key
        expected["samples"] += 1
        expected["skipped"] = {"unreadable-image": 1, "missing-file": 1, "empty-report": 1,
                               "non-utf8-report": 1, "duplicate-key": 1}
    _write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
                  meta_rows)
    _write_csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz",
                  ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Edema"], label_rows)
    return expected


# ---------------------------------------------------------------- Open-I

def openi_xml(uid: str, findings: str, impression: str, image_ids: List[str]) -> str:
    images = "".join(f'<parentImage id="{i}"><figureId>F{n}</figureId><caption>Chest, 2 views</caption>'
                     f"</parentImage>" for n, i in enumerate(image_ids, 1))
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr" /><uId id="{uid}" />'
            f'<pmcId id="{uid[3:]}" /><MedlineCitation Owner="Indiana University" Status="supplied">'
            f"<Article PubModel=\"Electronic\"><Journal><JournalIssue><PubDate><Year>2013</Year></PubDate>"
            f"</JournalIssue></Journal><ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>"
            f'<Abstract><AbstractText Label="COMPARISON">None.</AbstractText>'
            f'<AbstractText Label="INDICATION">Cough.</AbstractText>'
            f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
            f'<AbstractText Label="IMPRESSION">{impression}</AbstractText></Abstract></Article></MedlineCitation>'
            f"<MeSH><major>normal</major></MeSH>{images}</eCitation>\n")


def make_openi(root: Path, n_reports: int = 4) -> Dict[str, Path]:
    """Open-I layout: ecgen-radiology/*.xml (written here) + NLMCXR_png/<parentImage id>.png.

    The last report's second image is the real DICOM, converted to PNG.
    """
    jpgs = jpeg_paths()
    xml_dir, png_dir = root / "ecgen-radiology", root / "NLMCXR_png"
    xml_dir.mkdir(parents=True)
    n_images = 0
    for i in range(1, n_reports + 1):
        ids = [f"CXR{i}_1_IM-{i:04d}-1001", f"CXR{i}_1_IM-{i:04d}-2001"]
        findings, impression = REPORTS[i % len(REPORTS)]
        (xml_dir / f"{i}.xml").write_text(openi_xml(f"CXR{i}", findings, impression, ids), encoding="utf-8")
        small_copy(jpgs[i % len(jpgs)], png_dir / f"{ids[0]}.png")
        src = dicom_path() if i == n_reports else jpgs[(i + 7) % len(jpgs)]
        small_copy(src, png_dir / f"{ids[1]}.png")
        n_images += 2
    return {"reports": xml_dir, "images": png_dir, "n_images": n_images}


# ---------------------------------------------------------------- CheXpert Plus

def make_chexpert_plus(root: Path) -> Dict[str, int]:
    """The CheXpert Plus csv (one row per image) with images stored as in the PNG release:
    `PNG/<path_to_image with .png>`. The third study has no report text."""
    jpgs = jpeg_paths()
    header = ["path_to_image", "frontal_lateral", "ap_pa", "deid_patient_id", "report", "section_findings",
              "section_impression", "split"]
    f1, i1 = REPORTS[1]
    f2, i2 = REPORTS[2]
    rows = [
        ["train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA", "patient00001", "", f1, i1, "train"],
        ["train/patient00001/study1/view2_lateral.jpg", "Lateral", "", "patient00001", "", f1, i1, "train"],
        ["valid/patient00002/study1/view1_frontal.jpg", "Frontal", "AP", "patient00002",
         f"FINDINGS: {f2} IMPRESSION: {i2}", "", "", "valid"],
        ["train/patient00003/study1/view1_frontal.jpg", "Frontal", "AP", "patient00003", "", "", "", "train"],
    ]
    for i, r in enumerate(rows):
        small_copy(jpgs[i], (root / "PNG" / r[0]).with_suffix(".png"), side=96)
    with open(root / "df_chexpert_plus.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return {"images": 3}


# ---------------------------------------------------------------- generic table

def make_table(root: Path, n: int = 6, fmt: str = "csv") -> Dict[str, object]:
    """A csv/jsonl with relative image paths (JPEGs and the real DICOM itself) and report columns."""
    jpgs = jpeg_paths()
    rows = []
    for i in range(n):
        if i == n - 1:
            rel = "imgs/adult_pa.dcm"
            (root / "imgs").mkdir(parents=True, exist_ok=True)
            shutil.copy(dicom_path(), root / rel)
        else:
            rel = f"imgs/img{i}.jpg"
            small_copy(jpgs[i % len(jpgs)], root / rel)
        findings, impression = REPORTS[i % len(REPORTS)]
        rows.append({"image": rel, "report": f"FINDINGS: {findings} IMPRESSION: {impression}",
                     "patient": f"pt{i // 2}"})
    path = root / f"table.{fmt}"
    if fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"table": path, "rows": rows}


def tiny_image(path: Path, value: int = 128, size=(40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path

