"""Shared by the training refusal tests: a trap where training work would start, and a tar writer."""
import io
import tarfile
from pathlib import Path

import pytest

from open_clip_cxr_train import common


class WorkStarted(Exception):
    """Raised where the accelerator would be set up: anything reaching it passed every check."""


@pytest.fixture(autouse=True)
def trap_work(monkeypatch):
    import open_clip_cxr_train.clip_stage as cs

    def trap(recipe):
        raise WorkStarted(recipe.get("output_dir"))
    from open_clip_cxr_train import accel
    monkeypatch.setattr(common, "setup_accelerator", trap)
    monkeypatch.setattr(accel, "setup_accelerator", trap)   # where the text stage calls it
    monkeypatch.setattr(cs, "setup_accelerator", trap)


def write_tar(path: Path, n: int) -> str:
    """A shard of `n` samples (bytes, not images: nothing here decodes them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("png", b"not decoded"), ("txt", b"FINDINGS: clear.")):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def refused(capsys, tmp_path, rc, command, *needles, start=""):
    """The run was refused: exit 2, one stderr line (starting "open-clip-cxr COMMAND: error: " + `start`)
    holding every needle, and no run folder left behind (the rerun is not "another recipe")."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith(f"open-clip-cxr {command}: error: {start}"), err
    for n in needles:
        assert n in err[0], (n, err[0])
    assert not (tmp_path / "run").exists()
    return err[0]
