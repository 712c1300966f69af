"""The role table covers every RPC of every generated service, and nothing else."""

from __future__ import annotations

from services.common.auth import Role
from services.common.roles import METHOD_ROLES, is_open, required_role
from tests.utils.grpcapp import all_methods, full_name


def test_every_rpc_in_the_generated_modules_has_a_role():
    missing = [full_name(m) for m in all_methods() if required_role(full_name(m)) is None]
    assert not missing, (
        f"RPCs without a role (add them to services/common/roles.py): {', '.join(missing)}"
    )


def test_the_table_names_no_rpc_that_does_not_exist():
    existing = {full_name(m) for m in all_methods()}
    assert not set(METHOD_ROLES) - existing, "stale or misspelt entries in the role table"


def test_a_method_without_a_role_is_refused_and_health_is_open():
    assert required_role("/knowstream.infer.v1.AdapterAdminService/DeleteEverything") is None
    assert is_open("/grpc.health.v1.Health/Check")
    assert is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not is_open("/knowstream.infer.v1.InferService/Ask")


def test_the_roles_the_issue_names():
    admin_rpcs = {
        "/knowstream.infer.v1.AdapterAdminService/" + m
        for m in ("RegisterAdapter", "UploadAdapter", "SetRollout", "Promote", "Rollback")
    } | {
        "/knowstream.trainer.v1.TrainerService/Train",
        "/knowstream.trainer.v1.TrainerService/CancelJob",
        "/knowstream.trainer.v1.TrainerService/SetPolicy",
        "/knowstream.ingest.v1.IngestService/DeleteDocument",
        "/knowstream.monitor.v1.MonitorService/SetReference",
    }
    assert all(required_role(m) == Role.ADMIN for m in admin_rpcs)
    assert required_role("/knowstream.infer.v1.InferService/SubmitFeedback") == Role.WRITER
    assert required_role("/knowstream.ingest.v1.IngestService/IngestDocumentStream") == Role.WRITER
    assert required_role("/knowstream.infer.v1.InferService/AskStream") == Role.READER
    assert required_role("/knowstream.retrieve.v1.RetrieveService/Search") == Role.READER
