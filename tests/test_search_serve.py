"""`open-clip-cxr serve`: the page and the JSON API through FastAPI's TestClient; one slow test in headless Chromium."""
import os
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from search_fixtures import build, write_archive

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    shards = write_archive(root, 0, 4)
    out = root / "index"
    build(tiny, out, "::".join(str(p) for p in sorted(shards.glob("*.tar"))), chunk_size=4)
    con = sqlite3.connect(out / "meta.sqlite")   # a report with markup, to check that it is escaped
    con.execute("UPDATE studies SET report = report || ' <script>alert(1)</script>' WHERE study_id = 's1'")
    con.commit()
    con.close()
    from open_clip_cxr.search import Index
    return {"root": root, "index": Index.open(out, model=tiny), "folder": out}


@pytest.fixture(scope="module")
def client(served):
    from fastapi.testclient import TestClient
    from open_clip_cxr.search.serve import create_app
    return TestClient(create_app(served["index"]))


def study_ids(html):
    import re
    return re.findall(r'data-study="([^"]+)"', html)


def test_text_query_page_lists_the_api_results_escaped(served, client):
    r = client.get("/")
    assert r.status_code == 200 and 'id="q"' in r.text and 'id="results"' not in r.text
    r = client.get("/", params={"q": "pleural effusion <img src=x onerror=alert(2)>", "k": "2"})
    assert r.status_code == 200
    want = [x["study_id"] for x in served["index"].search_text("pleural effusion <img src=x onerror=alert(2)>", k=2)]
    assert study_ids(r.text) == want and len(want) == 2
    assert "<img src=x" not in r.text and "&lt;img src=x onerror=alert(2)&gt;" in r.text
    r = client.get("/", params={"q": "effusion", "k": "2"})
    assert r.text.count('src="thumb/') == 4                       # both images of both studies
    r = client.get("/", params={"q": "effusion", "k": "5"})
    assert "<script>alert(1)" not in r.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text


def test_image_upload_highlights_the_archived_study(served, client):
    film = (served["root"] / "imgs" / "img3.png").read_bytes()     # study s1
    r = client.post("/", files={"image": ("img3.png", film, "image/png")}, data={"k": "2"})
    assert r.status_code == 200
    assert 'class="study match" data-study="s1"' in r.text or "archived in study <b>s1</b>" in r.text
    j = client.post("/api/search", files={"image": ("img3.png", film, "image/png")}, data={"k": "2"}).json()
    assert j["archived_study"] == "s1" and len(j["results"]) == 2
    assert [x["query_match"] for x in j["results"]] == [x["study_id"] == "s1" for x in j["results"]]


def test_bad_input_gets_a_message_and_the_server_keeps_serving(client):
    cases = [
        (client.get("/", params={"q": "  "}), "empty text query"),
        (client.get("/", params={"q": "effusion", "k": "many"}), "k must be a whole number"),
        (client.get("/", params={"q": "effusion", "k": "0"}), "between 1 and 100"),
        (client.post("/", files={"image": ("x.png", b"\x89PNG broken", "image/png")}), "could not read the uploaded image"),
        (client.post("/", files={"image": ("empty.dcm", b"", "application/dicom")}), "is empty"),
        (client.post("/", data={"k": "3"}), "no file uploaded"),
        (client.get("/api/search", params={"q": ""}), "empty text query"),
    ]
    for r, msg in cases:
        assert r.status_code == 400 and msg in r.text, (r.status_code, r.text[:300])
    assert client.get("/thumb/999.png").status_code == 404
    r = client.get("/thumb/0.png")
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    assert client.get("/health").json()["images"] == 4


def test_api_text_search_equals_python_api(served, client):
    j = client.get("/api/search", params={"q": "lungs are clear", "k": "2"}).json()
    assert j["results"] == served["index"].search_text("lungs are clear", k=2)


def test_token(served):
    from fastapi.testclient import TestClient
    from open_clip_cxr.search.serve import create_app
    c = TestClient(create_app(served["index"], token="s3cret"))
    assert c.get("/").status_code == 401
    assert c.get("/", params={"token": "wrong"}).status_code == 401
    assert c.get("/api/search", params={"q": "x"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = c.get("/", params={"token": "s3cret"})
    assert r.status_code == 200 and "open_clip_cxr_token" in r.headers.get("set-cookie", "")
    assert c.get("/thumb/0.png").status_code == 200              # the cookie now carries the token


def test_serve_command_binds_loopback_and_warns_elsewhere(served, monkeypatch, capsys):
    import uvicorn
    from open_clip_cxr import cli
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    triple = served["index"].model      # the random tiny model cannot be rebuilt by name: hand it over
    monkeypatch.setattr("open_clip_cxr.search.index.Index.model", property(lambda self: triple))
    assert cli.main(["serve", "--index", str(served["folder"])]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and "patient data" not in capsys.readouterr().err
    assert cli.main(["serve", "--index", str(served["folder"]), "--host", "0.0.0.0"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and "patient data" in capsys.readouterr().err
    assert cli.main(["serve", "--index", str(served["folder"] / "nope")]) == 2
    assert "no index at" in capsys.readouterr().err
    import faiss
    before = faiss.omp_get_max_threads()
    try:
        assert cli.main(["serve", "--index", str(served["folder"]), "--faiss-threads", "2"]) == 0
        assert "FAISS threads per search: 2" in capsys.readouterr().err and faiss.omp_get_max_threads() == 2
        assert cli.main(["serve", "--index", str(served["folder"]), "--faiss-threads", "0"]) == 2
        assert capsys.readouterr().err.strip() == "open-clip-cxr serve: error: --faiss-threads must be at least 1, got 0"
    finally:
        faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------- the page in a real browser

def chromium_binary():
    for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if p and Path(p).exists():
            return p
    pytest.skip("no chromium: `apt-get install -y chromium`")


@pytest.mark.slow
def test_page_in_headless_chromium(served, tmp_path):
    """Types a query, submits it, reads the rendered list; saves a screenshot (OPEN_CLIP_CXR_SCREENSHOT=path)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    import uvicorn
    from open_clip_cxr.search.serve import create_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(served["index"]), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        with sync_api.sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium_binary(), headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync"], viewport={"width": 900, "height": 700})
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#q", "small left pleural effusion")
            page.click("#search-text")
            page.wait_for_selector("#results li")
            shown = page.eval_on_selector_all("#results li", "els => els.map(e => e.dataset.study)")
            want = [r["study_id"] for r in served["index"].search_text("small left pleural effusion", k=10)]
            assert shown == want and len(shown) == 2
            assert page.input_value("#q") == "small left pleural effusion"
            assert page.eval_on_selector_all("#results img", "els => els.filter(e => e.naturalWidth > 0).length") == 4
            page.screenshot(path=os.environ.get("OPEN_CLIP_CXR_SCREENSHOT") or str(tmp_path / "page.png"))
            page.set_input_files("#image", str(served["root"] / "imgs" / "img3.png"))
            page.click("#search-image")
            page.wait_for_selector("#summary")
            assert "archived in study" in page.inner_text("#summary")
            ctx.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
