"""The README's code blocks that are meant to run do: every ```python block is executed (with
`cxr-llm-tiny` standing in for `cxr-llm-small` in the fast suite, verbatim in the slow one), and
every `open-clip-cxr` command of the ```bash blocks parses with the real CLI, with the files one
step writes being the ones the next step reads."""
import re
import shlex
from pathlib import Path

import pytest

from open_clip_cxr.cli import COMMANDS, build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def commands():
    """(subcommand, argv) for every `open-clip-cxr ...` (or `-m open_clip_cxr.cli ...`) line."""
    out = []
    for block in BASH_BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if "open-clip-cxr " in line:
                argv = shlex.split(line.split("open-clip-cxr ", 1)[1])
            elif "-m open_clip_cxr.cli " in line:
                argv = shlex.split(line.split("-m open_clip_cxr.cli ", 1)[1])
            else:
                continue
            out.append([a.strip("[]") for a in argv])   # "[--private]": an optional flag, shown as such
    return out


def test_there_is_something_to_run():
    assert len(PYTHON_BLOCKS) >= 1 and len(commands()) >= 8


@pytest.mark.parametrize("argv", commands(), ids=lambda a: a[0])
def test_cli_commands_parse(argv):
    assert argv[0] in COMMANDS
    build_parser(load=argv[0]).parse_args(argv)   # SystemExit (exit 2) on an unknown flag or a bad value


def test_pipeline_paths_connect():
    """What eval writes (OUT/results.json) is what export reads for the card."""
    args = {}
    for argv in commands():   # the first line of each command: the numbered pipeline
        args.setdefault(argv[0], build_parser(load=argv[0]).parse_args(argv))
    assert args["export"].eval_json == str(Path(args["eval"].out) / "results.json")
    assert args["push"].folder == args["export"].out


MODEL_BLOCKS = [i for i, b in enumerate(PYTHON_BLOCKS) if "Index.open" not in b]
SEARCH_BLOCKS = [i for i, b in enumerate(PYTHON_BLOCKS) if "Index.open" in b]


@pytest.mark.parametrize("index", MODEL_BLOCKS)
def test_python_blocks_run_on_the_tiny_model(index, tmp_path, monkeypatch):
    monkeypatch.setenv("OPEN_CLIP_CXR_CACHE", str(tmp_path))
    code = PYTHON_BLOCKS[index].replace("cxr-llm-small", "cxr-llm-tiny").replace("'smollm2'", "'random'")
    scope = {}
    exec(compile(code, f"README.md python block {index}", "exec"), scope)
    assert scope["img"].shape[0] == 1 and scope["txt"].shape[0] == 1


@pytest.mark.slow
@pytest.mark.parametrize("index", [i for i in range(len(PYTHON_BLOCKS)) if i not in SEARCH_BLOCKS])
def test_python_blocks_run_verbatim(index):
    """As a user runs it: the tag's checkpoint is built once into the real cache, offline. (The
    search block needs an index on disk: `test_search_block_runs_on_a_tiny_index` builds one.)"""
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {})


@pytest.mark.parametrize("index", SEARCH_BLOCKS)
def test_search_block_runs_on_a_tiny_index(index, tmp_path, monkeypatch):
    monkeypatch.setenv("OPEN_CLIP_CXR_CACHE", str(tmp_path / "cache"))
    """The Python API block, verbatim, against runs/index built here with `cxr-llm-tiny` and a real DICOM film."""
    import shutil
    import open_clip_cxr
    from pydicom.data import get_testdata_file
    from search_fixtures import build, write_archive
    monkeypatch.chdir(tmp_path)
    shards = write_archive(tmp_path, 0, 4)
    tiny = open_clip_cxr.create_model_and_transforms("cxr-llm-tiny", pretrained="random")   # seeded: reloads equal
    tiny = (tiny[0], tiny[2], open_clip_cxr.get_tokenizer("cxr-llm-tiny"))
    build(tiny, tmp_path / "runs" / "index", sorted(str(p) for p in shards.glob("*.tar")), pretrained="random")
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), tmp_path / "film.dcm")
    scope = {}
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), scope)
    assert scope["hits"] and {"rank", "study_id", "score", "report"} <= set(scope["hits"][0])
