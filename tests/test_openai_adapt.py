"""The OpenAI backend adapts to what a server accepts, and stops a job when the server is gone.

`StrictServer` answers like `transformers serve` 5.24 does (seen against the real one): HTTP 422 with a FastAPI
`{"detail": "Unexpected fields in the request: {...}"}` for `top_k` and for `continue_final_message` /
`add_generation_prompt`, and one choice whatever `n` asks. It records every chat request body.
"""

from __future__ import annotations

import json
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_gen.backends import BackendUnavailable, GenerationRequest, SamplingParams
from data_gen.backends.openai_compat import OpenAIBackend, _snippet

MODEL = "tiny"
REFUSED = {"top_k", "continue_final_message", "add_generation_prompt"}


class StrictServer:
    def __init__(self, refused=REFUSED, one_choice: bool = True, constant: bool = False):
        self.bodies: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def send_json(self, status: int, obj: object) -> None:
                raw = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                unexpected = sorted(set(body) & refused)
                if unexpected:
                    self.send_json(422, {"detail": f"Unexpected fields in the request: {set(unexpected)}"})
                    return
                n = 1 if one_choice else body.get("n", 1)
                seed = None if constant else body.get("seed")  # constant: the same text for every seed
                choices = [{"index": i, "message": {"role": "assistant", "content": f"seed {seed} choice {i}"},
                            "finish_reason": "stop"} for i in range(n)]
                self.send_json(200, {"object": "chat.completion", "choices": choices,
                                     "usage": {"completion_tokens": 3 * n}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def strict():
    srv = StrictServer()
    yield srv
    srv.close()


def client(url: str, **kw) -> OpenAIBackend:
    options = dict(model=MODEL, base_url=url, timeout_s=2.0, max_retries=1, rng=random.Random(0),
                   sleep=lambda s: None)
    return OpenAIBackend(**(options | kw))


def request(n: int = 1, seed: int = 10, prefix: str | None = None) -> GenerationRequest:
    return GenerationRequest(id="q", prompt="What is 1 + 2?", seed=seed, assistant_prefix=prefix,
                             sampling=SamplingParams(temperature=0.7, top_k=50, n=n, max_new_tokens=4))


def test_fastapi_detail_bodies_are_read():
    assert _snippet(b'{"detail": "Unexpected fields in the request: {\'top_k\'}"}') == \
        "Unexpected fields in the request: {'top_k'}"
    pydantic = json.dumps({"detail": [{"loc": ["body", "top_k"], "msg": "Extra inputs are not permitted"}]})
    assert _snippet(pydantic.encode()) == "top_k: Extra inputs are not permitted"
    assert _snippet(b'{"error": {"message": "bad image"}}') == "bad image"


def test_probe_drops_rejected_fields_and_splits_n_into_seeded_requests(strict, caplog):
    backend = client(strict.url)
    with caplog.at_level("WARNING", logger="mmalign.backends.openai"):
        backend.check()
    assert backend.dropped == {"top_k"} and backend.split_n
    assert sum("rejects top_k" in r.message for r in caplog.records) == 1
    assert sum("returned 1 choice(s) for n=2" in r.message for r in caplog.records) == 1
    strict.bodies.clear()
    [result] = backend.generate([request(n=3, seed=10)])
    # three requests of one sample each, seeded 10, 11, 12, none with top_k
    assert [(b["n"], b["seed"], "top_k" in b) for b in strict.bodies] == [(1, 10, False), (1, 11, False),
                                                                          (1, 12, False)]
    assert result.texts == ["seed 10 choice 0", "seed 11 choice 0", "seed 12 choice 0"]
    assert result.num_generated_tokens == 9
    assert result.applied == {"n": 3, "temperature": 0.7, "top_p": 1.0, "seed": 10, "max_tokens": 4,
                              "requests": 3, "n_per_request": 1, "dropped": ["top_k"]}


def test_a_server_that_accepts_everything_is_left_alone():
    srv = StrictServer(refused=set(), one_choice=False)
    try:
        backend = client(srv.url)
        backend.check()
        backend.check_continuation()
        assert backend.dropped == set() and not backend.split_n
        [result] = backend.generate([request(n=2)])
        assert len(srv.bodies[-1]) and srv.bodies[-1]["n"] == 2 and srv.bodies[-1]["top_k"] == 50
        assert result.texts == ["seed 10 choice 0", "seed 10 choice 1"] and "dropped" not in result.applied
    finally:
        srv.close()


def test_continuation_refused_fails_up_front_with_one_line(strict):
    backend = client(strict.url)
    with pytest.raises(BackendUnavailable) as err:
        backend.check_continuation()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"OpenAI-compatible server at {strict.url} cannot continue a partial assistant message")
    assert "continue_final_message" in message and "vLLM" in message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_stops_after_consecutive_connection_failures():
    """Nothing listens: each of 10 requests would make 2 attempts (20 in all); after 3 refused connections in a
    row GET /models is tried, fails, and generate raises BackendUnavailable, one line."""
    backend = client(f"http://127.0.0.1:{free_port()}/v1", max_connection_failures=3, max_concurrency=1)
    requests = [GenerationRequest(id=f"q{i}", prompt="1 + 2?") for i in range(10)]
    with pytest.raises(BackendUnavailable) as err:
        backend.generate(requests)
    message = str(err.value)
    assert message.startswith("openai backend: the server stopped answering (3 connection failures in a row")
    assert "rerun to resume" in message and "\n" not in message


def test_a_live_server_after_failures_resets_the_count(strict):
    """Connection failures that GET /models contradicts (the server answers) do not stop anything."""
    backend = client(strict.url, max_connection_failures=1)
    backend.check()
    backend._connection_failed("connection failed: test")  # the re-check finds the server alive
    assert backend._dead is None
    [result] = backend.generate([request()])
    assert result.ok


def test_after_one_request_of_a_group_failed_the_rest_is_not_sent(strict):
    """Four continuations of solution "s" and one of "t", one at a time: the server refuses the first (422, not
    retried), so the other three of "s" are not sent; "t" is."""
    backend = client(strict.url, max_concurrency=1)
    backend.check()  # top_k dropped
    strict.bodies.clear()
    requests = [GenerationRequest(id=f"s/{j}", prompt="1 + 2?", assistant_prefix="1 +", group="s") for j in range(4)]
    requests.append(GenerationRequest(id="t/0", prompt="2 + 2?", group="t"))
    results = backend.generate(requests)
    assert results[0].error.startswith("HTTP 422: Unexpected fields in the request")
    assert [r.error for r in results[1:4]] == ["not sent: another request of 's' failed"] * 3
    assert results[4].ok and len(strict.bodies) == 2


def test_a_server_that_ignores_temperature_is_reported(caplog):
    """A server that answers the same text whatever the seed (greedy): one logged line at check()."""
    srv = StrictServer(refused=set(), one_choice=False)
    backend = client(srv.url)
    with caplog.at_level("WARNING", logger="mmalign.backends.openai"):
        backend.check()  # "seed 1 choice 0" != "seed 2 choice 0": samples
    assert not backend.greedy_suspected and not any("greedily" in r.message for r in caplog.records)
    srv.close()
    srv = StrictServer(refused=set(), one_choice=False, constant=True)
    backend = client(srv.url)
    with caplog.at_level("WARNING", logger="mmalign.backends.openai"):
        backend.check()
    assert backend.greedy_suspected
    assert sum("may sample greedily" in r.message for r in caplog.records) == 1
    srv.close()
