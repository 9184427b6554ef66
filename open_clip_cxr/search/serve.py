"""`open-clip-cxr serve`: a small web page over an index: a text box, an image upload, thumbnails with reports.

FastAPI with one plain Jinja2 template (autoescaped: report text is HTML-escaped). Binds
127.0.0.1 unless --host says otherwise, and then warns that the archive holds patient data.
With --token every request must carry it (?token=..., an `Authorization: Bearer` header, or
the cookie the page sets after the first visit with ?token=). Bad input (an empty query, an
unreadable upload, a bad k) gives a 400 with a message; the server keeps serving.

JSON endpoints: GET /api/search?q=...&k=10, POST /api/search (multipart `image`), GET /health.
"""

import argparse
import hmac
import sys
from pathlib import Path
from typing import Optional

MAX_UPLOAD = 64 << 20          # bytes; a large DICOM fits
LOOPBACK = ("127.0.0.1", "localhost", "::1")
COOKIE = "open_clip_cxr_token"


def _template():
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("page.html")


def create_app(index, token: Optional[str] = None, default_k: int = 10):
    """The FastAPI app over an open `Index` (its model is used for the queries)."""
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from open_clip_cxr.search.store import SearchIndexError
    from open_clip_cxr.vision.io import ImageReadError

    page = _template()
    app = FastAPI(title="open_clip_cxr search", docs_url=None, redoc_url=None, openapi_url=None)
    bad_input = (SearchIndexError, ImageReadError, ValueError)

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if token is None:
            return await call_next(request)
        given = (request.query_params.get("token") or request.cookies.get(COOKIE)
                 or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return PlainTextResponse("401: this index needs its token: open the page as /?token=TOKEN "
                                     "(or send 'Authorization: Bearer TOKEN')", status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    def parse_k(k) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"k must be a whole number between 1 and 100, got {k!r}") from None
        if not 1 <= k <= 100:
            raise ValueError(f"k must be between 1 and 100, got {k}")
        return k

    def render(status=200, **kw):
        m = index.manifest
        ctx = dict(query=None, query_text="", results=[], error=None, archived=None, archived_shown=False,
                   kind_label="", k=default_k, n_images=m["counts"]["images"], n_studies=m["counts"]["studies"],
                   model_name=m["model"]["name"], kind=m["index"]["kind"])
        ctx.update(kw)
        return HTMLResponse(page.render(**ctx), status_code=status)

    async def read_upload(image: Optional[UploadFile]) -> bytes:
        if image is None or not image.filename:
            raise ValueError("no file uploaded: choose an image (PNG, JPEG or DICOM)")
        data = await image.read(MAX_UPLOAD + 1)
        if len(data) > MAX_UPLOAD:
            raise ValueError(f"the upload is larger than {MAX_UPLOAD >> 20} MB")
        if not data:
            raise ValueError(f"{image.filename!r} is empty")
        return data

    def image_search(data: bytes, name: str, k: int):
        from open_clip_cxr.vision.io import load_image
        try:
            img = load_image(data, name=name, mode="L")
        except ImageReadError as exc:
            raise ValueError(f"could not read the uploaded image: {exc}") from None
        q = index.encode_image([img])
        return index.search_image_vectors(q, k)[0], index.archived_study(q)[0]

    @app.get("/", response_class=HTMLResponse)
    def home(q: Optional[str] = None, k: str = str(default_k)):
        if q is None:
            return render()
        try:
            kk = parse_k(k)
            results = index.search_text([q], kk)[0]
        except bad_input as exc:
            return render(400, error=str(exc), query_text=q or "", k=k)
        return render(query=q, query_text=q, results=results, kind_label="Text", k=kk)

    @app.post("/", response_class=HTMLResponse)
    async def upload(image: Optional[UploadFile] = File(None), k: str = Form(str(default_k))):
        try:
            kk = parse_k(k)
            data = await read_upload(image)
            results, archived = image_search(data, image.filename, kk)
        except bad_input as exc:
            return render(400, error=str(exc))
        shown = any(r["query_match"] for r in results)
        return render(query=image.filename, results=results, kind_label="Film", k=kk,
                      archived=archived, archived_shown=shown)

    @app.get("/thumb/{image_id}.png")
    def thumb(image_id: int):
        data = index.thumbnail(image_id)
        if data is None:
            return PlainTextResponse("no such image", status_code=404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/search")
    def api_text(q: Optional[str] = None, k: str = str(default_k)):
        try:
            kk = parse_k(k)
            return {"query": q, "kind": "text", "results": index.search_text([q or ""], kk)[0]}
        except bad_input as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    @app.post("/api/search")
    async def api_image(image: Optional[UploadFile] = File(None), k: str = Form(str(default_k))):
        try:
            kk = parse_k(k)
            data = await read_upload(image)
            results, archived = image_search(data, image.filename, kk)
        except bad_input as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return {"query": image.filename, "kind": "image", "archived_study": archived, "results": results}

    @app.get("/health")
    def health():
        return {"ok": True, "images": index.manifest["counts"]["images"]}

    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="DIR", help="index folder written by `open-clip-cxr index`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", default=None, help="require this token on every request (?token=... once per browser)")
    p.add_argument("--k", type=int, default=10, help="default number of studies per query")
    p.add_argument("--device", default="cpu", help="torch device for the query encoder (default cpu)")
    p.add_argument("--faiss-threads", type=int, default=1,
                   help="OpenMP threads per FAISS search (default 1: requests are searched concurrently, "
                        "each on its own thread)")


def run(args) -> int:
    from open_clip_cxr.search.store import SearchIndexError
    try:
        if args.faiss_threads < 1:
            raise ValueError(f"--faiss-threads must be at least 1, got {args.faiss_threads}")
        import faiss
        faiss.omp_set_num_threads(args.faiss_threads)
        print(f"FAISS threads per search: {faiss.omp_get_max_threads()}; concurrent requests are searched "
              "in parallel", file=sys.stderr)
        from open_clip_cxr.search.index import Index
        index = Index.open(args.index, device=args.device)
        index.model                        # load and check the model now, not on the first query
    except (SearchIndexError, ValueError, FileNotFoundError) as exc:
        print(f"open-clip-cxr serve: error: {exc}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK:
        print(f"WARNING: serving on {args.host}: anyone who can reach this address can read the archive, "
              "which holds patient data (images and reports)." +
              ("" if args.token else " Consider --token."), file=sys.stderr)
    import uvicorn
    uvicorn.run(create_app(index, token=args.token, default_k=args.k), host=args.host, port=args.port,
                log_level="info")
    return 0
