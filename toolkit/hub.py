"""Push a folder (heads, an exported package) to the Hugging Face Hub: create the repo, then ONE commit holding the whole folder.

Token: HF_TOKEN or the saved login; endpoint: HF_ENDPOINT (read at call time, so a test server can be named late).
Connection errors and 5xx/429 answers are retried with exponential backoff; 401/403/404 become a HubPushError that
says what to fix. huggingface_hub's LFS and preupload calls retry on their own as well.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from medusa_toolkit.errors import ToolkitError

T = TypeVar("T")
_TRANSPORT_ERRORS = {"TransportError", "NetworkError", "ConnectError", "TimeoutException", "RemoteProtocolError"}


class HubPushError(ToolkitError, RuntimeError):
    """A push failed for a reason the user must fix (auth, permissions, missing repo); the message says how."""


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    pr_url: str | None = None


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_retryable(err: BaseException) -> bool:
    """Connection problems and server-side (5xx) or rate-limit (429) answers; never auth or client errors."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    for e in _chain(err):
        if isinstance(e, OfflineModeIsEnabled):
            return False
        status = _status(e)
        if status is not None:
            return status >= 500 or status == 429
        if isinstance(e, (ConnectionError, TimeoutError)) or {c.__name__ for c in type(e).__mro__} & _TRANSPORT_ERRORS:
            return True
    return False


def _explain(err: BaseException, repo_id: str, endpoint: str) -> HubPushError | None:
    from huggingface_hub.errors import OfflineModeIsEnabled

    for e in _chain(err):
        if isinstance(e, OfflineModeIsEnabled):
            return HubPushError("HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset it (export HF_HUB_OFFLINE=0)")
        status = _status(e)
        if status == 401:
            return HubPushError(
                f"{endpoint} rejected the token (401 Unauthorized) while pushing to {repo_id}: set HF_TOKEN to a valid "
                "write token or run `hf auth login`"
            )
        if status == 403:
            return HubPushError(
                f"no write access to {repo_id} on {endpoint} (403 Forbidden): use a token with write permission for "
                f"the namespace '{repo_id.split('/')[0]}', or push to your own namespace"
            )
        if status == 404:
            return HubPushError(
                f"{repo_id} (or its revision) was not found on {endpoint} (404): check the repo id and --revision, "
                "and that the token can see the repo"
            )
    return None


def with_retries(fn: Callable[[], T], what: str, retries: int = 5, backoff: float = 1.0, log: Callable = print) -> T:
    """Call `fn`, retrying retryable errors `retries` times with backoff, backoff*2, ... (capped at 30 s)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == retries or not is_retryable(e):
                raise
            wait = min(backoff * 2**attempt, 30.0)
            log(
                f"[export] {what} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); retry {attempt + 1}/{retries} in {wait:.1f}s"
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    log: Callable = print,
) -> PushResult:
    """Create `repo_id` (exist_ok) and upload `folder` to it as a single commit; return the commit's URLs."""
    from huggingface_hub import HfApi, get_token

    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(f"nothing to push: {folder} is not a folder")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubPushError(f"--push-to-hub wants ORG/NAME (e.g. my-org/smollm2-medusa), got {repo_id!r}")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = token or get_token()
    if not token:
        raise HubPushError("no Hugging Face token found: set HF_TOKEN to a write token or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)

    def guarded(fn: Callable[[], T], what: str) -> T:
        try:
            return with_retries(fn, what, retries=retries, backoff=backoff, log=log)
        except Exception as e:  # every failure of a push is one clear line, never a traceback
            explained = _explain(e, repo_id, endpoint)
            if explained is not None:
                raise explained from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if is_retryable(e):
                raise HubPushError(
                    f"could not reach {endpoint} to push {repo_id} ({type(e).__name__}: {first}), also after "
                    f"{retries} retries; check the network and HF_ENDPOINT, then rerun (finished stages are kept)"
                ) from None
            raise HubPushError(
                f"pushing {folder} to {repo_id} on {endpoint} failed ({type(e).__name__}: {first})"
            ) from None

    repo_url = guarded(lambda: api.create_repo(repo_id, private=private, exist_ok=True), "create_repo")
    if revision and not create_pr and revision != "main":
        guarded(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), "create_branch")
    message = commit_message or f"Upload Medusa heads ({folder.name} package) with medusa-toolkit"
    info = guarded(
        lambda: api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        ),
        "upload_folder",
    )
    log(f"[export] pushed {folder} to {repo_url} ({info.commit_url})")
    return PushResult(repo_id, str(repo_url), info.commit_url, info.oid, info.pr_url)
