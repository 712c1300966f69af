"""`knowstream adapters ...` without a network: every action parser has a handler, and each
handler calls its RPC and renders the reply as text or JSON."""

from __future__ import annotations

import argparse
import json

import grpc
import pytest

from knowstream.infer.v1 import infer_pb2
from services.cli import serving
from services.cli.main import main


class FakeAdmin:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.rollout = infer_pb2.RolloutState(live="a1", candidate="a2", mode="shadow")

    def ListAdapters(self, request, timeout):
        self.calls.append(("ListAdapters", request))
        adapter = infer_pb2.AdapterStatus(id="a1", aliases=["live"], loaded=True, rank=8)
        return infer_pb2.ListAdaptersResponse(adapters=[adapter], rollout=self.rollout)

    def LoadAdapter(self, request, timeout):
        self.calls.append(("LoadAdapter", request))
        return infer_pb2.LoadAdapterResponse(adapter_id=request.adapter, load_s=0.25, loaded=["a1"])

    def UnloadAdapter(self, request, timeout):
        self.calls.append(("UnloadAdapter", request))
        return infer_pb2.LoadAdapterResponse(adapter_id=request.adapter, loaded=[])

    def SetRollout(self, request, timeout):
        self.calls.append(("SetRollout", request))
        return self.rollout

    def Rollback(self, request, timeout):
        self.calls.append(("Rollback", request))
        raise FakeRpcError()


class FakeRpcError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.PERMISSION_DENIED

    def details(self):
        return "role admin needed"


@pytest.fixture
def admin(monkeypatch):
    fake = FakeAdmin()
    monkeypatch.setattr(serving, "_admin", lambda settings: fake)
    return fake


def test_every_adapters_action_has_a_handler():
    parser = argparse.ArgumentParser()
    serving.add_commands(parser.add_subparsers())
    actions = parser._subparsers._group_actions[0].choices["adapters"]  # type: ignore[union-attr]
    names = set(actions._subparsers._group_actions[0].choices) - {"policy"}
    assert names == set(serving.ADAPTER_ACTIONS)


def test_list_and_load_render_text_or_json(admin, capsys):
    assert main(["adapters", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["adapters"][0]["id"] == "a1" and listed["rollout"]["candidate"] == "a2"
    assert main(["adapters", "load", "a1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "adapter_id": "a1",
        "loaded": ["a1"],
        "load_s": 0.25,
    }
    assert main(["adapters", "unload", "a1"]) == 0
    assert capsys.readouterr().out.strip() == "a1 unloaded; Triton holds: none"


def test_rollout_modes_send_their_mode_and_share(admin):
    assert main(["adapters", "canary", "a2", "--share", "0.2"]) == 0
    name, request = admin.calls[-1]
    assert name == "SetRollout" and (request.mode, request.adapter) == ("canary", "a2")
    assert request.share == pytest.approx(0.2)
    assert main(["adapters", "off"]) == 0
    assert admin.calls[-1][1].mode == "off"


def test_a_failed_call_is_exit_1_with_its_code(admin, capsys):
    assert main(["adapters", "rollback", "--reason", "r"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
