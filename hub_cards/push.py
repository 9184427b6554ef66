"""Upload an exported folder to the Hugging Face Hub in one commit.

Before anything is sent the folder must load through OpenCLIP (`local-dir:`), tokenize and run
one forward pass. The uploaded `open_clip_config.json` names the repo as `hf_tokenizer_name`, so
`open_clip.get_tokenizer('hf-hub:ORG/NAME')` finds the tokenizer uploaded next to it. Only
known file types are sent (weights as safetensors only). The token comes from `HF_TOKEN` or
the standard `huggingface-cli login`, as huggingface_hub resolves it.
"""
import fnmatch
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from open_clip_cxr.errors import UsageError

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# What a release folder may contain. Anything else (a stray CSV of reports, a pickle) stays home.
ALLOWED = ("open_clip_config.json", "config.json", "*.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
           "added_tokens.json", "chat_template.jinja", "adapter.json", "LICENSE", "NOTICE.md")
REQUIRED = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
# A Hub model id: ORG/NAME, each part a letter or digit then letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# What report text and patient identifiers look like in a text file. Each pattern needs context
# (a value after the label, a whole clinical phrase), so vocabularies and our own card pass.
_LEAKS = (
    ("a patient identifier (MRN)", r"\b(?:MRN|medical record (?:number|no\.?))\s*[:#=]?\s*[A-Z]{0,3}\d{4,}"),
    ("a social security number", r"\b\d{3}-\d{2}-\d{4}\b"),
    ("a date of birth", r"\b(?:DOB|date of birth)\s*[:#=]?\s*\d"),
    ("an accession number", r"\baccession(?: number| no\.?| #)?\s*[:#=]?\s*\d{4,}"),
    ("a patient name", r"\bpatient(?:'s)? name\s*[:=]"),
    ("a report section", r"(?m)^\W{0,4}(?:FINDINGS|IMPRESSION|INDICATION|COMPARISON|HISTORY|TECHNIQUE)\s*:\s*\w"),
    ("report text", r"(?i)\b(?:no|without) (?:evidence of |definite |acute )?(?:acute cardiopulmonary|focal (?:airspace )?"
                    r"consolidation|(?:a )?(?:large |small )?pleural effusions?|pneumothorax|free air)\b[^.\n]{0,80}\."),
    ("report text", r"(?i)\b(?:the )?lungs are (?:clear|well expanded|hyperinflated)\b"),
    ("report text", r"(?i)\b(?:heart size|cardiomediastinal silhouette) (?:is|are) (?:normal|within normal|enlarged|stable|top)"),
)


class LeakError(UsageError):
    """A file about to be uploaded looks like it holds report text or a patient identifier."""


def check_repo_id(repo_id: str) -> None:
    """Refuse anything but ORG/NAME (no empty part, no `.git`, no `..`/`--`, at most 96 chars each)."""
    bad = (not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or repo_id.endswith(".git")
           or ".." in repo_id or "--" in repo_id or repo_id.endswith((".", "-")))
    if bad:
        raise UsageError(f"repo id must be ORG/NAME (letters, digits, '-', '_', '.'), got {repo_id!r}; "
                         "e.g. --repo-id my-lab/cxr-llm-small")


def find_leak(text: str) -> Optional[str]:
    """What in `text` looks like report text or PHI (the kind and the start of the match), or None."""
    for kind, pattern in _LEAKS:
        m = re.search(pattern, text)
        if m:  # where, not what: the match itself may be PHI and must not be echoed into logs
            return f"{kind} (line {text.count(chr(10), 0, m.start()) + 1})"
    return None


def check_uploads(files) -> None:
    """The export's report-text / PHI check, re-run on every text file about to be uploaded
    (the card included): a folder edited after `export` must not publish report text."""
    for f in files:
        if f.path_in_repo.endswith(".safetensors"):
            continue
        raw = f.source if isinstance(f.source, bytes) else f.source.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        if f.path_in_repo == "tokenizer.json":  # the vocabulary and merges are tokens, not text
            try:
                data = json.loads(text)
                data.get("model", {}).pop("vocab", None)
                data.get("model", {}).pop("merges", None)
                text = json.dumps(data)
            except (ValueError, AttributeError):
                pass
        leak = find_leak(text)
        if leak is not None:
            raise LeakError(f"{f.path_in_repo} holds what looks like {leak}: refusing to upload it; "
                           "remove it from the folder (or re-export the card with `open-clip-cxr export`)")


@dataclass
class UploadFile:
    path_in_repo: str
    source: Union[Path, bytes]

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


def hub_config(folder: Path, repo_id: str) -> bytes:
    """The folder's OpenCLIP config with the tokenizer pointed at the repo itself."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = repo_id
    return (json.dumps(config, indent=2) + "\n").encode()


def upload_plan(folder, repo_id: str):
    """(files to upload, files left out) for `folder`; the config rewritten for `repo_id`."""
    folder = Path(folder)
    missing = [n for n in REQUIRED if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: write it with `open-clip-cxr export` first")
    files, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if "/" in rel or not any(fnmatch.fnmatch(rel, pat) for pat in ALLOWED):
            skipped.append(rel)
            continue
        files.append(UploadFile(rel, hub_config(folder, repo_id) if rel == CONFIG_NAME else path))
    return files, skipped


def validate_folder(folder) -> dict:
    """Load the folder as OpenCLIP will, tokenize, run one forward pass; returns a short summary."""
    import torch
    import open_clip
    import open_clip_cxr  # noqa: F401  (registers our text tower)
    from open_clip_cxr.eval.probe import embeddings
    name = "local-dir:" + str(Path(folder))
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    out = embeddings(model, tokenizer)
    for key in ("text", "image"):
        if not torch.isfinite(out[key]).all():
            raise ValueError(f"{folder}: non-finite {key} embeddings")
    if out["text"].shape[-1] != out["image"].shape[-1]:
        raise ValueError(f"{folder}: text and image embeddings differ in size")
    return {"embed_dim": int(out["text"].shape[-1]), "parameters": sum(p.numel() for p in model.parameters())}


def _head(api, repo_id: str, revision: Optional[str]) -> Optional[str]:
    try:
        return api.repo_info(repo_id, revision=revision).sha
    except Exception:  # new repo or branch
        return None


def push_folder(folder, repo_id: str, private: bool = False, revision: Optional[str] = None,
                dry_run: bool = False, token: Optional[str] = None, commit_message: Optional[str] = None,
                api=None, validate: bool = True) -> dict:
    """Validate `folder` and upload it to `repo_id` in one commit. With `dry_run`, validate and
    list the files without touching the network. Re-pushing an unchanged folder is a no-op."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise UsageError(f"--folder {folder} is not a folder; write one with `open-clip-cxr export --out DIR`")
    files, skipped = upload_plan(folder, repo_id)
    check_uploads(files)
    summary = validate_folder(folder) if validate else {}
    url = f"https://huggingface.co/{repo_id}" + (f"/tree/{revision}" if revision else "")
    result = {"repo_id": repo_id, "url": url, "files": [f.path_in_repo for f in files], "skipped": skipped,
              "bytes": sum(f.size for f in files), **summary}
    if dry_run:
        result.update(dry_run=True, commit=None, noop=None)
        return result
    from huggingface_hub import CommitOperationAdd, HfApi
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    before = _head(api, repo_id, revision)
    operations = [CommitOperationAdd(path_in_repo=f.path_in_repo,
                                     path_or_fileobj=f.source if isinstance(f.source, bytes) else str(f.source))
                  for f in files]
    message = commit_message or f"Upload {folder.name} with open_clip_cxr"
    info = api.create_commit(repo_id, operations, commit_message=message, revision=revision, repo_type="model")
    # huggingface_hub skips an empty commit and returns the current head: nothing changed.
    oid = getattr(info, "oid", None)
    result.update(dry_run=False, commit=oid, noop=before is not None and oid == before,
                  commit_url=getattr(info, "commit_url", None))
    return result


def add_arguments(parser):
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hugging Face Hub")
    parser.add_argument("--folder", required=True, help="folder written by `open-clip-cxr export`")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument("--dry-run", action="store_true", help="validate and list what would be uploaded; no network")
    parser.add_argument("--commit-message", default=None)


def _size(n: int) -> str:
    if n <= 0:
        return "0 B"
    i = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** i:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][i]}"


def run(args) -> int:
    result = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                         dry_run=args.dry_run, commit_message=args.commit_message)
    print(f"{args.folder}: loads, tokenizes and runs (embedding size {result.get('embed_dim')})")
    verb = "would upload" if result["dry_run"] else "uploaded"
    print(f"{verb} {len(result['files'])} files ({_size(result['bytes'])}) to {result['repo_id']}:")
    for name in result["files"]:
        print(f"  {name}")
    if result["skipped"]:
        print("left out (not part of a release): " + ", ".join(result["skipped"]))
    if not result["dry_run"]:
        print("no changes since the last commit" if result["noop"] else f"commit {result['commit']}")
    print(result["url"])
    return 0
