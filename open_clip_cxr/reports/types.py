"""The two records every report-handling module passes around."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class Report:
    """One radiology study's report, with the images it describes."""
    study_id: str                      # unique within `source`
    source: str                        # "mimic-cxr", "chexpert-plus", "openi", "table", ...
    findings: str = ""                 # cleaned FINDINGS section ("" when absent)
    impression: str = ""               # cleaned IMPRESSION section ("" when absent)
    text: str = ""                     # the full cleaned report (sections joined), what a CLIP model reads
    patient_id: Optional[str] = None   # for patient-level splits
    images: List[Dict] = field(default_factory=list)   # [{"path"|"id", "view", ...}], source-specific
    labels: Dict[str, float] = field(default_factory=dict)  # CheXpert-style labels if the source has them
    split: Optional[str] = None        # "train" / "validate" / "test" when the source defines it
    extra: Dict = field(default_factory=dict)  # anything else worth keeping (MeSH terms, indication, ...)


@dataclass
class Variant:
    """A rewrite of a report: clinically equivalent (a positive) or with exactly one error (a hard negative)."""
    text: str
    style: str                         # e.g. "abbreviate", "impression_only", "laterality_swap"
    equivalent: bool                   # True: same clinical content; False: one clinically significant error
    error_type: Optional[str] = None   # for hard negatives: "laterality", "negation", "severity", "insertion"
