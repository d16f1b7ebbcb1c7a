"""The OpenAI-compatible rollout backend against a real HTTP server on 127.0.0.1 that misbehaves on cue.

The fake server picks its reply from a script keyed by the first word of the request's user text: the script is
the list of actions for attempt 1, 2, ... of that key (the last action repeats), so every test states exactly what
the server does and can count the attempts it got. Timeouts are tenths of a second and the backoff sleeps are
recorded instead of slept (with jitter drawn from random.Random(0)), so the file runs in a few seconds.

Backoff arithmetic used below: full jitter sleeps uniform(0, min(backoff_max_s, backoff_base_s * 2**retry)), i.e.
cap * u with u the next draw of random.Random(0): u0 = 0.8444218515250481, u1 = 0.7579544029403025,
u2 = 0.420571580830845, u3 = 0.25891675029296335.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from data_gen.backends import (
    BackendUnavailable,
    GenerationRequest,
    SamplingParams,
    image_data_url,
    make_backend,
    openai_messages,
)
from data_gen.backends.openai_compat import OpenAIBackend, backoff_delay
from data_gen.backends.vllm_offline import VLLM_MISSING
from rlhf.errors import UserError

U = [0.8444218515250481, 0.7579544029403025, 0.420571580830845, 0.25891675029296335]
MODEL = "tiny-internvl"
SLOW_REPLY_S = 0.6  # the "sleep" action holds its reply this long; clients here time out after 0.2 s


class FakeServer:
    """/v1/models and /v1/chat/completions on 127.0.0.1:<free port>, replying per `script` (see module doc).

    Actions: ok (n choices, sent in reverse index order, text "<key> reply <i>", usage 7 tokens per choice),
    sleep (reply ok after SLOW_REPLY_S), slow (reply ok after 0.1 s), drop (close the socket without a reply),
    500 / 429 / 400 (an OpenAI error object), malformed (200 with a body that is not JSON), nochoices (200 JSON
    without choices). It records each request body per key and the most requests it had in flight at once."""

    def __init__(self) -> None:
        self.script: dict[str, list[str]] = {}
        self.attempts: Counter[str] = Counter()
        self.bodies: dict[str, list[dict]] = {}
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def send_json(self, status: int, obj: object, headers: dict | None = None) -> None:
                self.send_raw(status, json.dumps(obj).encode(), headers)

            def send_raw(self, status: int, raw: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                else:
                    self.send_json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions"
                content = body["messages"][-1 if body["messages"][-1]["role"] == "user" else -2]["content"]
                text = content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")
                key = text.split()[0]
                with server.lock:
                    server.attempts[key] += 1
                    server.bodies.setdefault(key, []).append(body)
                    steps = server.script[key.split("-")[0]]
                    action = steps[min(server.attempts[key], len(steps)) - 1]
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                if action in ("sleep", "slow"):
                    time.sleep(SLOW_REPLY_S if action == "sleep" else 0.1)
                with server.lock:  # leaves the count before replying: the client may send its next one at once
                    server.inflight -= 1
                try:
                    self.act(action, key, body["n"])
                except OSError:  # the client gave up on a slow reply
                    pass

            def act(self, action: str, key: str, n: int) -> None:
                if action in ("ok", "sleep", "slow"):
                    choices = [{"index": i, "message": {"role": "assistant", "content": f"{key} reply {i}"},
                                "finish_reason": "stop"} for i in reversed(range(n))]
                    self.send_json(200, {"object": "chat.completion", "choices": choices,
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 7 * n}})
                elif action == "drop":
                    self.close_connection = True  # the server closes the socket: the client sees no status line
                elif action in ("500", "429", "400"):
                    message = {"500": "engine died", "429": "too many requests", "400": "bad image"}[action]
                    headers = {"Retry-After": "0.25"} if action == "429" else None
                    self.send_raw(int(action), json.dumps({"error": {"message": message}}).encode(), headers)
                elif action == "malformed":
                    self.send_raw(200, b"{not json")
                elif action == "nochoices":
                    self.send_json(200, {"object": "chat.completion"})
                else:
                    raise AssertionError(f"unknown action {action}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.close()


def make_client(server: FakeServer, sleeps: list[float], **kwargs) -> OpenAIBackend:
    options = dict(model=MODEL, base_url=server.url, timeout_s=0.2, max_retries=4, backoff_base_s=0.5,
                   backoff_max_s=8.0, rng=random.Random(0), sleep=sleeps.append)
    options.update(kwargs)
    return make_backend("openai", **options)


def request(prompt: str, **kwargs) -> GenerationRequest:
    return GenerationRequest(id=prompt.split()[0], prompt=prompt, **kwargs)


def test_jitter_draws_match_the_documented_numbers():
    rng = random.Random(0)
    assert [rng.random() for _ in range(4)] == U
    # retry 0..4 with base 0.5, cap 1.5: caps 0.5, 1.0, 1.5 (2.0 capped), 1.5 (4.0 capped)
    rng = random.Random(0)
    got = [backoff_delay(r, 0.5, 1.5, rng) for r in range(4)]
    assert got == pytest.approx([0.5 * U[0], 1.0 * U[1], 1.5 * U[2], 1.5 * U[3]])


def test_normal_reply_sends_the_sampling_settings_and_the_exact_image_pixels(server):
    server.script["normal:"] = ["ok"]
    red_green = Image.new("RGB", (5, 3))
    red_green.putdata([(40 * i % 256, 17 * i % 256, 255 - 9 * i) for i in range(15)])
    gray = Image.new("L", (2, 4))
    gray.putdata([0, 31, 62, 93, 124, 155, 186, 217])
    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, max_new_tokens=64, n=3, stop=["\n\nQ:"])
    req = request("normal: Compare <image> with <image>. Which is larger?", images=[red_green, gray],
                  sampling=sampling, seed=1234, system="Reason step by step.")
    sleeps: list[float] = []
    [result] = make_client(server, sleeps).generate([req])

    # the server sent choices 2, 1, 0: the client puts them back in index order; usage 7 tokens x 3 choices
    assert result.texts == ["normal: reply 0", "normal: reply 1", "normal: reply 2"]
    assert result.num_generated_tokens == 21 and result.error is None and result.id == "normal:"
    assert server.attempts["normal:"] == 1 and sleeps == []

    [body] = server.bodies["normal:"]
    assert {k: body[k] for k in ("model", "n", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop")} == {
        "model": MODEL, "n": 3, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "max_tokens": 64, "seed": 1234,
        "stop": ["\n\nQ:"]}
    assert "continue_final_message" not in body
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Reason step by step."}
    assert user["role"] == "user"
    parts = user["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert [p["text"] for p in parts if p["type"] == "text"] == ["normal: Compare ", " with ", ". Which is larger?"]
    for part, original in zip([p for p in parts if p["type"] == "image_url"], [red_green, gray]):
        head, data = part["image_url"]["url"].split(",", 1)
        assert head == "data:image/png;base64"
        decoded = Image.open(io.BytesIO(base64.b64decode(data)))
        assert decoded.mode == original.mode and decoded.size == original.size
        assert decoded.tobytes() == original.tobytes()


def test_request_body_seed_top_k_and_assistant_prefix():
    client = OpenAIBackend(model=MODEL, base_url="http://127.0.0.1:9/v1")
    # the request's seed wins over the sampling seed; without it the sampling seed goes out; top_k None is not sent
    body = client.request_body(request("q1 text only", sampling=SamplingParams(seed=7, top_k=None)))
    assert body["seed"] == 7 and "top_k" not in body
    assert body["messages"] == [{"role": "user", "content": "q1 text only"}]
    assert client.request_body(request("q1", sampling=SamplingParams(seed=7), seed=99))["seed"] == 99
    assert "seed" not in client.request_body(request("q1"))
    # defaults are the MMPR rollout settings
    body = client.request_body(request("q1"))
    assert (body["n"], body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (1, 0.7, 1.0, 50, 4096)
    # a prefix to continue: final assistant message plus vLLM's continue_final_message
    body = client.request_body(request("q2 Solve it.", assistant_prefix="Step 1: x = 2.\n\n"))
    assert body["messages"][-1] == {"role": "assistant", "content": "Step 1: x = 2.\n\n"}
    assert (body["add_generation_prompt"], body["continue_final_message"]) == (False, True)


def test_image_without_placeholder_goes_first_and_jpeg_urls():
    img = Image.new("RGBA", (3, 3), (10, 20, 30, 128))
    [user] = openai_messages(request("q3 What colour?", images=[img]), image_format="jpeg")
    assert [p["type"] for p in user["content"]] == ["image_url", "text"]
    assert user["content"][1]["text"] == "\nq3 What colour?"
    assert user["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert image_data_url(img).startswith("data:image/png;base64,")


def test_placeholder_mismatch_is_a_per_request_error_and_the_batch_goes_on(server):
    server.script["fine"] = ["ok"]
    img = Image.new("RGB", (2, 2))
    reqs = [request("bad <image> and <image>", images=[img]), request("fine question")]
    bad, fine = make_client(server, []).generate(reqs)
    assert bad.error == "cannot build the request: request 'bad': prompt has 2 <image> placeholder(s) but 1 image(s)"
    assert bad.texts == [] and "bad" not in server.attempts
    assert fine.texts == ["fine reply 0"]


def test_timeout_then_success(server):
    server.script["slowfirst"] = ["sleep", "ok"]
    sleeps: list[float] = []
    start = time.monotonic()
    [result] = make_client(server, sleeps).generate([request("slowfirst q")])
    assert result.texts == ["slowfirst reply 0"] and result.error is None
    assert server.attempts["slowfirst"] == 2
    assert sleeps == pytest.approx([0.5 * U[0]])  # one retry: cap 0.5
    assert time.monotonic() - start < SLOW_REPLY_S  # the client gave up at 0.2 s, it did not wait for the reply
    server.script["hung"] = ["sleep"]
    [result] = make_client(server, sleeps, max_retries=0).generate([request("hung q")])
    assert result.error == "no reply within 0.2 s (gave up after 1 attempt)"


def test_dropped_connection_then_success(server):
    server.script["drop"] = ["drop", "ok"]
    sleeps: list[float] = []
    [result] = make_client(server, sleeps).generate([request("drop q")])
    assert result.texts == ["drop reply 0"] and server.attempts["drop"] == 2 and len(sleeps) == 1
    server.script["gone"] = ["drop"]
    [result] = make_client(server, sleeps, max_retries=1).generate([request("gone q")])
    assert result.error == ("connection failed: RemoteDisconnected: Remote end closed connection without response "
                            "(gave up after 2 attempts)")


def test_http_500_twice_then_success(server):
    server.script["flaky"] = ["500", "500", "ok"]
    sleeps: list[float] = []
    [result] = make_client(server, sleeps).generate([request("flaky q")])
    assert result.texts == ["flaky reply 0"] and result.num_generated_tokens == 7
    assert server.attempts["flaky"] == 3
    assert sleeps == pytest.approx([0.5 * U[0], 1.0 * U[1]])


def test_malformed_json_then_success(server):
    server.script["garbled"] = ["malformed", "ok"]
    [result] = make_client(server, []).generate([request("garbled q")])
    assert result.texts == ["garbled reply 0"] and server.attempts["garbled"] == 2


def test_persistent_missing_choices_gives_up_as_malformed(server):
    server.script["empty"] = ["nochoices"]
    sleeps: list[float] = []
    [result] = make_client(server, sleeps, max_retries=2).generate([request("empty q")])
    assert server.attempts["empty"] == 3 and len(sleeps) == 2
    assert result.error.startswith("malformed reply: no 'choices' list in ")
    assert result.error.endswith("(gave up after 3 attempts)") and result.texts == []


def test_persistent_500_makes_exactly_max_retries_plus_one_attempts(server):
    server.script["dead"] = ["500"]
    sleeps: list[float] = []
    [result] = make_client(server, sleeps, backoff_max_s=1.5).generate([request("dead q")])
    assert server.attempts["dead"] == 5  # 1 + max_retries (4)
    assert result.error == "HTTP 500: engine died (gave up after 5 attempts)"
    # caps 0.5, 1.0, then 2.0 and 4.0 cut to backoff_max_s = 1.5; no sleep after the last attempt
    assert sleeps == pytest.approx([0.5 * U[0], 1.0 * U[1], 1.5 * U[2], 1.5 * U[3]])


def test_400_is_not_retried_and_other_requests_still_succeed(server):
    server.script.update({"rejected": ["400"], "a": ["ok"], "b": ["ok"]})
    sleeps: list[float] = []
    results = make_client(server, sleeps).generate([request("a q"), request("rejected q"), request("b q")])
    assert [r.id for r in results] == ["a", "rejected", "b"]
    assert results[1].error == "HTTP 400: bad image" and results[1].texts == []
    assert server.attempts["rejected"] == 1 and sleeps == []
    assert results[0].texts == ["a reply 0"] and results[2].texts == ["b reply 0"]


def test_429_waits_at_least_retry_after(server):
    server.script["busy"] = ["429", "ok"]
    sleeps: list[float] = []
    [result] = make_client(server, sleeps, backoff_base_s=0.01).generate([request("busy q")])
    # jitter 0.01 * U[0] = 0.0084 is below the server's Retry-After 0.25, so the client sleeps 0.25
    assert result.ok and server.attempts["busy"] == 2 and sleeps == [0.25]


def test_concurrency_is_bounded_and_results_keep_request_order(server):
    server.script["slow"] = ["slow"]
    reqs = [request(f"slow-{i} q") for i in range(9)]
    results = make_client(server, [], max_concurrency=3, timeout_s=2.0).generate(reqs)
    assert [r.texts for r in results] == [[f"slow-{i} reply 0"] for i in range(9)]
    # each reply takes 0.1 s, so three threads are all in flight at once, and never a fourth
    assert server.max_inflight == 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_passes_and_names_a_missing_model(server):
    make_client(server, []).check()
    with pytest.raises(BackendUnavailable) as err:
        make_client(server, [], model="InternVL3-8B").check()
    assert str(err.value) == (f"OpenAI-compatible server at {server.url} does not serve model 'InternVL3-8B' "
                              f"(it serves: {MODEL})")


def test_check_fails_fast_when_nothing_listens():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = OpenAIBackend(model=MODEL, base_url=url, timeout_s=5.0)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable) as err:
        client.check()
    assert time.monotonic() - start < 1.0
    message = str(err.value)
    assert message.startswith(f"cannot reach OpenAI-compatible server at {url}: ConnectionRefusedError")
    assert "\n" not in message


def test_unreachable_server_during_generate_is_retried_then_reported():
    sleeps: list[float] = []
    client = OpenAIBackend(model=MODEL, base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1,
                           rng=random.Random(0), sleep=sleeps.append)
    [result] = client.generate([request("q")])
    assert result.error.startswith("connection failed: ConnectionRefusedError")
    assert result.error.endswith("(gave up after 2 attempts)") and sleeps == pytest.approx([0.5 * U[0]])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_what_to_install():
    with pytest.raises(BackendUnavailable) as err:
        make_backend("vllm", model_path="OpenGVLab/InternVL3-1B", tensor_parallel_size=1)
    assert str(err.value) == VLLM_MISSING
    assert "\n" not in VLLM_MISSING and "pip install 'mmalign[vllm]'" in VLLM_MISSING


def test_unknown_backend_and_bad_settings_are_one_line_user_errors():
    with pytest.raises(UserError, match=r"^unknown rollout backend 'tgi': choose one of hf, vllm, openai$"):
        make_backend("tgi")
    with pytest.raises(UserError, match=r"^SamplingParams.top_p must be in \(0, 1\], got 0$"):
        SamplingParams(top_p=0)
    with pytest.raises(UserError, match=r"^openai backend: base_url must look like http://HOST:PORT/v1"):
        OpenAIBackend(model=MODEL, base_url="127.0.0.1:8000")
