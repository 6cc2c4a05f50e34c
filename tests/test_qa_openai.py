"""The `openai` QA backend against an OpenAI-compatible server started by the test on 127.0.0.1."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks import qa
from tasks.common import read_json, read_jsonl, write_jsonl
from tests.conftest import in_flow, make_params

SECRET = "sk-test-" + "9f2c" * 8


class FakeLLM(ThreadingHTTPServer):
    """/v1/chat/completions: answers with pairs taken from the prompt's text; can fail on purpose."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self.fail_first_attempt: set[str] = set()  # texts whose first request gets a 503 (retry must recover)
        self.seen: set[str] = set()
        self.healthy_budget = None  # after this many answers, every request fails with 500 (a crash mid-way)
        self.bad_auth = 0


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        srv: FakeLLM = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        text = prompt.split('"""')[1].strip()
        with srv.lock:
            srv.requests += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            if self.headers.get("Authorization") != f"Bearer {SECRET}":
                srv.bad_auth += 1
            first_try = text in srv.fail_first_attempt and text not in srv.seen
            srv.seen.add(text)
            broken = srv.healthy_budget is not None and srv.healthy_budget <= 0
            if srv.healthy_budget is not None and not broken and not first_try:
                srv.healthy_budget -= 1
        time.sleep(0.05)  # long enough for concurrent requests to overlap
        try:
            if first_try or broken:
                return self.reply(503 if first_try else 500, {"error": {"message": "overloaded"}})
            if "MALFORMED" in text:
                content = "Sure! Here are some questions: 1. What is it?"
            else:
                sentence = re.split(r"(?<=\.)\s", text)[0]
                content = json.dumps({"pairs": [{"question": f"What does the text say about {text.split()[0]}?",
                                                 "answer": sentence}]})
            self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": content}}]})
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = FakeLLM()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def setup(tmp_path, server, n_chunks=12, **openai):
    chunks = [{"chunk_id": f"c{i:02d}", "doc_id": f"d{i % 3}", "title": f"Paper {i % 3}", "section": "2 Method",
               "page_start": 1, "page_end": 1,
               "text": (f"Method{i} trains only two small matrices per layer while the base stays frozen. "
                        f"It reduces memory by {i + 2} GB. " + ("MALFORMED" if i == 5 else ""))}
              for i in range(n_chunks)]
    cfg = {"base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "model": "fake", "max_concurrency": 2,
           "max_retries": 2, "timeout_s": 10, **openai}
    p = make_params(tmp_path)
    p = p.model_copy(update={"qa": p.qa.model_copy(update={
        "backend": "openai", "min_answer_chars": 10, "openai": p.qa.openai.model_copy(update=cfg)})})
    write_jsonl(p.paths.chunks, chunks)
    return p, chunks


def test_openai_backend_generates_retries_bounds_and_counts_malformed(tmp_path, server, monkeypatch, caplog,
                                                                      fresh_cache):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    p, chunks = setup(tmp_path, server)
    server.fail_first_attempt = {chunks[1]["text"].strip(), chunks[7]["text"].strip()}
    with caplog.at_level("DEBUG"):
        kept = in_flow(qa.run, p.qa, p.paths)
    report = read_json(p.paths.qa_report)
    assert report["malformed_replies"] == 1 and report["generated"] == 11 and report["kept"] == len(kept) == 11
    assert server.requests == 12 + 2  # two 503s retried with backoff
    assert server.max_in_flight <= p.qa.openai.max_concurrency  # the bound holds although more threads run
    assert server.bad_auth == 0
    row = read_jsonl(p.paths.qa)[0]
    assert row["kind"] == "llm" and row["chunk_id"] == "c00" and row["answer"].startswith("Method0 trains")
    # The key is read from the environment and written nowhere: outputs, logs, Prefect's result cache.
    for path in [*tmp_path.rglob("*"), *fresh_cache.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text and "OPENAI_API_KEY" not in p.paths.qa_report.read_text()


def test_a_crash_half_way_loses_no_finished_chunk(tmp_path, server, monkeypatch, fresh_cache):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    p, chunks = setup(tmp_path, server, max_retries=0)
    server.healthy_budget = 5  # the endpoint dies after 5 answers
    with pytest.raises(Exception, match="overloaded|Internal|500"):
        in_flow(qa.run, p.qa, p.paths)
    answered = 5
    server.healthy_budget, server.requests = None, 0
    in_flow(qa.run, p.qa, p.paths)
    assert server.requests == len(chunks) - answered  # the finished chunks came from the cache
    assert read_json(p.paths.qa_report)["generated"] == len(chunks) - 1


def test_missing_key_is_one_clear_error(tmp_path, server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    p, _ = setup(tmp_path, server, n_chunks=1)
    with pytest.raises(Exception, match="environment variable OPENAI_API_KEY"):
        in_flow(qa.run, p.qa, p.paths)


def test_strict_json_parsing():
    assert qa.parse_pairs('{"pairs": [{"question": "Q?", "answer": "A."}]}') == [
        {"kind": "llm", "question": "Q?", "answer": "A."}]
    assert qa.parse_pairs('```json\n{"pairs": []}\n```') == []
    for bad in ("Sure: Q? A.", '{"pairs": [{"question": "Q?"}]}', '[{"question": "Q?", "answer": "A"}]',
                '{"pairs": "none"}'):
        assert qa.parse_pairs(bad) is None
