"""Errors the API answers with, in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error with an HTTP status that the client should see as it is."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.code, self.type, self.param)


def error_body(message: str, code: str, type_: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code, param=param)


def not_found(what: str, code: str = "not_found") -> APIError:
    return APIError(404, what, code, type_="not_found_error")


def session_not_found(session_id: str) -> APIError:
    # the same answer whether the session does not exist or belongs to another key: ids do not leak
    return not_found(f"no session {session_id!r}", code="session_not_found")


def response_not_found(response_id: str, code: str = "response_not_found") -> APIError:
    # likewise: never kept, no longer kept, or another key's
    return not_found(f"no stored response {response_id!r}", code)
