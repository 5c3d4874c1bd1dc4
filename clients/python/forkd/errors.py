"""Exceptions raised by the client: one per gRPC status code forkd answers.

Every one is a ``ForkdError`` carrying the status ``code`` (``grpc.StatusCode``) and the
daemon's ``message``, so callers can catch the base class and branch on ``code`` or catch the
specific subclass::

    try:
        client.snapshot("base")
    except forkd.NotFound:
        ...
"""
from __future__ import annotations

import grpc

__all__ = [
    "ForkdError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition",
    "ResourceExhausted", "Unavailable", "Cancelled", "DeadlineExceeded", "Internal",
    "Unimplemented", "Unauthenticated", "PermissionDenied", "DataLoss",
]


class ForkdError(Exception):
    """A call to forkd failed; ``code`` and ``message`` are the daemon's gRPC status."""

    #: The status code this class stands for; the base class takes any.
    status_code: grpc.StatusCode | None = None

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ForkdError:
        """The exception of the right subclass for a failed grpc call."""
        # Every RpcError grpc raises for a call is also a grpc.Call with code() and details().
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = (error.details() if hasattr(error, "details") else None) or str(error)
        return _BY_CODE.get(code, ForkdError)(code, message)


class InvalidArgument(ForkdError):
    status_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ForkdError):
    status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ForkdError):
    status_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ForkdError):
    status_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ForkdError):
    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ForkdError):
    """The daemon is not reachable or shutting down, or a VMM died."""
    status_code = grpc.StatusCode.UNAVAILABLE


class Cancelled(ForkdError):
    status_code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(ForkdError):
    """The call's timeout passed."""
    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ForkdError):
    status_code = grpc.StatusCode.INTERNAL


class Unimplemented(ForkdError):
    status_code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ForkdError):
    """The remote store rejected forkd's credentials."""
    status_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ForkdError):
    """The remote store denied access."""
    status_code = grpc.StatusCode.PERMISSION_DENIED


class DataLoss(ForkdError):
    """A snapshot's data is missing or corrupt (a remote chunk that does not match its hash)."""
    status_code = grpc.StatusCode.DATA_LOSS


_BY_CODE: dict[grpc.StatusCode, type[ForkdError]] = {
    c.status_code: c for c in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                               ResourceExhausted, Unavailable, Cancelled, DeadlineExceeded,
                               Internal, Unimplemented, Unauthenticated, PermissionDenied,
                               DataLoss)
    if c.status_code is not None
}
