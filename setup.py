"""Package discovery for setuptools; everything else is in pyproject.toml.

The wing folders install under distinct names, so that no generic top-level `training`,
`conversion` or `hub_cards` lands in site-packages (OpenCLIP renamed its own `training` to
`open_clip_train` for the same reason). The folders keep their names in the repository:

    training/    -> open_clip_cxr_train
    conversion/  -> open_clip_cxr_convert
    hub_cards/   -> open_clip_cxr_hub

Subfolders (recipes, templates) follow; `pip install -e .` maps them the same way.
"""
from setuptools import find_namespace_packages, setup

WING_PACKAGES = {"training": "open_clip_cxr_train", "conversion": "open_clip_cxr_convert",
                 "hub_cards": "open_clip_cxr_hub"}
_SKIP = ["*.__pycache__", "*.__pycache__.*"]


def packages():
    found = find_namespace_packages(include=["open_clip_cxr", "open_clip_cxr.*"], exclude=_SKIP)
    for folder, name in WING_PACKAGES.items():
        found += [name + p[len(folder):] for p in find_namespace_packages(include=[folder, folder + ".*"], exclude=_SKIP)]
    return found


setup(packages=packages(), package_dir={name: folder for folder, name in WING_PACKAGES.items()})
