"""The HTTP service (cec.serve) as a real server on a loopback port, called with a real HTTP client (httpx): one
note, a batch, 8 concurrent requests, a malformed and an oversized body, a wrong token; the queue limit on an
in-process server with a coder that waits."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token"
NOTE = "Patient has fever and chills. High blood pressure on lisinopril.\nChronic kidney disease stage four.\n"
CONTRACT_KEYS = {"note", "code_system", "threshold", "codes", "timing"}


pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from tiny_train import save_tiny_model, tiny_concept_set

    d = tmp_path_factory.mktemp("serve")
    save_tiny_model(d / "model")
    tiny_concept_set().save(d / "concepts.json")
    (d / "cec_pipeline.json").write_text(json.dumps({"base_model": str(d / "model"),
                                                     "concept_set": str(d / "concepts.json"), "threshold": 0.5}))
    return d


def start(*args, env=None):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.Popen([sys.executable, "-m", "cec.serve", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def server(pipe):
    port = free_port()
    proc = start("--pipeline", pipe, "--port", port, "--threads", 1, "--max-body", 20_000, "--max-batch", 4,
                 env={"CEC_SERVE_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.2)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    yield client
    client.close()
    proc.terminate()
    proc.wait(30)


def assert_error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body
    assert "Traceback" not in r.text


def test_one_note_returns_the_infer_json_contract(server, pipe, tmp_path):
    r = server.post("/v1/code", json={"text": NOTE, "id": "note.txt"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert set(doc) == CONTRACT_KEYS and doc["note"] == NOTE and len(doc["codes"]) == 5
    assert all(e["role"] in ("own", "outside") for c in doc["codes"] for e in c["evidence"])
    # the same function as infer.py --format json: the same document (up to the seconds it took)
    (tmp_path / "note.txt").write_text(NOTE)
    proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--pipeline", str(pipe), "--note",
                           str(tmp_path / "note.txt"), "--format", "json"], capture_output=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    cli = json.loads(proc.stdout)
    assert {k: v for k, v in doc.items() if k != "timing"} == {k: v for k, v in cli.items() if k != "timing"}


def test_batch_codes_each_note(server):
    notes = [{"id": f"n{i}", "text": f"note {i}: fever and chronic renal failure."} for i in range(3)]
    r = server.post("/v1/code/batch", json={"notes": notes})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [d["id"] for d in results] == ["n0", "n1", "n2"]
    assert all(list(d)[0] == "id" and "note" not in d and len(d["codes"]) == 5 for d in results)
    assert_error(server.post("/v1/code/batch", json={"notes": notes * 2}), 413, "batch_too_large")


def test_eight_concurrent_requests_are_queued_and_all_answered(server):
    before = server.get("/healthz").json()["coded"]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: server.post("/v1/code", json={"text": NOTE, "id": "same"}), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    docs = [r.json() for r in responses]
    assert all(d["codes"] == docs[0]["codes"] for d in docs)  # one model, one note: one answer
    assert server.get("/healthz").json()["coded"] == before + 8


def test_bad_requests_get_a_4xx_json_error(server):
    headers = {"Content-Type": "application/json"}
    assert_error(server.post("/v1/code", content=b'{"text": "fever', headers=headers), 400, "invalid_json")
    assert_error(server.post("/v1/code", json={"id": "x"}), 400, "invalid_request")
    assert_error(server.post("/v1/code", json={"text": 5}), 400, "invalid_request")
    assert_error(server.post("/v1/code", json={"text": "  \n"}), 400, "empty_note")
    assert_error(server.post("/v1/code", json={"text": "x", "extra": 1}), 400, "invalid_request")
    assert_error(server.post("/v1/code", json={"text": "fever " * 5000}), 413, "body_too_large")
    assert_error(server.get("/v1/nothing"), 404, "not_found")


def test_codes_health_and_docs(server):
    codes = server.get("/v1/codes").json()
    assert codes["code_system"] == "icd9cm" and [c["code"] for c in codes["codes"]] == ["A1", "B2", "C3", "D4", "E5"]
    assert server.get("/healthz").json()["status"] == "ok"
    assert "/v1/code/batch" in server.get("/openapi.json").json()["paths"]
    assert server.get("/docs").status_code == 200


def test_a_wrong_or_missing_token_is_401(server):
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
        r = httpx.post(f"{server.base_url}/v1/code", json={"text": NOTE}, headers=headers)
        assert_error(r, 401, "unauthorized")
    assert_error(httpx.get(f"{server.base_url}/v1/codes"), 401, "unauthorized")


def test_a_public_host_without_a_token_is_refused_before_the_model_loads(pipe):
    proc = start("--pipeline", pipe, "--host", "0.0.0.0", "--port", free_port(), env={"CEC_SERVE_TOKEN": ""})
    _, err = proc.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("cec.serve: error: --host 0.0.0.0 is reachable from other machines")


def test_a_full_queue_answers_503_with_retry_after():
    import uvicorn

    from cec.serve import Coder, make_app

    release = threading.Event()
    coder = Coder(lambda text, note_id: release.wait(60) and {"note": text}, max_queue=2)
    app = make_app(coder, {"codes": []})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(httpx.post, f"{url}/v1/code", json={"text": f"n{i}"}, timeout=60) for i in range(2)]
            while coder.pending < 2:
                time.sleep(0.05)
            r = httpx.post(f"{url}/v1/code", json={"text": "one too many"}, timeout=10)
            assert_error(r, 503, "queue_full")
            assert r.headers["Retry-After"] == "5"
            release.set()
            assert [f.result().status_code for f in waiting] == [200, 200]
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)
