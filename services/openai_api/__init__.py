"""OpenAI-compatible HTTP API in front of the infer and embed services (issue 16).

``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models`` and ``POST /v1/embeddings``, on ``KS_OPENAI_PORT``.

Why its own process, talking gRPC to infer, and not routes inside the infer process:

- **one code path.** Every request becomes an ``Ask``/``AskStream``/``ListAdapters``/``Embed``
  call carrying the caller's own bearer token, so the services' interceptor authenticates it,
  checks the role, sets the caller's access groups and audits it, and the infer service routes
  (rollout, canary stickiness), mirrors to shadow and publishes the answer event, exactly as
  for a gRPC client. Inside the infer process the HTTP side would have had to authenticate and
  set the caller's scope itself: a second implementation of auth, easy to let drift.
- **the import contract.** A package of its own may only reach infer over its API
  (tests/unit/test_import_contract.py), which keeps this a translation layer: request and
  response conversion (``convert.py``), nothing that decides anything about an answer.
- **lifecycles.** uvicorn owns its event loop and signals; the infer process's ``GrpcApp`` owns
  its own (health that follows readiness, stop hooks). Apart, each stops and restarts alone,
  and the front scales without a second copy of the infer service's state.

The cost is one loopback gRPC hop per request (about a millisecond, against seconds of
generation on these CPUs).
"""
