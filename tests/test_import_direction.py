"""The package boundary: the library (`open_clip_cxr/`) imports nothing from the training wing,
conversion or the Hub publisher (not even through importlib strings), and no two top-level
folders import each other, directly or around a longer loop."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each top-level folder -> the package name it is imported (and installed) as
PACKAGES = {"open_clip_cxr": "open_clip_cxr", "training": "open_clip_cxr_train", "conversion": "open_clip_cxr_convert", "hub_cards": "open_clip_cxr_hub"}
LIBRARY = "open_clip_cxr"
WINGS = tuple(PACKAGES[f] for f in PACKAGES if f != LIBRARY)
FOLDER_OF = {name: folder for folder, name in PACKAGES.items()}
# "open_clip_cxr_train.text_cli" or "open_clip_cxr_convert.commands:EXPORT"; a bare word ("training") is just a word
_MODULE_STRING = re.compile(r"^((?:%s)(?:\.[A-Za-z_]\w*)+)(?::[\w.]+)?$" % "|".join(WINGS))


def _named_modules(tree: ast.AST):
    """(line, dotted name) of every import, and of every string constant that looks like a module
    path of one of our folders (`importlib.import_module("open_clip_cxr_train.x")`, entry-point strings)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _MODULE_STRING.match(node.value.strip())
            if m:
                yield node.lineno, m.group(1)


def import_edges():
    """{(from folder, to folder): ["file:line -> module", ...]} over every module of our folders."""
    edges = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, name in _named_modules(tree):
                target = FOLDER_OF.get(name.split(".")[0])
                if target is not None and target != top:
                    edges.setdefault((top, target), []).append(f"{path.relative_to(ROOT)}:{line} -> {name}")
    return edges


def test_library_imports_no_wing():
    upward = {k: v for k, v in import_edges().items() if k[0] == LIBRARY}
    assert not upward, f"the library imports upward: {upward}"


def test_scanner_sees_imports_and_module_strings():
    src = "\n".join(["import open_clip_cxr_train.text_stage", "from open_clip_cxr_convert import lora",
                     "m = 'open_clip_cxr_hub.push'", "x = 'training wing'", "y = 'training'",
                     "z = 'open_clip_cxr_convert.commands:EXPORT'"])
    found = [name for _, name in _named_modules(ast.parse(src))]
    assert found == ["open_clip_cxr_train.text_stage", "open_clip_cxr_convert", "open_clip_cxr_hub.push",
                     "open_clip_cxr_convert.commands"]


def _cycle(edges):
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def walk(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            found = walk(nxt, path + [nxt])
            if found:
                return found
        return None
    for start in sorted(graph):
        found = walk(start, [start])
        if found:
            return found
    return None


def test_no_cycle_between_folders():
    edges = import_edges()
    loop = _cycle(edges)
    assert loop is None, "folders import each other: " + " -> ".join(loop) + "; " + "; ".join(
        edges[(a, b)][0] for a, b in zip(loop, loop[1:]))


def test_cycle_finder_finds_a_loop():
    assert _cycle({("a", "b"): [], ("b", "c"): [], ("c", "a"): []}) == ["a", "b", "c", "a"]
    assert _cycle({("a", "b"): [], ("b", "c"): []}) is None


def test_building_a_model_loads_no_wing():
    code = ("import sys, open_clip, open_clip_cxr\n"
            "open_clip.create_model('cxr-llm-tiny')\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {WINGS!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_code_imports_the_installed_names():
    """A folder installed under another name (see setup.py) is never imported by its folder name:
    from a checkout it would still import, as a second copy of the same modules."""
    renamed = {folder for folder, name in PACKAGES.items() if folder != name}
    stale = []
    for top in (*PACKAGES, "tests", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                stale += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in renamed]
    assert not stale, "import the installed package names: " + "; ".join(stale[:10])
