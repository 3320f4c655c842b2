"""Shared helpers for tests that compare model weights."""

import hashlib


def state_digest(model) -> str:
    """SHA-256 of every tensor of ``model.state_dict()`` (names and bytes), wherever it lives."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
