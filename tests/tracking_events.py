"""Reads TensorBoard event files back, for the tracking tests (fedpir.server.tracking)."""

from __future__ import annotations

from pathlib import Path


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files in ``folder``: tag -> step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
