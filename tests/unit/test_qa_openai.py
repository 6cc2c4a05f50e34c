"""Replies of the `openai` QA backend and judge, parsed strictly (the backend against a server:
tests/integration/test_qa_openai.py)."""

from tasks import qa


def test_strict_json_parsing_of_recorded_replies():
    assert qa.parse_pairs('{"pairs": [{"question": "Q?", "answer": "A."}]}') == [
        {"kind": "llm", "question": "Q?", "answer": "A."}]
    assert qa.parse_pairs('```json\n{"pairs": []}\n```') == []
    # Replies recorded from instruct models: a fenced reply with kinds is parsed; prose around the JSON is not.
    recorded = ('```json\n{"pairs": [{"kind": "definition", "question": "What is weight-decomposed low-rank '
                'adaptation (DoRA)?", "answer": "DoRA splits each weight into a magnitude and a direction."}, '
                '{"kind": "trivia", "question": "Who wrote DoRA?", "answer": "Liu et al."}]}\n```')
    assert [(p["kind"], p["question"][:10]) for p in qa.parse_pairs(recorded)] == [
        ("definition", "What is we"), ("llm", "Who wrote ")]
    for bad in ("Sure: Q? A.", '{"pairs": [{"question": "Q?"}]}', '[{"question": "Q?", "answer": "A"}]',
                '{"pairs": "none"}', 'Here you go:\n{"pairs": []}'):
        assert qa.parse_pairs(bad) is None
    assert qa.parse_verdict('{"faithfulness": 5, "self_contained": 4, "usefulness": 3, "why": "ok"}') == {
        "faithfulness": 5, "self_contained": 4, "usefulness": 3}
    for bad in ('{"faithfulness": 6, "self_contained": 4, "usefulness": 3}', '{"faithfulness": "5"}', "5/5/5"):
        assert qa.parse_verdict(bad) is None
