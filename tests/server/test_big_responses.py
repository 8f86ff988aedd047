"""Hardening round 2, item 3: a 7 KB request (1,350 prompt tokens, n 64, prompt_logprobs 20) made
a 126 MB answer (the prompt logprobs repeated in each choice) that was built and serialized on
the event loop: /health stalled 15-20 s. Now the prompt logprob entries of one answer are
capped (a 400 naming the limit), a prompt's are built once, streams send them once per prompt,
and big answers are built and serialized off the event loop, in pieces: /health answers in
under a second while an answer just under the cap is made."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from server.api.encoder import encode_json
from server.api.prompt_logprobs import MAX_PROMPT_LOGPROB_ENTRIES
from tests.server.conftest import ServerProcess, start_server
from tests.server.test_errors import assert_error

WORDS = "The list data type has some more methods. Here are all of the methods of list objects. "


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(["--max-model-len", "2048", "--num-kv-blocks", "1024", "--max-num-seqs", "16", "--seed", "0",
                      "--drain-timeout", "5"], tmp_path_factory.mktemp("big-answers"))
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


@pytest.fixture(scope="module")
def prompt(big: ServerProcess) -> tuple[str, int]:
    """A prompt of about 1,350 tokens (the issue's) and its token count."""
    text = WORDS * 90
    with httpx.Client(base_url=big.url, timeout=60) as c:
        while (count := c.post("/tokenize", json={"prompt": text}).json()["count"]) > 1350:
            text = text[: -len(WORDS)]
    return text, count


def test_prompt_logprob_entries_are_capped_with_a_400_naming_the_limit(big: ServerProcess, prompt) -> None:
    text, count = prompt
    with httpx.Client(base_url=big.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": text, "n": 16, "prompt_logprobs": 20, "logprobs": 20,
                                            "max_tokens": 64})
        assert_error(r, 400, param="prompt_logprobs")
        message = r.json()["error"]["message"]
        assert str(MAX_PROMPT_LOGPROB_ENTRIES) in message and str(16 * count * 21) in message, message
        # echo + logprobs repeat the prompt's entries in each choice too
        r = c.post("/v1/completions", json={"prompt": text, "n": 16, "echo": True, "logprobs": 20, "max_tokens": 1})
        assert_error(r, 400, param="logprobs")
        # chat sends them once per answer: the same prompt is fine there, with n too
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "n": 4,
                                                 "prompt_logprobs": 20, "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["prompt_logprobs"]) > count
        assert c.get("/health").status_code == 200
        schema = c.get("/openapi.json").json()["components"]["schemas"]
        for model in ("CompletionRequest", "ChatCompletionRequest"):
            assert str(MAX_PROMPT_LOGPROB_ENTRIES) in schema[model]["properties"]["prompt_logprobs"]["description"]
    with pytest.raises(openai.BadRequestError, match="prompt logprob entries"):
        big.client().completions.create(model=None, prompt=text, n=12, max_tokens=4,  # type: ignore[arg-type]
                                        extra_body={"prompt_logprobs": 20})


def test_health_answers_in_under_a_second_while_a_big_answer_is_made(big: ServerProcess, prompt) -> None:
    text, count = prompt
    n = MAX_PROMPT_LOGPROB_ENTRIES // (count * 21)  # just under the cap: 9 copies of ~1,350 x 21 entries
    body = {"prompt": text, "n": n, "prompt_logprobs": 20, "logprobs": 20, "max_tokens": 8, "temperature": 0}
    worst, done = [0.0], threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=big.url, timeout=60) as c:
            while not done.is_set():
                start = time.perf_counter()
                assert c.get("/health").status_code == 200
                worst[0] = max(worst[0], time.perf_counter() - start)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with httpx.Client(base_url=big.url, timeout=300) as c:
            whole = c.post("/v1/completions", json=body)
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finally:
        done.set()
        poller.join()
    assert whole.status_code == 200
    assert worst[0] < 1.0, f"/health took {worst[0]:.2f}s while the answer was made"
    choices = whole.json()["choices"]
    assert len(choices) == n and len(whole.content) > 10_000_000
    first = choices[0]["prompt_logprobs"]
    assert len(first) == count and first[0] is None and all(c["prompt_logprobs"] == first for c in choices)
    assert all(len(entry) >= 20 for entry in first[1:])  # the prompt token and its top 20
    carrying = [ch for chunk in chunks for ch in chunk["choices"] if "prompt_logprobs" in ch]
    assert len(carrying) == 1 and carrying[0]["prompt_logprobs"] == first  # once per prompt when streamed
    streamed = {}
    for chunk in chunks:
        for ch in chunk["choices"]:
            streamed[ch["index"]] = streamed.get(ch["index"], "") + ch["text"]
    assert streamed == {c["index"]: c["text"] for c in choices}


@pytest.mark.parametrize("obj", [
    {"a": [1, 2.5, None, True, "é\u2028\"\\"], "b": {}, "c": [], "d": [[{"x": [0] * 600}] * 3] * 300},
    [{"prompt_logprobs": [None] + [{str(t): {"logprob": -1.5, "rank": 1, "decoded_token": "ß"}} for t in range(700)]}],
    {"choices": [{"index": i, "text": "x" * i, "logprobs": {"tokens": ["a"] * 1000}} for i in range(70)]},
    "plain", 3, None, [], {1: "int key", None: "null key"},
])
def test_encode_json_is_json_dumps_in_pieces(obj) -> None:
    expected = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    assert encode_json(obj) == expected
    with pytest.raises(ValueError):
        encode_json({"x": [float("nan")]})
