"""Self-distillation through a serving engine: the data stage's responses from any OpenAI-compatible server.

A 7B-70B base answers tens of thousands of prompts in days with `generate()` in-process and in hours behind vLLM,
SGLang, TGI or `transformers serve`: `data.engine: openai` sends every rendered context to `data.endpoint`'s
`/completions` (bounded concurrency, per-request timeout, retries with backoff on connection errors, 5xx and 429).

Token ids. The heads must learn the ids the model generated. The engine's own ids are used where the API returns them
(vLLM's `return_token_ids`: `choices[0].token_ids`); a server that rejects that field (transformers serve answers 422)
is asked again without it, and its text is re-tokenized: the end-of-turn token, which servers strip from the text, is
put back when the server says it stopped there (`finish_reason: stop`, or a completion one token longer than the
re-tokenized text). How often re-tokenizing was needed, and how often it disagreed with the server's own token count,
is counted in the data summary. The prompt goes as text (what every engine accepts): where the tokenizer does not
give the same ids back for it, that is counted too.

Self-written prompts (data source `self`) come through `complete_text`: the chat template's text up to a user turn as a
raw prompt, sampled with a seed per request (`seed`, dropped like `return_token_ids` where a server answers 422).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlparse

from medusa_toolkit.errors import ToolkitError

RETRIES = 4
OPTIONAL_FIELDS = ("return_token_ids", "seed")  # asked for where the server knows them, else left out


class ServerError(ToolkitError, RuntimeError):
    """The serving engine cannot answer (unreachable, refuses the model, bad request); the message names the fix."""


@dataclass
class EngineStats:
    requests: int = 0
    retries: int = 0
    engine_token_ids: int = 0  # responses whose ids came from the engine
    retokenized: int = 0  # responses rebuilt from text
    retokenization_mismatch: int = 0  # of those: the server counted another number of tokens
    prompt_roundtrip_mismatch: int = 0  # prompts whose text does not tokenize back to the same ids
    empty: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class OpenAIClient:
    """A client of one OpenAI-compatible endpoint, for greedy or sampled completions of token-id contexts."""

    def __init__(self, cfg, tokenizer, eos: list[int], vocab_size: int | None = None):
        import httpx

        d = cfg.data
        if not d.endpoint:
            raise ServerError("data.engine: openai needs data.endpoint, e.g. http://127.0.0.1:8000/v1")
        self.url = d.endpoint.rstrip("/") + "/completions"
        self.model = d.engine_model or cfg.model.name_or_path
        self.tokenizer, self.eos = tokenizer, eos
        # Token ids an answer may hold: the model's vocabulary (else the tokenizer's), checked before anything is kept.
        self.vocab_size = vocab_size or len(tokenizer)
        self.max_tokens, self.temperature, self.top_p = d.max_new_tokens, d.temperature, d.top_p
        self.concurrency, self.timeout = d.concurrency, d.request_timeout
        key = os.environ.get(d.api_key_env)
        self.client = httpx.Client(timeout=d.request_timeout, headers={"Authorization": f"Bearer {key}"} if key else {})
        self.refused: set[str] = set()  # OPTIONAL_FIELDS this server answered 422 to: not sent again
        self.stats = EngineStats()
        self.lock = threading.Lock()  # requests run in threads; the counts are shared

    def _count(self, **increments: int) -> None:
        with self.lock:
            for name, n in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    @property
    def host(self) -> str:
        return urlparse(self.url).netloc

    def _post(self, body: dict) -> dict:
        """One request, retried on connection errors, 5xx and 429; any other HTTP error is an ServerError."""
        import httpx

        for attempt in range(RETRIES + 1):
            body = {k: v for k, v in body.items() if k not in self.refused}
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TransportError as e:
                if attempt == RETRIES:
                    raise ServerError(
                        f"the engine at {self.host} is unreachable ({type(e).__name__}), also after {RETRIES} retries; "
                        "start it or fix data.endpoint (finished shards are kept: rerun to continue)"
                    ) from None
            else:
                if response.status_code < 300:
                    answer = _completion(response)
                    if answer is not None:
                        return answer
                    if attempt == RETRIES:  # e.g. an HTML page from a proxy, with status 200
                        raise ServerError(
                            f"the engine at {self.host} answered {RETRIES + 1} times with something that is not an "
                            f"OpenAI completion ({response.headers.get('content-type', '?')}: "
                            f"{response.text.strip()[:120]!r}); check data.endpoint (it must end in /v1)"
                        )
                    self._count(retries=1)  # a garbled answer: retried like a 5xx
                    time.sleep(min(0.5 * 2**attempt, 8.0))
                    continue
                named = [f for f in OPTIONAL_FIELDS if f in body and f in response.text]
                if response.status_code == 422 and named:
                    with self.lock:  # e.g. transformers serve has no return_token_ids: ask for text only
                        self.refused.update(named)
                    continue
                if response.status_code < 500 and response.status_code != 429:
                    raise ServerError(
                        f"the engine at {self.host} refused the request ({response.status_code}: "
                        f"{response.text.strip()[:300]}); check data.engine_model ({self.model!r}) and the server"
                    )
                if attempt == RETRIES:
                    raise ServerError(f"the engine at {self.host} kept failing ({response.status_code}) after retries")
            self._count(retries=1)
            time.sleep(min(0.5 * 2**attempt, 8.0))
        raise AssertionError("unreachable")

    def _one(self, context: list[int]) -> list[int]:
        text = self.tokenizer.decode(context, skip_special_tokens=False)
        if self.tokenizer(text, add_special_tokens=False)["input_ids"] != context:
            self._count(prompt_roundtrip_mismatch=1)
        body = {"model": self.model, "prompt": text, "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.top_p < 1.0:
            body["top_p"] = self.top_p
        body["return_token_ids"] = True
        answer = self._post(body)
        self._count(requests=1)
        choices = answer.get("choices") or []
        if not choices:
            self._count(empty=1)
            return []
        choice = choices[0]
        if isinstance(choice.get("token_ids"), list):
            self._count(engine_token_ids=1)
            ids = choice["token_ids"]
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:  # never written: a shard of these would fail training, and stay cached after the server is fixed
                raise ServerError(
                    f"the engine at {self.host} answered token ids outside the model's vocabulary of {self.vocab_size} "
                    f"(e.g. {bad[0]!r}): is it serving another model than {self.model!r}? Fix data.engine_model or "
                    "the server; nothing of this answer was kept"
                )
        else:
            ids = self.tokenizer(choice.get("text") or "", add_special_tokens=False)["input_ids"]
            counted = (answer.get("usage") or {}).get("completion_tokens")
            stopped = choice.get("finish_reason") == "stop" or (counted is not None and counted == len(ids) + 1)
            if stopped and self.eos and (not ids or ids[-1] not in self.eos):
                ids = ids + [self.eos[0]]  # servers strip the end-of-turn token from the text
            self._count(retokenized=1, retokenization_mismatch=int(counted is not None and counted != len(ids)))
        stop = next((i for i, t in enumerate(ids) if t in self.eos), None)
        ids = ids if stop is None else ids[: stop + 1]
        if not ids:
            self._count(empty=1)
        return ids[: self.max_tokens]

    def generate(self, contexts: list[list[int]]) -> list[list[int]]:
        """Responses for a batch of contexts, `data.concurrency` requests in flight at a time."""
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            out = list(pool.map(self._one, contexts))
        self.stats.seconds += time.perf_counter() - start
        return out

    def complete_text(
        self, prompt: str, seeds: list[int], *, temperature: float, top_p: float, max_tokens: int, stop: list[str]
    ) -> list[tuple[str, bool]]:
        """Sampled completions of one raw text prompt, one request per seed (`data.concurrency` in flight): each as
        (text cut at the first `stop` string, whether it ended there or at an end of turn rather than at max_tokens)."""

        def one(seed: int) -> tuple[str, bool]:
            body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                    "seed": seed, "stop": stop}  # fmt: skip
            if top_p < 1.0:
                body["top_p"] = top_p
            answer = self._post(body)
            self._count(requests=1)
            choices = answer.get("choices") or []
            if not choices:  # counted as an empty prompt by the filter
                self._count(empty=1)
                return "", True
            choice = choices[0]
            text = choice.get("text") or ""
            cut = min((text.index(s) for s in stop if s in text), default=None)
            if cut is not None:  # a server that ignored `stop` and kept special tokens in the text
                return text[:cut], True
            if not text:
                self._count(empty=1)
            return text, choice.get("finish_reason") == "stop"

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            out = list(pool.map(one, seeds))
        self.stats.seconds += time.perf_counter() - start
        return out

    def describe(self) -> dict:
        """Who answers: engine, endpoint host (never a key) and model."""
        return {"engine": "openai", "endpoint_host": self.host, "model": self.model}

    def summary(self) -> dict:
        """What the data summary records: engine, host (never a key), sampling, and the token-id statistics."""
        s = self.stats
        return {
            **self.describe(),
            "sampling": {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens},
            "requests": s.requests, "retries": s.retries, "engine_token_ids": s.engine_token_ids,
            "retokenized": s.retokenized, "retokenization_mismatch": s.retokenization_mismatch,
            "prompt_roundtrip_mismatch": s.prompt_roundtrip_mismatch, "empty_responses": s.empty,
        }  # fmt: skip


def _completion(response) -> dict | None:
    """The JSON body of an OpenAI completion answer, or None when the body is not one (not JSON, not an object,
    `choices` not a list)."""
    try:
        answer = response.json()
    except ValueError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("choices", []), list):
        return None
    return answer
