"""The CLI's client layer: one stub per service, at the address the services' own settings
give (``KS_<SVC>_HOST`` or ``KS_HOST``, and ``KS_<SVC>_PORT``), with the CLI's token and TLS
settings (services/common/clients.py)."""

from __future__ import annotations

from knowstream.infer.v1 import infer_pb2_grpc
from knowstream.ingest.v1 import ingest_pb2_grpc
from knowstream.monitor.v1 import monitor_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2_grpc
from services.common.clients import sync_channel
from services.common.settings import CommonSettings


def ingest(settings: CommonSettings) -> ingest_pb2_grpc.IngestServiceStub:
    return ingest_pb2_grpc.IngestServiceStub(sync_channel(settings.endpoint("ingest")))


def retrieve(settings: CommonSettings) -> retrieve_pb2_grpc.RetrieveServiceStub:
    return retrieve_pb2_grpc.RetrieveServiceStub(sync_channel(settings.endpoint("retrieve")))


def infer(settings: CommonSettings) -> infer_pb2_grpc.InferServiceStub:
    return infer_pb2_grpc.InferServiceStub(sync_channel(settings.endpoint("infer")))


def admin(settings: CommonSettings) -> infer_pb2_grpc.AdapterAdminServiceStub:
    return infer_pb2_grpc.AdapterAdminServiceStub(sync_channel(settings.endpoint("infer")))


def monitor(settings: CommonSettings) -> monitor_pb2_grpc.MonitorServiceStub:
    return monitor_pb2_grpc.MonitorServiceStub(sync_channel(settings.endpoint("monitor")))


def trainer(settings: CommonSettings) -> trainer_pb2_grpc.TrainerServiceStub:
    return trainer_pb2_grpc.TrainerServiceStub(sync_channel(settings.endpoint("trainer")))
