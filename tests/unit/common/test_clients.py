import grpc
import pytest

from services.common.clients import patiently


class _Error(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name

    # grpc.Call's other methods are not used here
    def initial_metadata(self): ...  # type: ignore[no-untyped-def]
    def trailing_metadata(self): ...  # type: ignore[no-untyped-def]
    def is_active(self): ...  # type: ignore[no-untyped-def]
    def time_remaining(self): ...  # type: ignore[no-untyped-def]
    def cancel(self): ...  # type: ignore[no-untyped-def]
    def add_callback(self, callback): ...  # type: ignore[no-untyped-def]


def test_a_shed_call_is_made_again_within_its_timeout_and_other_errors_are_not():
    lefts: list[float] = []

    def shed_twice(left: float) -> str:
        lefts.append(left)
        if len(lefts) <= 2:
            raise _Error(grpc.StatusCode.RESOURCE_EXHAUSTED)
        return "answer"

    assert patiently(shed_twice, 10.0) == "answer"
    assert len(lefts) == 3 and lefts[0] > lefts[2]

    def invalid(left: float) -> str:
        raise _Error(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(grpc.RpcError):
        patiently(invalid, 10.0)

    def always_shed(left: float) -> str:
        raise _Error(grpc.StatusCode.RESOURCE_EXHAUSTED)

    with pytest.raises(grpc.RpcError):
        patiently(always_shed, 0.3)
