"""The `openai` QA backend, the judge and the request cache against an OpenAI-compatible server started by the
test on 127.0.0.1."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flows import report
from tasks import evaluate, qa
from tasks.files import read_json, read_jsonl, write_jsonl
from tasks.log import PipelineError
from tests.helpers import in_flow, make_params


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
        self.html_seen: set[str] = set()
        self.healthy_budget = None  # after this many answers, every request fails with 500 (a crash mid-way)
        self.bad_auth = 0
        self.good_answers = 0  # well-formed teacher replies sent
        self.html = None  # "first": the first request of each text gets an HTML page with 200; "always": every one


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        srv: FakeLLM = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        if "Reference answer: " in prompt:  # evaluate's judge: 5 when the answer says what the reference says
            return self.grade(prompt)
        text = prompt.split('"""')[1].strip()
        judging = "Rate the pair" in prompt
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
            if srv.html == "always" or (srv.html == "first" and text not in srv.html_seen):
                srv.html_seen.add(text)
                return self.reply(200, b"<html><body>Bad gateway</body></html>", "text/html")
            if judging:  # the judge finds Method3's pair unsupported
                question = prompt.split("Question: ")[1].split("\n")[0]
                content = json.dumps({"faithfulness": 2 if "Method3" in question else 5, "self_contained": 5,
                                      "usefulness": 4})
            elif "MALFORMED" in text:
                content = "Sure! Here are some questions: 1. What is it?"
            else:
                sentence = re.split(r"(?<=\.)\s", text)[0]
                content = json.dumps({"pairs": [{"question": f"What does {text.split()[0]} train?",
                                                 "answer": sentence}]})
                with srv.lock:
                    srv.good_answers += 1
            self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": content}}]})
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def grade(self, prompt):
        with self.server.lock:
            self.server.requests += 1
        reference = prompt.split("Reference answer: ")[1].split("\n")[0]
        answer = prompt.split("Answer to grade: ")[1].split("\n")[0]
        content = "I would say 4." if "GARBLE" in answer else json.dumps({"score": 5 if answer == reference else 1})
        self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})

    def reply(self, status, payload, content_type="application/json"):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
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


def setup(tmp_path, server, n_chunks=12, judge=False, **openai):
    chunks = [{"chunk_id": f"c{i:02d}", "doc_id": f"d{i % 3}", "title": f"Paper {i % 3}", "section": "2 Method",
               "page_start": 1, "page_end": 1, "kind": "text", "n_tokens": 40,
               "text": (f"Method{i} trains only two small matrices per layer while the base stays frozen. "
                        f"It reduces memory by {i + 2} GB. " + ("MALFORMED" if i == 5 else ""))}
              for i in range(n_chunks)]
    cfg = {"base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "model": "fake", "max_concurrency": 2,
           "max_retries": 2, "timeout_s": 10, **openai}
    p = make_params(tmp_path)
    p = p.model_copy(update={"qa": p.qa.model_copy(update={
        "backend": "openai", "min_answer_chars": 10, "openai": p.qa.openai.model_copy(update=cfg),
        "judge": p.qa.judge.model_copy(update={"enabled": judge, "backend": "openai"})})})
    write_jsonl(p.paths.chunks, chunks)
    return p, chunks


def with_qa(p, **fields):
    return p.model_copy(update={"qa": p.qa.model_copy(update=fields)})


def test_openai_backend_generates_retries_bounds_and_counts_malformed(tmp_path, server, monkeypatch, caplog,
                                                                      fresh_cache):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    p, chunks = setup(tmp_path, server)
    server.fail_first_attempt = {chunks[1]["text"].strip(), chunks[7]["text"].strip()}
    with caplog.at_level("DEBUG"):
        kept = in_flow(qa.run, p.qa, p.paths)
    report = read_json(p.paths.qa_report)
    assert report["malformed_replies"] == 1 and report["generated"] == 11 and report["kept"] == kept == 11
    assert report["requests"]["teacher"] == {"cache_hits": 0, "sent": 12, "malformed": 1}
    assert server.requests == 12 + 2  # two 503s retried with backoff
    assert server.max_in_flight <= p.qa.openai.max_concurrency  # the bound holds although more threads run
    assert server.bad_auth == 0
    row = read_jsonl(p.paths.qa)[0]
    assert row["kind"] == "llm" and row["chunk_id"] == "c00" and row["answer"].startswith("Method0 trains")
    # The key is read from the environment and written nowhere: outputs, logs, request cache, Prefect's results.
    for path in [*tmp_path.rglob("*"), *fresh_cache.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text and "OPENAI_API_KEY" not in p.paths.qa_report.read_text()

    # Rerun with a changed filter: every good reply comes from the request cache; only the malformed one is asked
    # again (a malformed reply is never cached as a result).
    server.requests = 0
    in_flow(qa.run, with_qa(p, min_grounding=0.5).qa, p.paths)
    assert server.requests == 1
    assert read_json(p.paths.qa_report)["requests"]["teacher"] == {"cache_hits": 11, "sent": 1, "malformed": 1}


def test_a_crash_half_way_loses_no_finished_reply(tmp_path, server, monkeypatch, fresh_cache):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    p, chunks = setup(tmp_path, server, max_retries=0)
    server.healthy_budget = 5  # the endpoint dies after 5 answers
    with pytest.raises(PipelineError) as err:
        in_flow(qa.run, p.qa, p.paths)
    # One line naming the endpoint, the status and the attempts.
    assert str(err.value) == (f"teacher endpoint {p.qa.openai.base_url} (model fake) failed after 1 attempt(s): "
                              "HTTP 500")
    assert not p.paths.qa.exists()  # nothing half-done is written
    answered = server.good_answers
    server.healthy_budget, server.requests = None, 0
    in_flow(qa.run, p.qa, p.paths)
    assert server.requests == len(chunks) - answered  # every good reply received before the crash was kept
    assert read_json(p.paths.qa_report)["generated"] == len(chunks) - 1


def test_html_bodies_are_retried_then_fail_in_one_line(tmp_path, server, monkeypatch, fresh_cache):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    p, chunks = setup(tmp_path, server, n_chunks=3, max_retries=2)
    server.html = "first"  # a proxy's error page once per text: retried like a 5xx
    assert in_flow(qa.run, p.qa, p.paths) == 3 and server.requests == 6
    p2, _ = setup(tmp_path / "b", server, n_chunks=1, max_retries=2)
    server.html, server.requests = "always", 0
    with pytest.raises(PipelineError, match=r"^teacher endpoint http://127\.0\.0\.1:\d+/v1 \(model fake\) failed "
                                            r"after 3 attempt\(s\): HTTP 200 with a body that is not a chat completion"):
        in_flow(qa.run, p2.qa, p2.paths)
    assert server.requests == 3


def test_judge_rates_each_pair_and_the_keep_rule_is_a_param(tmp_path, server, monkeypatch, fresh_cache):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    p, chunks = setup(tmp_path, server, judge=True)
    in_flow(qa.run, p.qa, p.paths)
    kept, report = read_jsonl(p.paths.qa), read_json(p.paths.qa_report)
    assert report["dropped"] == {"judge_faithfulness": 1}  # Method3's pair; the malformed chunk gave no pair
    assert len(kept) == 10 and not any(k["question"].startswith("What does Method3") for k in kept)
    assert all(k["judge"] == {"faithfulness": 5, "self_contained": 5, "usefulness": 4} for k in kept)
    assert report["judge"]["faithfulness"] == {"2": 1, "5": 10} and report["requests"]["judge"]["sent"] == 11
    # A stricter keep rule drops more pairs without asking the judge (or the teacher) again for a good reply.
    server.requests = 0
    strict = with_qa(p, judge=p.qa.judge.model_copy(update={"min_usefulness": 5}))
    with pytest.raises(PipelineError, match="no question-answer pair survived"):
        in_flow(qa.run, strict.qa, p.paths)
    assert server.requests == 1  # only the malformed teacher reply is asked again
    assert len(read_jsonl(p.paths.qa)) == 10  # the run that kept nothing wrote nothing


def test_evaluate_judge_rates_answers_against_their_reference(tmp_path, server, monkeypatch, fresh_cache):
    """With evaluate.judge.enabled the QA stage's judge endpoint rates every answer 1-5 against its reference: a
    mean with its CI per model and per kind, a rating per prediction, in eval.json and the report table."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    p, _ = setup(tmp_path, server)
    cfg = p.evaluate.model_copy(update={"judge": p.evaluate.judge.model_copy(update={"enabled": True})})
    rows = [{"question": f"What does Method{i} reduce?", "answer": f"Method{i} reduces memory by {i + 2} GB.",
             "kind": "fact" if i % 2 else "method"} for i in range(6)]
    answered = [{"set": evaluate.HELD_OUT, "mode": "closed_book", "rows": rows,
                 "base": ["memory the the of"] * 6,
                 "finetuned": [r["answer"] for r in rows[:4]] + ["Method9 adds latency.", "GARBLE"]}]
    evaluate.judge_answers(answered, cfg, p.qa, p.paths)
    assert server.requests == 12
    flat, predictions = evaluate.score(answered, cfg)
    tuned, base = flat["closed_book"]["finetuned"], flat["closed_book"]["base"]
    assert base["judge"] == 1.0 and base["judge_rated"] == 6
    # Four right answers (5), one wrong (1); the malformed verdict is left out, not counted as a score.
    assert tuned["judge"] == 4.2 and tuned["judge_rated"] == 5 and tuned["judge_ci95"][0] < 4.2 < tuned["judge_ci95"][1]
    assert tuned["by_kind"]["fact"]["judge"] == 5.0 and tuned["by_kind"]["method"]["judge"] == 3.6667
    assert [r["finetuned_judge"] for r in predictions] == [5, 5, 5, 5, 1, None]
    written = evaluate.write_evaluation(p.paths, flat, {}, predictions, {"setting": "none", "documents": [],
                                                                     "held_out_documents": []})
    assert read_json(p.paths.eval_metrics)["closed_book"]["finetuned"]["judge"] == 4.2
    assert "judge" in report.table(written).splitlines()[0] and "4.20" in report.table(written)
    # A rerun asks only for the malformed verdict again.
    server.requests = 0
    evaluate.judge_answers(answered, cfg, p.qa, p.paths)
    assert server.requests == 1


def test_missing_key_is_one_clear_error(tmp_path, server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    p, _ = setup(tmp_path, server, n_chunks=1)
    with pytest.raises(PipelineError, match="environment variable OPENAI_API_KEY"):
        in_flow(qa.run, p.qa, p.paths)


def test_an_invalid_chunks_line_is_named(tmp_path, server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    p, chunks = setup(tmp_path, server, n_chunks=2)
    lines = p.paths.chunks.read_text().splitlines()
    p.paths.chunks.write_text(lines[0] + "\n" + lines[1][:40] + "\n")  # a line cut short (a crash mid-write)
    with pytest.raises(PipelineError, match=r"chunks\.jsonl:2: not valid JSON"):
        in_flow(qa.run, p.qa, p.paths)
    assert server.requests == 0 and not p.paths.qa.exists()
