"""The multi-adapter HTTP service: one backbone in memory, task adapters chosen per request.

``visiontune serve --adapter cows=runs/a --adapter solar=runs/b`` or, in Python,
``create_app(AdapterHost.from_runs({...}))`` for any ASGI server. FastAPI, uvicorn and
python-multipart come with the ``serve`` extra; they are imported by :mod:`visiontune.serve.app`
only, so ``visiontune.serve.batching`` works without them.
"""

from typing import Any

from visiontune.serve.batching import BatchResult, MicroBatcher

__all__ = ["BatchResult", "MicroBatcher", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # FastAPI is an optional dependency, imported on use
    if name in ("create_app", "serve"):
        from visiontune.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'visiontune.serve' has no attribute {name!r}")
