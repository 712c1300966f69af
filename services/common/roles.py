"""The one table of which role each RPC needs.

Keyed by full method name. An RPC missing here is refused to every token (fail closed), and
tests/unit/common/test_roles.py enumerates every service in the generated modules, so a new RPC
without a role fails the tests before it can ship. Health and reflection are open: load
balancers and grpcurl must reach them without a token.

- reader: asking, searching, embedding, and reads of state (Get*, List*, Watch*);
- writer: + putting knowledge and feedback in (feedback corrections become training data, which
  is why a reader may not send them);
- admin: + everything that changes what the model is or knows beyond that: adapters, rollout,
  policy, training, drift references, deletions.
"""

from __future__ import annotations

from services.common.auth import Role

READER, WRITER, ADMIN = Role.READER, Role.WRITER, Role.ADMIN

OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_ROLES: dict[str, dict[str, Role]] = {
    "knowstream.embed.v1.EmbedService": {
        "Embed": READER,
        "GetModelInfo": READER,
    },
    "knowstream.retrieve.v1.RetrieveService": {
        "Search": READER,
        "GetIndexStats": READER,
    },
    "knowstream.ingest.v1.IngestService": {
        "GetDocument": READER,
        "GetIndexing": READER,
        "IngestDocuments": WRITER,
        "IngestDocumentStream": WRITER,
        "DeleteDocument": ADMIN,
    },
    "knowstream.infer.v1.InferService": {
        "Ask": READER,
        "AskStream": READER,
        # Score mode on a raw prompt (knowledge probes): a read, like Ask.
        "Score": READER,
        "SubmitFeedback": WRITER,
    },
    "knowstream.infer.v1.AdapterAdminService": {
        "ListAdapters": READER,
        "GetAdapter": READER,
        "GetRollout": READER,
        "RegisterAdapter": ADMIN,
        "UploadAdapter": ADMIN,
        "LoadAdapter": ADMIN,
        "UnloadAdapter": ADMIN,
        "SetRollout": ADMIN,
        "Promote": ADMIN,
        "Rollback": ADMIN,
    },
    "knowstream.monitor.v1.MonitorService": {
        "GetDriftStatus": READER,
        "ListEvents": READER,
        "SetReference": ADMIN,
    },
    "knowstream.trainer.v1.TrainerService": {
        "GetJob": READER,
        "WatchJob": READER,
        "ListJobs": READER,
        "GetPolicy": READER,
        "Train": ADMIN,
        "CancelJob": ADMIN,
        "SetPolicy": ADMIN,
    },
}

METHOD_ROLES: dict[str, Role] = {
    f"/{service}/{method}": role
    for service, methods in _ROLES.items()
    for method, role in methods.items()
}


def is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


def required_role(method: str) -> Role | None:
    """The role ``method`` (``/package.Service/Method``) needs; None = no role defined, which
    the interceptor refuses."""
    return METHOD_ROLES.get(method)
