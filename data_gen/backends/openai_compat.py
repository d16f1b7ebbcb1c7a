"""A rollout backend for any OpenAI-compatible chat server (`vllm serve`, SGLang, LMDeploy, a hosted API).

Each request is one POST to `{base_url}/chat/completions` asking for `n` samples, with `top_k` as the extra field
vLLM and SGLang accept, and the request's seed passed through. Requests run on at most `max_concurrency` threads.

A failed attempt is retried with exponential backoff and full jitter (sleep a uniform draw from
[0, min(backoff_max_s, backoff_base_s * 2**retry)]) when it may succeed later: a timeout, a refused or dropped
connection, HTTP 429 or 5xx, or a 200 whose body is not a chat completion ("malformed reply"). Any other HTTP
status (400, 401, 404, ...) is not retried. After the last attempt the request's result carries the error; the
batch goes on. Only the standard library is used (no proxy support: point `base_url` at the server itself).

Servers differ; `check()` probes the server once with a one-token request and adapts (one logged line each):

- a sampling field it rejects (HTTP 400/422 naming it: `transformers serve` refuses `top_k`) is left out of every
  request from then on;
- when it returns fewer choices than `n` (`transformers serve` returns one), each request of n samples becomes n
  requests of one, sample j seeded `seed + j`;
- `check_continuation()` fails up front, one line, when the server refuses `continue_final_message` (label-steps
  and DropoutNTP continue a partial assistant message; `transformers serve` cannot).

Every result records in `applied` the sampling fields the server was sent (after the adaptation) and those left
out. A dead server does not cost every remaining item its retries: after `max_connection_failures` refused or
dropped connections in a row (any request), `GET /models` is tried once; when that fails too, `generate` raises
BackendUnavailable, which stops the job with one line (finished items stay, a rerun resumes). Error bodies are read
in OpenAI form (`{"error": {"message": ...}}`) and FastAPI form (`{"detail": "..."}` or a list of
`{"loc", "msg"}`).
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import re
import threading
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
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "seed", "stop", "max_tokens")
DROPPABLE_FIELDS = ("top_k", "seed", "stop", "top_p")  # left out, with one logged line, when a server rejects them
CONTINUATION_FIELDS = ("continue_final_message", "add_generation_prompt")
PROBE_N = 2
_SEED_MOD = 2**63

logger = logging.getLogger("mmalign.backends.openai")


def backoff_delay(retry: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: a uniform draw from [0, min(max_s, base_s * 2**retry)], `retry` counting from 0."""
    return rng.uniform(0.0, min(max_s, base_s * 2.0**retry))


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _NotRetryable(Exception):
    pass


def _detail_text(detail: object) -> str | None:
    """FastAPI's `detail`: a string, or a list of pydantic errors {"loc": [...], "msg": ...}."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list) and detail:
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
                parts.append(f"{loc}: {item.get('msg', '')}".strip(": ") if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return None


def _snippet(raw: bytes, limit: int = 200) -> str:
    """The server's error message when the body is an OpenAI error object or a FastAPI `detail`, else the start of
    the body, on one line."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else None
        if not msg and isinstance(data, dict):
            msg = _detail_text(data.get("detail"))
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
    with vLLM's `continue_final_message`. `max_connection_failures` refused or dropped connections in a row make
    `generate` re-check the server and stop the job when it is gone (see the module docstring)."""

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
        max_connection_failures: int = 5,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UserError(f"openai backend: base_url must look like http://HOST:PORT/v1, got {base_url!r}")
        for name, value, low in (("max_concurrency", max_concurrency, 1), ("max_retries", max_retries, 0),
                                 ("max_connection_failures", max_connection_failures, 1)):
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
        self.max_connection_failures = max_connection_failures
        self.dropped: set[str] = set()  # sampling fields the server rejects (found by the probe)
        self.split_n = False  # the server returns fewer than n choices: n requests of one
        self.greedy_suspected = False  # two seeded samples at temperature 1 read the same
        self._lock = threading.Lock()
        self._connection_failures = 0  # in a row, over every request
        self._dead: str | None = None  # why the server is considered gone

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
        for name in self.dropped:
            body.pop(name, None)
        return body

    def applied(self, body: dict, requests: int = 1) -> dict:
        """The sampling settings as the server was sent them (after adaptation), for the output records."""
        sent = {k: body[k] for k in SAMPLING_FIELDS if k in body}
        if requests > 1:
            sent |= {"n": requests, "requests": requests, "n_per_request": 1}
        return sent | ({"dropped": sorted(self.dropped)} if self.dropped else {})

    def _attempt(self, body: bytes, n: int) -> tuple[list[str], int | None]:
        if self._dead is not None:
            raise BackendUnavailable(self._dead)
        try:
            status, headers, raw = self._http("POST", "/chat/completions", body)
        except TimeoutError:
            raise _Retryable(f"no reply within {self.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as err:
            reason = f"connection failed: {type(err).__name__}: {err}"
            self._connection_failed(reason)
            raise _Retryable(reason) from None
        with self._lock:
            self._connection_failures = 0
        if status == 200:
            return parse_completion(raw, n)
        reason = f"HTTP {status}: {_snippet(raw)}"
        if status == 429 or status >= 500:
            raise _Retryable(reason, _retry_after(headers.get("Retry-After")))
        raise _NotRetryable(reason)

    def _connection_failed(self, reason: str) -> None:
        """Count a refused or dropped connection; at `max_connection_failures` in a row, GET /models once, and mark
        the server gone (BackendUnavailable) when that fails too."""
        with self._lock:
            self._connection_failures += 1
            if self._connection_failures < self.max_connection_failures or self._dead is not None:
                return
            count, self._connection_failures = self._connection_failures, 0
        try:
            self._models()
        except BackendUnavailable as err:
            with self._lock:
                self._dead = (f"openai backend: the server stopped answering ({count} connection failures in a row, "
                              f"last: {reason}; then {err}); finished items are kept, rerun to resume once it is back")
            raise BackendUnavailable(self._dead) from None

    def _generate_one(self, request: GenerationRequest, failed_groups: set[str] | None = None) -> GenerationResult:
        if failed_groups is not None and request.group is not None and request.group in failed_groups:
            return GenerationResult.failure(request.id, f"not sent: another request of {request.group!r} failed")
        result = self._generate_ungrouped(request)
        if not result.ok and failed_groups is not None and request.group is not None:
            with self._lock:
                failed_groups.add(request.group)
        return result

    def _generate_ungrouped(self, request: GenerationRequest) -> GenerationResult:
        try:
            body_dict = self.request_body(request)
        except Exception as err:  # bad placeholders, an unencodable image: this request only
            return GenerationResult.failure(request.id, f"cannot build the request: {err}")
        n = request.sampling.n
        if not self.split_n or n == 1:
            result = self._send(request.id, body_dict, n)
            result.applied = self.applied(body_dict) if result.ok else None
            return result
        texts, tokens = [], 0  # one request per sample, sample j seeded seed + j
        for j in range(n):
            one = dict(body_dict, n=1)
            if "seed" in one:
                one["seed"] = (one["seed"] + j) % _SEED_MOD
            result = self._send(request.id, one, 1)
            if not result.ok:
                return GenerationResult.failure(request.id, f"sample {j} of {n}: {result.error}")
            texts += result.texts
            tokens = None if tokens is None or result.num_generated_tokens is None else \
                tokens + result.num_generated_tokens
        return GenerationResult(id=request.id, texts=texts, num_generated_tokens=tokens,
                                applied=self.applied(body_dict, requests=n))

    def _send(self, request_id: str, body_dict: dict, n: int) -> GenerationResult:
        body = json.dumps(body_dict).encode("utf-8")
        attempts = self.max_retries + 1
        reason = ""
        for attempt in range(attempts):
            try:
                texts, tokens = self._attempt(body, n)
                return GenerationResult(id=request_id, texts=texts, num_generated_tokens=tokens)
            except BackendUnavailable:
                raise  # the server is gone: the job stops
            except _NotRetryable as err:
                return GenerationResult.failure(request_id, str(err))
            except _Retryable as err:
                reason = str(err)
                if attempt + 1 < attempts:
                    delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self.rng)
                    if err.retry_after_s is not None:
                        delay = max(delay, min(err.retry_after_s, self.backoff_max_s))
                    self.sleep(delay)
            except Exception as err:  # a bug must not take the batch down; it lands in failures.jsonl
                return GenerationResult.failure(request_id, f"{type(err).__name__}: {err}")
        tries = f"{attempts} attempt" + ("s" if attempts > 1 else "")
        return GenerationResult.failure(request_id, f"{reason} (gave up after {tries})")

    # -- RolloutBackend -------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        workers = min(self.max_concurrency, len(requests))
        failed_groups: set[str] = set()  # groups with a failed request: their other requests are not sent
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-backend") as pool:
            return list(pool.map(lambda r: self._generate_one(r, failed_groups), requests))

    def check(self) -> None:
        """GET {base_url}/models once, no retries: BackendUnavailable when the server does not answer, answers
        with an error, or does not serve `model`. Then one probe request, to adapt to what the server accepts, and
        two seeded samples at temperature 1 to see whether it samples at all."""
        self._models()
        self._probe()
        self._probe_sampling()

    def _probe_sampling(self) -> None:
        """One logged line when two samples with different seeds at temperature 1 read the same: the server may
        sample greedily (`transformers serve` does unless the model's generation_config.json says do_sample)."""
        texts = []
        for seed in (1, 2):
            body = {"model": self.model, "messages": [{"role": "user", "content": "Write ten random words."}],
                    "max_tokens": 16, "n": 1, "temperature": 1.0, "top_p": 1.0, "seed": seed, **self.extra_body}
            for name in self.dropped:
                body.pop(name, None)
            reply = self._post_once(body)
            if reply is None or reply[0] != 200:
                return
            try:
                texts.append(json.loads(reply[1])["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError):
                return
        if texts[0] == texts[1]:
            self.greedy_suspected = True
            logger.warning("openai backend: two samples at temperature 1 with seeds 1 and 2 read the same: %s may "
                           "sample greedily (transformers serve does unless the served model's "
                           "generation_config.json has \"do_sample\": true)", self.base_url)

    def _post_once(self, body: dict) -> tuple[int, bytes] | None:
        """One POST without retries; None when the exchange itself failed."""
        try:
            status, _, raw = self._http("POST", "/chat/completions", json.dumps(body).encode("utf-8"))
        except (OSError, http.client.HTTPException):
            return None
        return status, raw

    @staticmethod
    def _named(message: str, names) -> list[str]:
        return [f for f in names if re.search(rf"(?<![A-Za-z0-9_]){re.escape(f)}(?![A-Za-z0-9_])", message)]

    def _probe(self) -> None:
        """A one-token request with every sampling field and n=2: drop the fields a 400/422 names, split n when
        fewer choices come back. A probe that fails otherwise changes nothing (requests go as configured)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": "Reply with one word."}],
                "max_tokens": 1, "n": PROBE_N, "temperature": 1.0, "top_p": 1.0, "top_k": 1, "seed": 0,
                **self.extra_body}
        droppable = [*DROPPABLE_FIELDS, *self.extra_body]
        for _ in range(len(droppable) + 2):
            reply = self._post_once(body)
            if reply is None:
                logger.warning("openai backend: the probe request to %s got no reply; requests go as configured",
                               self.base_url)
                return
            status, raw = reply
            if status == 200:
                try:
                    choices = json.loads(raw).get("choices")
                except (ValueError, AttributeError):
                    choices = None
                if isinstance(choices, list) and 0 < len(choices) < body.get("n", 1):
                    self.split_n = True
                    logger.warning("openai backend: %s returned %d choice(s) for n=%d: each sample is its own "
                                   "request from now on (sample j seeded seed + j)", self.base_url, len(choices),
                                   body["n"])
                return
            message = _snippet(raw, 500)
            if status in (400, 422) and "n" in self._named(message, ["n"]) and body.get("n", 1) > 1:
                body["n"] = 1
                self.split_n = True
                logger.warning("openai backend: %s refuses n > 1 (HTTP %d: %s): each sample is its own request "
                               "(sample j seeded seed + j)", self.base_url, status, message)
                continue
            rejected = [f for f in self._named(message, droppable) if f in body] if status in (400, 422) else []
            if not rejected:
                logger.warning("openai backend: the probe request got HTTP %d (%s); requests go as configured",
                               status, message)
                return
            for name in rejected:
                body.pop(name)
                self.dropped.add(name)
            logger.warning("openai backend: %s rejects %s (HTTP %d: %s): left out of every request", self.base_url,
                           ", ".join(rejected), status, message)

    def check_continuation(self) -> None:
        """BackendUnavailable (one line) when the server refuses `continue_final_message`, which continuing a
        partial assistant message needs (label-steps, DropoutNTP)."""
        body = {"model": self.model, "max_tokens": 1, "add_generation_prompt": False, "continue_final_message": True,
                "messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2,"}]}
        reply = self._post_once(body)
        if reply is None or reply[0] == 200:
            return
        status, raw = reply
        message = _snippet(raw, 300)
        if status in (400, 422) and self._named(message, CONTINUATION_FIELDS):
            raise BackendUnavailable(
                f"OpenAI-compatible server at {self.base_url} cannot continue a partial assistant message (HTTP "
                f"{status}: {message}); label-steps and DropoutNTP need continue_final_message: serve the policy "
                "with vLLM (README: a local vLLM server) or use --backend hf")
        logger.warning("openai backend: the continuation probe got HTTP %d (%s); going on", status, message)

    def _models(self) -> None:
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
