"""A small HTTP client for a running Bach system (what ``bach submit`` uses)."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8080"
ENDED = ("COMPLETE", "FAILED", "CANCELLED")


class ClientError(Exception):
    """The server refused, or could not be reached. The message is one line.

    ``status`` is the HTTP status of the refusal (None: no answer), ``kind`` the error
    type the server named (``InvalidInput``, ``StoreError``, ``InternalError``, ...)."""

    def __init__(self, message: str, status: int | None = None, kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def segment(ref: str) -> str:
    """``ref`` as one path segment: ``/`` and every other reserved character quoted, and
    ``.`` or ``..`` too, which HTTP clients would otherwise resolve as the path's parents."""
    text = quote(ref, safe="")
    return text.replace(".", "%2E") if text in (".", "..") else text


class Client:
    def __init__(
        self, server: str | None = None, token: str | None = None, timeout: float = 30.0
    ) -> None:
        self.server = (server or os.environ.get("BACH_SERVER") or DEFAULT_SERVER).rstrip("/")
        token = token or os.environ.get("BACH_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, wait: float = 0, **kwargs: Any) -> Any:
        timeout = httpx.Timeout(self._http.timeout.read or 30.0) if not wait else wait + 30
        try:
            response = self._http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TransportError as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ClientError(
                f"cannot reach the Bach server at {self.server}: {reason}"
                " (is `bach serve` running?)"
            ) from None
        if response.status_code >= 400:
            kind = ""
            try:
                error = response.json()["error"]
                kind = str(error.get("type", ""))
                message = (
                    f"{error['field']}: {error['reason']}" if error["field"] else error["reason"]
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                text = " ".join(response.text[:200].split())
                message = f"HTTP {response.status_code} from {self.server}: {text}"
            raise ClientError(" ".join(str(message).split()), response.status_code, kind)
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"{self.server} answered {path} with something that is not JSON"
                " (is it a Bach server?)",
                response.status_code,
            ) from None

    def submit(
        self,
        input: Any = None,
        *,
        rubric: str | None = None,
        client: str | None = None,
        todo: Sequence[str] | None = None,
        key: str | None = None,
        wait: float = 0,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"input": input}
        for name, value in (("rubric", rubric), ("client", client), ("key", key)):
            if value is not None:
                body[name] = value
        if todo is not None:
            body["todo"] = list(todo)
        result: dict[str, Any] = self._call(
            "POST",
            "/api/requests",
            json=body,
            params={"wait": min(wait, 300)} if wait else None,
            wait=wait,
        )
        if wait and result["status"] not in ENDED:
            result = self.wait(result["id"], wait)
        return result

    def get(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/requests/{segment(ref)}")
        return result

    def wait(self, ref: str, timeout: float) -> dict[str, Any]:
        """The request once it has ended (or as it is when the timeout runs out)."""
        return self._wait(f"/api/requests/{segment(ref)}", timeout)

    def _wait(self, path: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, min(deadline - time.monotonic(), 300))
            result: dict[str, Any] = self._call("GET", path, params={"wait": left}, wait=left)
            if result["status"] in ENDED or left <= 0:
                return result

    def list(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        result: list[dict[str, Any]] = self._call("GET", "/api/requests", params=params)["requests"]
        return result

    def cancel(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/api/requests/{segment(ref)}")
        return result

    def retry(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/requests/{segment(ref)}/retry")
        return result

    def run_command(
        self,
        command: str,
        request: Any = None,
        *,
        key: str | None = None,
        name: str | None = None,
        wait: float = 0,
    ) -> dict[str, Any]:
        """Start a command run; with ``wait``, return it once it has ended."""
        call: dict[str, Any] = {"command": command, "request": request}
        if name:
            call["name"] = name
        body: dict[str, Any] = {"commands": [call]}
        if key is not None:
            body["key"] = key
        run: dict[str, Any] = self._call("POST", "/api/commands", json=body)
        return self.wait_command(run["id"], wait) if wait else run

    def get_command(self, ref: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/commands/{segment(ref)}")
        return result

    def wait_command(self, ref: str, timeout: float) -> dict[str, Any]:
        return self._wait(f"/api/commands/{segment(ref)}", timeout)

    def list_commands(
        self, status: str | None = None, limit: int = 100
    ) -> builtins.list[dict[str, Any]]:
        """Command runs, newest first, as summaries."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        result: builtins.list[dict[str, Any]] = self._call("GET", "/api/commands", params=params)[
            "runs"
        ]
        return result

    def cancel_command(self, ref: str) -> dict[str, Any]:
        """Cancel a command run that has not ended; its CommandState tree."""
        result: dict[str, Any] = self._call("POST", f"/api/commands/{segment(ref)}/cancel")
        return result

    def scaling_events(self) -> builtins.list[dict[str, Any]]:
        result: builtins.list[dict[str, Any]] = self._call("GET", "/api/events/scaling")["events"]
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/api/stats")
        return result
