"""A repeated training request costs no privacy: the site answers it with the reply it already released.

A federation interrupted mid-round (the SuperLink or the server killed, a reply lost) resumes from its
last checkpoint and sends the same round again, with the same global weights. Training it again would
spend the round's privacy a second time, and since a site plans its noise to spend its whole budget
over the planned rounds, the run could never finish. Re-sending a reply already released is
post-processing: it reveals nothing new. So the site keeps its last training reply (the weights and
the metrics it released, encrypted at rest like the rest of its state) under the request's digest
(the run settings, stage, round, local epochs and the exact global weights); a request with the same digest gets that
reply back and nothing trains. Any other request (other weights, another round, other run settings)
trains and spends.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from fedpir.privacy.at_rest import PLAINTEXT, StateCipher, read_private, write_private

LAST_REPLY_NAME = "last_reply.pt"


def request_digest(run_config: dict[str, Any], stage: str, rnd: int, epochs: int,
                   received: dict[str, torch.Tensor]) -> str:
    """SHA-256 of what defines a training request: the run's settings (as a run config), stage, round,
    local epochs and the global weights."""
    settings = json.dumps(run_config, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{settings}\0{stage}\0{rnd}\0{epochs}".encode())
    for key in sorted(received):
        tensor = received[key].detach().cpu().contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class LastReply:
    """The site's last training reply, in its state folder (``last_reply.pt``, 0600, encrypted under ``cipher``)."""

    def __init__(self, state_dir: Path, cipher: StateCipher = PLAINTEXT) -> None:
        self.path, self.cipher = Path(state_dir) / LAST_REPLY_NAME, cipher

    def replay(self, digest: str) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
        """The (weights, released metrics) sent for the request ``digest``; None if the last reply was another's."""
        if not self.path.is_file():
            return None
        stored = torch.load(io.BytesIO(read_private(self.path, self.cipher)), weights_only=True)
        return (stored["weights"], stored["metrics"]) if stored["digest"] == digest else None

    def remember(self, digest: str, weights: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
        """Keep the reply about to be sent for the request ``digest`` (replacing the previous one)."""
        buffer = io.BytesIO()
        torch.save({"digest": digest, "weights": weights, "metrics": dict(metrics)}, buffer)
        write_private(self.path, buffer.getvalue(), self.cipher)
