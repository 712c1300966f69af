"""One error contract for every service: an exception that carries its gRPC status code.

Logic modules raise these (or domain errors that subclass them, such as
``UnknownAdapter(NotFound)``); the shared interceptor (services/common/grpcserver.py) answers
them with their code and message for every RPC kind, so servicers do not map errors by hand.
Anything else that escapes a handler is INTERNAL with a request id to find it in the logs.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error a caller should see with this code and message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(ServiceError, ValueError):
    """A request field that is wrong, whatever the state of the system."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    """The request is well formed but the system is not in a state to do it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ServiceError):
    """A dependency is down; retrying later may work."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(ServiceError):
    """Shed under load, or over a quota; retry later with backoff."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
