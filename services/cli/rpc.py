"""What every CLI command that calls a service does with a failed call."""

from __future__ import annotations

import sys

import grpc


def rpc_failed(what: str, exc: grpc.RpcError) -> int:
    print(f"{what} failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1
