"""The CEC pipeline as an HTTP service (FastAPI on uvicorn).

    python -m cec.serve                                   # the shipped pipeline on http://127.0.0.1:8000
    python -m cec.serve --pipeline DIR --port 8080        # (installed: cec-serve); model flags as in infer.py
    CEC_SERVE_TOKEN=secret python -m cec.serve --host 0.0.0.0

    POST /v1/code        {"text": str, "id": str?}      -> the JSON contract of `infer.py --format json`
    POST /v1/code/batch  {"notes": [{"text", "id"?}]}   -> {"results": [one contract per note, with "id" first
                                                            and without "note"]}
    GET  /v1/codes       the code set: {"concept_set", "code_system", "note_language", "codes": [{"code",
                         "description"}]}
    GET  /healthz        {"status": "ok", "queued", "coded"}; /docs and /openapi.json: the OpenAPI docs

Each predicted code carries the note sentences behind it (`spans`, as infer.py; --no-explain leaves them out and
saves about a quarter of the time per note, --evidence-gain ranks them by drop + gain). One worker thread owns the
model: requests queue and are coded one after another, a batch's notes back to back, with the model loaded once
at start. Limits: --max-body bytes per request (413), --max-note-chars per note (413), --max-batch notes per
batch (413), --max-queue notes waiting (503 with Retry-After). Every error is {"error": {"code", "message"}} with a
4xx status; a bug is a 500 with that shape, its traceback only in the server's log. It binds to 127.0.0.1; with
--token (or CEC_SERVE_TOKEN) every /v1 request needs `Authorization: Bearer TOKEN`, and a host other than
loopback is refused without a token unless --insecure.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import os
import queue
import socket
import sys
import threading
from concurrent.futures import Future

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from cec.cli import user_errors
from cec.coding.output import code_set_doc
from cec.commands.infer import add_model_args, load_pipeline, note_doc, note_language, parse_with_model_args
from cec.commands.infer import positive_int
from cec.errors import CECError, ConfigError

PROG = "cec.serve"
log = logging.getLogger(PROG)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class QueueFull(Exception):
    pass


class Coder:
    """One worker thread owns the pipeline; jobs (lists of (text, id)) wait on a queue bounded in notes."""

    def __init__(self, code_fn, max_queue: int):
        self.code_fn, self.max_queue = code_fn, max_queue
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.pending = self.coded = 0
        threading.Thread(target=self._work, name="cec-coder", daemon=True).start()

    def submit(self, notes: list[tuple[str, str | None]]) -> Future:
        with self.lock:
            if self.pending + len(notes) > self.max_queue:
                raise QueueFull
            self.pending += len(notes)
        future: Future = Future()
        self.jobs.put((notes, future))
        return future

    def _work(self) -> None:
        while True:
            notes, future = self.jobs.get()
            docs = []
            try:
                for text, note_id in notes:  # back to back, the model stays loaded
                    docs.append(self.code_fn(text, note_id))
                    with self.lock:
                        self.coded += 1
                future.set_result(docs)
            except BaseException as e:  # handed to the request that sent the job
                future.set_exception(e)
            finally:
                with self.lock:
                    self.pending -= len(notes)


class Note(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    id: str | None = None


class Batch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    notes: list[Note]


def error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app reads any of it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error(413, "body_too_large", f"request body over {self.limit} bytes")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def make_app(coder: Coder, codes: dict, *, token: str | None = None, max_note_chars: int = 100_000,
             max_batch: int = 64, max_body: int = 1 << 20, retry_after_s: int = 5) -> FastAPI:
    app = FastAPI(title="CEC Engine", version="0.1.0",
                  description="ICD coding of clinical notes by Concept-Enhanced Coding, with the evidence behind "
                              "each code. The JSON contract is the one of `infer.py --format json`.")

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return error(e.status, e.code, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return error(e.status_code, "not_found" if e.status_code == 404 else "http_error", str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, "invalid_json", f"the body is not valid JSON ({first.get('msg', '')})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error(400, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def bug(request, e):
        log.exception("internal error on %s", request.url.path)
        return error(500, "internal", "internal error (see the server's log)")

    def authorized(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    def check(note: Note) -> tuple[str, str | None]:
        if not note.text.strip():
            raise ApiError(400, "empty_note", f"note {note.id!r}: the note is empty" if note.id else "the note is empty")
        if len(note.text) > max_note_chars:
            raise ApiError(413, "note_too_long", f"note of {len(note.text)} characters; at most {max_note_chars}")
        return note.text, note.id

    async def code(notes: list[tuple[str, str | None]]) -> list[dict]:
        try:
            future = coder.submit(notes)
        except QueueFull:
            raise ApiError(503, "queue_full", f"{coder.pending} notes are waiting; retry later",
                           {"Retry-After": str(retry_after_s)}) from None
        try:
            return await asyncio.wrap_future(future)
        except CECError as e:
            raise ApiError(400, "bad_note", str(e)) from None

    @app.post("/v1/code", dependencies=[Depends(authorized)])
    async def code_note(note: Note) -> dict:
        """One note: the JSON contract of `infer.py --format json`."""
        return (await code([check(note)]))[0]

    @app.post("/v1/code/batch", dependencies=[Depends(authorized)])
    async def code_batch(batch: Batch) -> dict:
        """Several notes, coded back to back: one contract per note, "id" first and without "note"."""
        if not batch.notes:
            raise ApiError(400, "invalid_request", "notes: at least one note")
        if len(batch.notes) > max_batch:
            raise ApiError(413, "batch_too_large", f"{len(batch.notes)} notes; at most {max_batch} per batch")
        docs = await code([check(n) for n in batch.notes])
        return {"results": [{"id": n.id} | {k: v for k, v in d.items() if k != "note"}
                            for n, d in zip(batch.notes, docs)]}

    @app.get("/v1/codes", dependencies=[Depends(authorized)])
    async def code_set() -> dict:
        """The codes this pipeline assigns, their code system and the note language it was trained on."""
        return codes

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "queued": coder.pending, "coded": coder.coded}

    app.add_middleware(BodyLimit, limit=max_body)
    return app


# -- the command ---------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv=None, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--token", default=os.environ.get("CEC_SERVE_TOKEN"),
                   help="bearer token every /v1 request must carry (default: $CEC_SERVE_TOKEN)")
    p.add_argument("--insecure", action="store_true", help="serve a non-loopback --host without a token")
    p.add_argument("--max-body", type=positive_int, default=1 << 20, metavar="BYTES",
                   help="largest request body (default: %(default)s)")
    p.add_argument("--max-note-chars", type=positive_int, default=100_000, metavar="N",
                   help="longest note in characters (default: %(default)s)")
    p.add_argument("--max-batch", type=positive_int, default=64, metavar="N",
                   help="most notes in one batch request (default: %(default)s)")
    p.add_argument("--max-queue", type=positive_int, default=256, metavar="N",
                   help="most notes waiting to be coded; more get 503 (default: %(default)s)")
    add_model_args(p)
    return parse_with_model_args(p, argv)


def check_bind(host: str, port: int) -> None:
    """Fail with one line before the model loads when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve(args) -> None:
    import uvicorn

    if not is_loopback(args.host) and not args.token and not args.insecure:
        raise ConfigError(f"--host {args.host} is reachable from other machines: give --token (or "
                          "CEC_SERVE_TOKEN), or --insecure to serve it without one")
    check_bind(args.host, args.port)
    pipeline = load_pipeline(args)  # applies --threads (cec.cli.runtime)
    coder = Coder(lambda text, note_id: note_doc(pipeline, text, note_id, args.explain, args.evidence_gain)[0],
                  args.max_queue)
    app = make_app(coder, code_set_doc(pipeline.cs, note_language(args)), token=args.token,
                   max_note_chars=args.max_note_chars, max_batch=args.max_batch, max_body=args.max_body)
    print(f"[cec] serving on http://{args.host}:{args.port} (docs: /docs)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def main(argv=None, prog: str = PROG) -> int:
    logging.basicConfig(format=f"{prog}: %(levelname)s: %(message)s", level=logging.WARNING)
    args = parse_args(argv, prog)
    with user_errors(prog):
        serve(args)
    return 0


def cli() -> None:
    """The `cec-serve` command."""
    sys.exit(main(prog="cec-serve"))


if __name__ == "__main__":
    sys.exit(main())
