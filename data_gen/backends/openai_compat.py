"""A rollout backend for any OpenAI-compatible chat server (`vllm serve`, SGLang, LMDeploy, a hosted API).

Each request is one POST to `{base_url}/chat/completions` asking for `n` samples, with `top_k` as the extra field
vLLM and SGLang accept, and the request's seed passed through. Requests run on at most `max_concurrency` threads.

A failed attempt is retried with exponential backoff and full jitter (sleep a uniform draw from
[0, min(backoff_max_s, backoff_base_s * 2**retry)]) when it may succeed later: a timeout, a refused or dropped
connection, HTTP 429 or 5xx, or a 200 whose body is not a chat completion ("malformed reply"). Any other HTTP
status (400, 401, 404, ...) is not retried. After the last attempt the request's result carries the error; the
batch goes on. Only the standard library is used (no proxy support: point `base_url` at the server itself).
"""

from __future__ import annotations

import http.client
import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from rlhf.errors import UserError

from .base import (
    BackendUnavailable,
    GenerationRequest,
    GenerationResult,
    ImageFormat,
    RolloutBackend,
    openai_messages,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # where `vllm serve` listens by default


def backoff_delay(retry: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: a uniform draw from [0, min(max_s, base_s * 2**retry)], `retry` counting from 0."""
    return rng.uniform(0.0, min(max_s, base_s * 2.0**retry))


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _NotRetryable(Exception):
    pass


def _snippet(raw: bytes, limit: int = 200) -> str:
    """The server's error message when the body is an OpenAI error object, else the start of the body, on one line."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
        if msg:
            text = str(msg)
    except ValueError:
        pass
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: ignore it and use the backoff
        return None


def parse_completion(raw: bytes, n: int) -> tuple[list[str], int | None]:
    """(texts in choice order, usage.completion_tokens or None) from a chat completion body; `_Retryable`
    ("malformed reply: ...") when the body is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise _Retryable(f"malformed reply: not JSON: {_snippet(raw, 80)!r}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise _Retryable(f"malformed reply: no 'choices' list in {_snippet(raw, 80)!r}")
    if len(choices) != n:
        raise _Retryable(f"malformed reply: asked for n={n} choices, got {len(choices)}")
    texts: list[tuple[int, str]] = []
    for pos, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise _Retryable(f"malformed reply: choice {pos} has no message.content string")
        index = choice.get("index", pos)
        texts.append((index if isinstance(index, int) else pos, content))
    usage = data.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return [t for _, t in sorted(texts, key=lambda x: x[0])], tokens if isinstance(tokens, int) else None


class OpenAIBackend(RolloutBackend):
    """Sample from an OpenAI-compatible chat server.

    `timeout_s` is the socket timeout of one attempt (to connect, and to wait for each piece of the reply);
    `max_retries` counts the attempts after the first, so a request makes at most `max_retries + 1`. `rng` draws
    the backoff jitter and `sleep` waits it out: pass a seeded `random.Random` and a fake sleep in tests.
    `extra_body` is merged into every request body (e.g. {"repetition_penalty": 1.05}); `image_format` is how
    images travel (PNG: exact pixels). A request with an `assistant_prefix` sends it as a final assistant message
    with vLLM's `continue_final_message`."""

    def __init__(
        self,
        *,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        image_format: ImageFormat | str = ImageFormat.PNG,
        extra_body: dict | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UserError(f"openai backend: base_url must look like http://HOST:PORT/v1, got {base_url!r}")
        for name, value, low in (("max_concurrency", max_concurrency, 1), ("max_retries", max_retries, 0)):
            if value < low:
                raise UserError(f"openai backend: {name} must be >= {low}, got {value}")
        if timeout_s <= 0:
            raise UserError(f"openai backend: timeout_s must be > 0, got {timeout_s}")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host, self._port, self._path = url.scheme, url.hostname, url.port, url.path
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.image_format = ImageFormat(image_format)
        self.extra_body = dict(extra_body or {})
        self.rng = rng if rng is not None else random.Random()
        self.sleep = sleep

    # -- HTTP -----------------------------------------------------------------------------------------------------
    def _http(self, method: str, route: str, body: bytes | None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One HTTP exchange on a fresh connection; raises OSError / http.client.HTTPException on transport
        failures (timeouts are OSError too)."""
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        headers = {"Accept": "application/json", "Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, self._path + route, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def request_body(self, request: GenerationRequest) -> dict:
        """The JSON body of the chat completion request for `request`."""
        sp = request.sampling
        body: dict = {
            "model": self.model,
            "messages": openai_messages(request, self.image_format),
            "n": sp.n,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "max_tokens": sp.max_new_tokens,
        }
        if sp.top_k is not None:
            body["top_k"] = sp.top_k
        if request.effective_seed is not None:
            body["seed"] = request.effective_seed
        if sp.stop:
            body["stop"] = list(sp.stop)
        if request.assistant_prefix is not None:
            body["add_generation_prompt"] = False
            body["continue_final_message"] = True
        body.update(self.extra_body)
        return body

    def _attempt(self, body: bytes, n: int) -> tuple[list[str], int | None]:
        try:
            status, headers, raw = self._http("POST", "/chat/completions", body)
        except TimeoutError:
            raise _Retryable(f"no reply within {self.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as err:
            raise _Retryable(f"connection failed: {type(err).__name__}: {err}") from None
        if status == 200:
            return parse_completion(raw, n)
        reason = f"HTTP {status}: {_snippet(raw)}"
        if status == 429 or status >= 500:
            raise _Retryable(reason, _retry_after(headers.get("Retry-After")))
        raise _NotRetryable(reason)

    def _generate_one(self, request: GenerationRequest) -> GenerationResult:
        try:
            body = json.dumps(self.request_body(request)).encode("utf-8")
        except Exception as err:  # bad placeholders, an unencodable image: this request only
            return GenerationResult.failure(request.id, f"cannot build the request: {err}")
        attempts = self.max_retries + 1
        reason = ""
        for attempt in range(attempts):
            try:
                texts, tokens = self._attempt(body, request.sampling.n)
                return GenerationResult(id=request.id, texts=texts, num_generated_tokens=tokens)
            except _NotRetryable as err:
                return GenerationResult.failure(request.id, str(err))
            except _Retryable as err:
                reason = str(err)
                if attempt + 1 < attempts:
                    delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self.rng)
                    if err.retry_after_s is not None:
                        delay = max(delay, min(err.retry_after_s, self.backoff_max_s))
                    self.sleep(delay)
            except Exception as err:  # a bug must not take the batch down; it lands in failures.jsonl
                return GenerationResult.failure(request.id, f"{type(err).__name__}: {err}")
        tries = f"{attempts} attempt" + ("s" if attempts > 1 else "")
        return GenerationResult.failure(request.id, f"{reason} (gave up after {tries})")

    # -- RolloutBackend -------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        workers = min(self.max_concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-backend") as pool:
            return list(pool.map(self._generate_one, requests))

    def check(self) -> None:
        """GET {base_url}/models once, no retries: BackendUnavailable when the server does not answer, answers
        with an error, or does not serve `model`."""
        where = f"OpenAI-compatible server at {self.base_url}"
        try:
            status, _, raw = self._http("GET", "/models", None)
        except TimeoutError:
            raise BackendUnavailable(f"cannot reach {where}: no reply within {self.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as err:
            raise BackendUnavailable(f"cannot reach {where}: {type(err).__name__}: {err}") from None
        if status != 200:
            raise BackendUnavailable(f"{where}: GET /models answered HTTP {status}: {_snippet(raw)}")
        try:
            served = [m["id"] for m in json.loads(raw)["data"]]
        except (ValueError, KeyError, TypeError):
            reply = _snippet(raw, 80)
            raise BackendUnavailable(f"{where}: GET /models did not return a model list: {reply!r}") from None
        if self.model not in served:
            raise BackendUnavailable(
                f"{where} does not serve model {self.model!r} (it serves: {', '.join(map(str, served)) or 'nothing'})"
            )
