"""What the infer service accepts: every check of an Ask, Score or SubmitFeedback request in one
place (no I/O). A bad request raises InvalidArgument (a cap: LimitExceeded) with a message that
names the field; the service answers INVALID_ARGUMENT with it."""

from __future__ import annotations

import math

from knowstream.infer.v1 import infer_pb2
from services.common.errors import InvalidArgument
from services.infer.settings import InferSettings
from services.llm.prompts import TEMPLATES

MAX_K = 20


def check_candidates(candidates: list[str], s: InferSettings) -> None:
    """Score-mode candidates: none empty, each and all of them capped."""
    if any(not c.strip() for c in candidates):
        raise InvalidArgument("empty candidate answer")
    s.check_list("candidates", candidates, "limit_candidates", "limit_candidate_chars")


def check_ask(request: infer_pb2.AskRequest, s: InferSettings) -> None:
    if not request.question.strip():
        raise InvalidArgument("question is empty")
    s.check_text("question", request.question, "limit_query_chars")
    if request.k > MAX_K:
        raise InvalidArgument(f"k={request.k} is above the limit of {MAX_K}")
    if request.max_tokens > s.llm_max_new_tokens:
        raise InvalidArgument(
            f"max_tokens={request.max_tokens} is above the limit of {s.llm_max_new_tokens}"
        )
    if not 0 <= request.temperature <= 2 or math.isnan(request.temperature):
        raise InvalidArgument("temperature must be in [0, 2]")
    if not 0 <= request.top_p <= 1 or math.isnan(request.top_p):
        raise InvalidArgument("top_p must be in (0, 1] (0 means 1)")
    if request.template and request.template not in TEMPLATES:
        raise InvalidArgument(f"unknown template {request.template!r}; one of {TEMPLATES}")
    s.check_list("stop", request.stop, "limit_stop_strings", "limit_stop_chars")
    check_candidates(list(request.candidates), s)
    s.check_text("caller", request.caller, "limit_label_chars")
    s.check_text("adapter", request.adapter, "limit_label_chars")


def check_score(request: infer_pb2.ScoreRequest, s: InferSettings) -> None:
    if not request.prompt.strip():
        raise InvalidArgument("prompt is empty")
    s.check_text("prompt", request.prompt, "limit_prompt_chars")
    if len(request.candidates) < 2:
        raise InvalidArgument(f"candidates has {len(request.candidates)} entries; at least 2")
    check_candidates(list(request.candidates), s)
    s.check_text("adapter", request.adapter, "limit_label_chars")


def check_feedback(request: infer_pb2.FeedbackRequest, s: InferSettings) -> None:
    if not request.request_id:
        raise InvalidArgument("request_id is required")
    s.check_text("request_id", request.request_id, "limit_label_chars")
    if request.rating not in (-1, 0, 1):
        raise InvalidArgument("rating must be -1, 0 or 1")
    if request.rating == 0 and not request.correction and not request.comment:
        raise InvalidArgument("feedback needs a rating, a correction or a comment")
    s.check_text("correction", request.correction, "limit_correction_chars")
    s.check_text("comment", request.comment, "limit_comment_chars")
    s.check_text("caller", request.caller, "limit_label_chars")
