"""The drift report: statistics of each window over time, with thresholds and decisions marked
(``knowstream drift report --out FILE.png``)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from knowstream.events.v1 import events_pb2
from knowstream.monitor.v1 import monitor_pb2


def plot(
    windows: list[events_pb2.DriftWindow],
    events: list[events_pb2.DriftEvent],
    settings: monitor_pb2.PolicySettings,
    out: Path,
    title: str = "",
) -> None:
    """Writes a PNG with four panels (p-value, MMD², KL, answer-side shares) over the window
    index; drifted windows are shaded, each decision is a vertical line at the window that
    triggered it, and a dotted line marks where the reference changed."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not windows:
        raise ValueError("no windows to plot yet")
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    _statistics(axes[:3], windows, settings)
    _answer_side(axes[3], windows, settings)
    _decisions(axes, windows, events)
    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or "knowstream drift monitor (shaded: drifted windows)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _statistics(
    axes: Any, windows: list[events_pb2.DriftWindow], settings: monitor_pb2.PolicySettings
) -> None:
    """The question-side panels: MMD p-value, MMD² and the KL divergences."""
    ax_p, ax_mmd, ax_kl = axes
    x = [w.index for w in windows]
    ax_p.semilogy(x, [max(w.p_value, 1e-3) for w in windows], "o-", ms=3, label="p-value")
    ax_p.axhline(settings.p_value, color="red", ls="--", lw=1, label=f"p < {settings.p_value:g}")
    ax_p.set_ylabel("MMD p-value")

    ax_mmd.plot(x, [w.mmd2 for w in windows], "o-", ms=3, color="tab:purple", label="MMD²")
    if settings.mmd_threshold:
        ax_mmd.axhline(settings.mmd_threshold, color="red", ls="--", lw=1, label="threshold")
    ax_mmd.set_ylabel("MMD²")

    ax_kl.plot(x, [w.kl_topics for w in windows], "o-", ms=3, label="KL topics")
    ax_kl.plot(x, [w.kl_terms for w in windows], "s-", ms=3, label="KL terms")
    if settings.kl_threshold:
        ax_kl.axhline(settings.kl_threshold, color="red", ls="--", lw=1, label="KL threshold")
    ax_kl.set_ylabel("KL divergence")


def _answer_side(
    ax: Any, windows: list[events_pb2.DriftWindow], settings: monitor_pb2.PolicySettings
) -> None:
    """Shares of poorly retrieved, low-confidence and disliked answers, and shadow agreement
    (a gap where a window had no feedback or no shadow pair)."""
    x = [w.index for w in windows]
    nan = float("nan")
    ax.plot(x, [w.poorly_retrieved_share for w in windows], "o-", ms=3, label="poorly retrieved")
    ax.plot(x, [w.low_confidence_share for w in windows], "s-", ms=3, label="low confidence")
    feedback = [w.negative_feedback_share if w.feedback_count else nan for w in windows]
    ax.plot(x, feedback, "^-", ms=3, label="negative feedback")
    agreement = [w.shadow_agreement if w.shadow_pairs else nan for w in windows]
    ax.plot(x, agreement, "d-", ms=3, label="shadow agreement")
    ax.axhline(settings.gap_share, color="grey", ls=":", lw=1, label="gap share")
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("share")
    ax.set_xlabel("window")


def _decisions(
    axes: Any, windows: list[events_pb2.DriftWindow], events: list[events_pb2.DriftEvent]
) -> None:
    """Drifted windows shaded, decisions and reference changes as labelled vertical lines."""
    shown = {w.index for w in windows}
    marks = []  # (window index, kind) of each decision whose trigger is in view
    for event in events:
        kind = event.WhichOneof("kind")
        at = max((w.index for w in getattr(event, kind).windows), default=None)
        if at is not None and at in shown:
            marks.append((at, kind))
    # Where the reference changed, windows before and after are not comparable.
    changes = [
        b.index - 0.5 for a, b in itertools.pairwise(windows) if a.reference_id != b.reference_id
    ]
    for ax in axes:
        for at in changes:
            ax.axvline(at, color="grey", ls=":", lw=1.2)
        for w in windows:
            if w.drift:
                ax.axvspan(w.index - 0.5, w.index + 0.5, color="orange", alpha=0.2, lw=0)
        for at, kind in marks:
            ax.axvline(at, color="red" if kind == "retrain_requested" else "blue", lw=1.5)
    label = {"retrain_requested": "RetrainRequested"}
    for at, kind in marks:
        axes[0].annotate(
            label.get(kind, "KnowledgeGap"),
            (at, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
        )
    for at in changes:
        axes[0].annotate(
            "new reference",
            (at, 0.02),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="bottom",
            ha="right",
            fontsize=7,
            color="grey",
        )
