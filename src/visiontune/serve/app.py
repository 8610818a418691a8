"""The HTTP service: one backbone in memory, many task adapters, chosen per request.

The Mona authors' deployment argument is "one large vision model + n adapters": this app serves an
:class:`visiontune.multi.AdapterHost` (one frozen backbone shared by every task; each task brings its
own LoRA/DoRA/Mona/head and label set) over FastAPI. Endpoints:

- ``POST /v1/predict``: an image (multipart file field ``image``, or JSON ``{"image": base64}``),
  ``adapter`` (optional when only one is loaded) and ``top_k`` -> top-k ``{"label", "score"}``.
- ``GET /v1/adapters``: loaded adapters, their methods and labels, and the shared backbone.
- ``GET /healthz``: liveness plus batching counters.
- ``GET /``: a small web page (choose an adapter, drop an image, see the top-k bars).
- ``GET /docs``: FastAPI's OpenAPI page.

Every bad request gets a 4xx JSON body ``{"error": {"code", "message"}}`` whose message names the
problem and the fix (and a server fault a 500 with the same body, never plain text); the service
keeps serving. Forward passes run on one worker thread that micro-batches concurrent requests per
adapter (:mod:`visiontune.serve.batching`).

Small files must not exhaust the server: a 140 KB PNG can declare 12,000 x 12,000 pixels. Images are
decoded by :func:`visiontune.data.images.decode_image` (a multi-band run's ``.npy`` / ``.tif`` upload by
:func:`visiontune.data.bands.read_bands`, through :func:`~visiontune.data.bands.decode_for`), which reads the size from the header and
refuses (413) an image over ``--max-pixels`` or ``--max-aspect`` before decoding a pixel (a JPEG
is first tried at reduced scale), and at most ``--max-decodes`` images are decoded at once (further
requests wait), so decoding memory is bounded by ``max_decodes`` images of at most ``max_pixels``
each, whatever the upload claims.

FastAPI, starlette and uvicorn do the HTTP work; what is written here is the request checking (the
body is read with a size cap before any parsing, so an oversized upload is refused without being
held in memory) and the glue to the adapter host.

Why one module over 500 lines: the response schemas (they are the OpenAPI page), the routes, the mapping of
every failure to a 4xx/5xx JSON body and the server's start-up checks (bind address, API key) describe one
service and change together; the batching and the labeling page live in their own modules.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import difflib
import hmac
import json
import math
import sys
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import PurePath
from typing import Any, AsyncIterator, Sequence

import torch

from visiontune.data.images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    ImageLimits,
    ImageTooLargeError,
)
from visiontune.data.bands import decode_for
from visiontune.errors import ConfigError, DataError

try:
    import fastapi
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser
except ImportError as _exc:  # pragma: no cover - exercised only without the extra installed
    raise ConfigError(
        f"the HTTP service needs FastAPI, uvicorn and python-multipart ({_exc}); install them with: "
        "pip install 'visiontune[serve]'"
    ) from _exc
from visiontune.infer.predictor import check_top_k, top_k_predictions
from visiontune.multi import AdapterHost, check_host_precision
from visiontune.serve.batching import MicroBatcher
from visiontune.runtime import resolve_device
from visiontune.infer.backends import (
    ExportBackend, ExportHost, check_device, check_export_precision, export_backend_of, resolve_backend,
)

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
"""Default largest accepted image file (10 MiB); ``visiontune serve --max-bytes`` changes it."""

DEFAULT_TOP_K = 5
DEFAULT_MAX_DECODES = 2
"""Default most images decoded at once (``--max-decodes``): decoding is CPU- and memory-bound, and more
parallel decodes than cores only add memory."""
DEFAULT_MAX_UPLOADS = 16
"""Default most request bodies held in memory at once (``max_uploads``); further requests wait, unread, in the
socket buffers. With the default ``--max-bytes`` that bounds uploads in flight to about 220 MB, where 30 concurrent
10 MB uploads used to add 1.27 GB."""

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host headers a loopback server answers by default: a web page on another site that rebinds its own DNS name
to 127.0.0.1 sends its own name, and is refused (DNS rebinding)."""

# Multipart framing and base64 (4 bytes per 3) make a request body larger than the image it carries.
_BODY_SLACK = 64 * 1024
# After refusing an oversized body, read (and drop) at most this much more so the client receives the
# 413 instead of a connection reset mid-upload; beyond it the connection is simply closed.
_DRAIN_LIMIT = 64 * 1024 * 1024


class ApiError(Exception):
    """A request problem answered as ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Label(BaseModel):
    """One ranked label."""

    label: str = Field(description="class name")
    score: float = Field(description="soft-max probability in [0, 1]")


class PredictResponse(BaseModel):
    """Answer of ``POST /v1/predict``."""

    adapter: str = Field(description="the adapter that answered")
    predictions: list[Label] = Field(description="top-k labels, best first")
    batch_size: int = Field(description="how many requests shared this forward pass (micro-batching)")
    latency_ms: float = Field(description="server time from a complete request to the answer")


class PredictJSON(BaseModel):
    """JSON request body of ``POST /v1/predict``."""

    image: str = Field(description="the image file, base64-encoded (a data: URL is accepted too)")
    adapter: str | None = Field(default=None, description="adapter name (see GET /v1/adapters); optional with one adapter")
    top_k: int | None = Field(default=None, description="labels to return (>= 1)")


class AdapterInfo(BaseModel):
    """One loaded adapter."""

    name: str
    method: str
    classes: list[str]
    num_classes: int
    source: str | None = Field(description="the run directory's name (not its path: clients need not learn the server's layout)")
    private_bytes: int = Field(description="memory this adapter adds to the shared backbone (adapter + head)")


class AdaptersResponse(BaseModel):
    """Answer of ``GET /v1/adapters``."""

    backend: str = Field(description="torch (one shared backbone) or an export backend such as onnxruntime or openvino "
                                     "(one exported model per adapter)")
    precision: str = Field(description="what the models compute in: fp32 or bf16 (torch), fp32 or int8 (exports)")
    backbone: dict[str, Any]
    adapters: list[AdapterInfo]
    default: str | None = Field(description="the adapter used when a request names none (only with one adapter)")
    max_bytes: int
    max_pixels: int
    max_aspect: float
    default_top_k: int


class ErrorBody(BaseModel):
    """What went wrong and how to fix it."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    error: ErrorBody


def _multipart_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the image file"},
            "adapter": {"type": "string", "description": "adapter name; optional with one adapter"},
            "top_k": {"type": "integer", "minimum": 1, "description": "labels to return"},
        },
    }


async def _read_body(request: Any, limit: int, max_bytes: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (checked while streaming).

    ``limit`` is the image limit ``max_bytes`` plus room for multipart framing and base64 growth.
    """
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            too_big = True
        if too_big:
            if total > _DRAIN_LIMIT:
                break
            continue
        chunks.append(chunk)
    if too_big:
        size = declared if declared.isdigit() else f"more than {total}"
        raise ApiError(413, "too_large", f"the request body is {size} bytes, too large for this server's image limit of "
                       f"{max_bytes} bytes (--max-bytes); send a smaller or more compressed image")
    return b"".join(chunks)


async def _parse_request(request: Any, max_bytes: int) -> tuple[bytes, Any, Any]:
    """(image bytes, adapter, top_k) from a multipart form or a JSON body."""
    ctype = request.headers.get("content-type", "").lower()
    if not (ctype.startswith("multipart/form-data") or ctype.startswith("application/json")):
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype or 'none'!r} is not supported; send multipart/form-data with a file field "
                       "'image', or application/json {\"image\": \"<base64>\", \"adapter\": ..., \"top_k\": ...}")
    body = await _read_body(request, max_bytes * 4 // 3 + _BODY_SLACK, max_bytes)
    if ctype.startswith("application/json"):
        try:
            doc = json.loads(body)
        except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack: the client's fault, not a 500
            raise ApiError(400, "bad_json", "the JSON body is nested too deeply; send a flat object "
                           "{\"image\": \"<base64>\"}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, "bad_json", f"the body is not valid JSON ({exc}); send {{\"image\": \"<base64>\"}}") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "bad_json", f"the JSON body is a {type(doc).__name__}; send an object {{\"image\": \"<base64>\"}}")
        unknown = sorted(set(doc) - {"image", "adapter", "top_k"})
        if unknown:
            raise ApiError(400, "unknown_field", f"unknown field(s) {unknown}; valid fields: image, adapter, top_k")
        encoded = doc.get("image")
        if not isinstance(encoded, str) or not encoded:
            raise ApiError(400, "missing_image", "field 'image' is missing or not a string; put the base64-encoded image file there")
        if encoded.startswith("data:") and "," in encoded:
            encoded = encoded.split(",", 1)[1]
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "bad_base64", f"field 'image' is not valid base64 ({exc}); encode the file's bytes with base64") from None
        return data, doc.get("adapter"), doc.get("top_k")

    async def once() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_multipart", f"cannot parse the multipart body ({exc.message}); send one file field 'image'") from None
    try:
        unknown = sorted(set(form.keys()) - {"image", "adapter", "top_k"})
        if unknown:
            raise ApiError(400, "unknown_field", f"unknown form field(s) {unknown}; valid fields: image, adapter, top_k")
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing_image", "form field 'image' is missing or not a file; send the image as a file part named 'image'")
        data = await upload.read()
        return data, form.get("adapter"), form.get("top_k")
    finally:
        await form.close()


def _base_name(path: str | None) -> str | None:
    """The last component of a server-side path: enough to tell runs apart, without the server's directory layout."""
    if path is None:
        return None
    return PurePath(str(path).rstrip("/\\")).name or str(path)


def _parse_top_k(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return check_top_k(int(value.strip()) if isinstance(value, str) else value)
    except (ValueError, ConfigError):
        raise ApiError(400, "bad_top_k", f"top_k={value!r} is invalid; use an integer >= 1 (e.g. top_k=3)") from None


def _pick_adapter(host: AdapterHost, value: Any) -> str:
    names = list(host.tasks)
    if value is None or value == "":
        if len(names) == 1:
            return names[0]
        raise ApiError(400, "missing_adapter", f"this server hosts {len(names)} adapters; name one with 'adapter': {', '.join(names)}")
    if not isinstance(value, str) or value not in host.tasks:
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ApiError(404, "unknown_adapter", f"no adapter {value!r}.{hint} Loaded adapters: {', '.join(names)} (GET /v1/adapters)")
    return value


def check_settings(
    max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int = 32, max_wait_ms: float = 1.0,
    max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect: float = DEFAULT_MAX_ASPECT, max_decodes: int = DEFAULT_MAX_DECODES,
) -> ImageLimits:
    """Validate the service's settings (before any model is loaded) and return its decoding limits.

    Raises:
        ConfigError: every bad setting, each named by its command-line option with the valid range.
    """
    problems = []
    for option, value, low in (("--max-bytes", max_bytes, 1), ("--max-batch", max_batch, 1),
                               ("--max-pixels", max_pixels, 1), ("--max-decodes", max_decodes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{option} {value!r} is invalid; use an integer >= {low}")
    if not (math.isfinite(max_wait_ms) and max_wait_ms >= 0):
        problems.append(f"--batch-wait-ms {max_wait_ms!r} is invalid; use a number >= 0 (milliseconds)")
    if not (math.isfinite(max_aspect) and max_aspect >= 1):
        problems.append(f"--max-aspect {max_aspect!r} is invalid; use a number >= 1 (longer side / shorter side)")
    if problems:
        raise ConfigError(problems)
    return ImageLimits(int(max_pixels), float(max_aspect), "--max-pixels", "--max-aspect")


def create_app(
    host: AdapterHost | Any, max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int = 32, max_wait_ms: float = 1.0,
    default_top_k: int = DEFAULT_TOP_K, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect: float = DEFAULT_MAX_ASPECT,
    max_decodes: int = DEFAULT_MAX_DECODES, api_key: str | None = None, max_uploads: int = DEFAULT_MAX_UPLOADS,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
) -> Any:
    """The FastAPI app serving ``host``'s adapters.

    Args:
        host: the adapters: ``AdapterHost.from_runs({...})`` (torch, one shared backbone) or
            ``ExportHost.from_exports({...})`` (an export backend); ``transform_for(name)`` preprocesses images.
        max_bytes: largest accepted image file in bytes (larger -> 413).
        max_batch: most requests per batched forward pass.
        max_wait_ms: how long the batcher waits for companions of a request.
        default_top_k: labels returned when a request gives no ``top_k``.
        max_pixels: largest decoded image, width x height (larger -> 413; JPEGs are tried at reduced scale first).
        max_aspect: largest longer / shorter side ratio (more elongated -> 413).
        max_decodes: most images decoded at once; further requests wait for a slot.
        api_key: when set, every ``/v1/`` request must send it (``Authorization: Bearer <key>`` or
            ``X-API-Key: <key>``) or gets 401; the page, ``/healthz`` and the API docs stay open, and ``/healthz``
            names the adapters only to a request that sends the key.
        max_uploads: most request bodies read and held at once; further requests wait before theirs is read.
        allowed_hosts: the ``Host`` header values (names or addresses, any port) answered; others get 421.
            Default: the loopback names, which stops DNS rebinding against a server on 127.0.0.1. None or
            ``"*"`` among them: any host (a server behind a proxy that checks it).

    Raises:
        ConfigError: a bad setting, a host without transform or adapters.
    """
    if host.transform is None:
        raise ConfigError("the adapter host has no transform; build it with AdapterHost.from_runs(...)")
    if not host.tasks:
        raise ConfigError("the adapter host has no adapters; pass at least one --adapter NAME=RUN_DIR")
    limits = check_settings(max_bytes, max_batch, max_wait_ms, max_pixels, max_aspect, max_decodes)
    default_top_k = check_top_k(default_top_k)
    if api_key is not None and not api_key.strip():
        raise ConfigError("the API key is empty; set --api-key / VISIONTUNE_API_KEY to a secret, or unset it for an open service")
    if isinstance(max_uploads, bool) or not isinstance(max_uploads, int) or max_uploads < 1:
        raise ConfigError(f"max_uploads={max_uploads!r} is invalid; use a number of requests >= 1 "
                          f"(default {DEFAULT_MAX_UPLOADS})")
    hosts = None if allowed_hosts is None or "*" in allowed_hosts else {h.lower().strip("[]") for h in allowed_hosts}
    # Created here, used on the server's event loop (asyncio primitives bind to a loop on first use).
    decode_slots = asyncio.Semaphore(max_decodes)
    upload_slots = asyncio.Semaphore(max_uploads)
    # A weights *file* is named by its file name only (with its sha256 beside it), not by its server path.
    public_identity = dict(host.identity)
    weights = public_identity.get("weights")
    if isinstance(weights, str) and ("/" in weights or "\\" in weights):
        public_identity["weights"] = _base_name(weights)

    def forward(name: str, batch: torch.Tensor) -> torch.Tensor:
        return host.logits(name, batch).softmax(dim=1)

    batcher = MicroBatcher(forward, max_batch=max_batch, max_wait_ms=max_wait_ms)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = fastapi.FastAPI(
        title="visiontune",
        description="One vision backbone, many task adapters: image classification with per-request adapter choice.",
        version=__import__("visiontune").__version__,
        lifespan=lifespan,
    )
    app.state.host = host
    app.state.batcher = batcher
    errors = {"model": ErrorResponse}

    def error_response(status: int, code: str, message: str) -> Any:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    expected_key = api_key.encode() if api_key is not None else None

    def _sent_key(request: Any) -> str:
        auth = request.headers.get("authorization", "")
        return auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")

    def authorised(request: Any) -> bool:
        # compare_digest: the comparison takes the same time wherever the first wrong byte is.
        return expected_key is None or hmac.compare_digest(_sent_key(request).encode(), expected_key)

    if expected_key is not None:

        @app.middleware("http")
        async def _require_key(request: fastapi.Request, call_next: Any) -> Any:
            if request.url.path.startswith("/v1/") and not authorised(request):
                response = error_response(
                    401, "unauthorized", "this server needs an API key; send it as 'Authorization: Bearer <key>' "
                    "or 'X-API-Key: <key>'" + (" (the key sent is wrong)" if _sent_key(request) else ""))
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            return await call_next(request)

    if hosts is not None:

        # Registered last, so it runs first: a request for another host name is answered before anything else.
        @app.middleware("http")
        async def _check_host(request: fastapi.Request, call_next: Any) -> Any:
            name = _host_name(request.headers.get("host", ""))
            if name not in hosts:
                return error_response(
                    421, "wrong_host", f"this server answers requests for {', '.join(sorted(hosts))}, not {name or 'no host'!r}; "
                    "start it with --allowed-hosts naming the host clients use (or serve behind a proxy)")
            return await call_next(request)

    # Every 500 the app answers, wherever it failed (in the batch or after it): /healthz reports them, so a
    # server that fails every request is not reported healthy with "errors: 0".
    failures = {"server_errors": 0}

    @app.exception_handler(ApiError)
    async def _api_error(_: Any, exc: ApiError) -> Any:
        if exc.status >= 500:
            failures["server_errors"] += 1
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Any, exc: StarletteHTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _server_error(_: Any, exc: Exception) -> Any:
        failures["server_errors"] += 1
        # Starlette's default answer to an unhandled exception is a plain-text 500; clients of this API
        # parse JSON, so a server fault gets the same body shape as every other error.
        return error_response(500, "internal", f"the server failed on this request ({type(exc).__name__}: {exc}); "
                              "please report it with the request that caused it")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Any, exc: RequestValidationError) -> Any:
        return error_response(422, "invalid_request", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.post(
        "/v1/predict", response_model=PredictResponse, summary="Top-k labels of one image",
        responses={400: errors, 401: errors, 404: errors, 413: errors, 415: errors, 422: errors, 500: errors},
        openapi_extra={"requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": _multipart_schema()},
            "application/json": {"schema": PredictJSON.model_json_schema()},
        }}},
    )
    async def predict(request: fastapi.Request) -> dict[str, Any]:
        """Classify one image with the named adapter: multipart field ``image`` or JSON base64 ``image``."""
        # The body is read only once an upload slot is free, and the slot is held until the image is decoded:
        # at most max_uploads bodies are in memory however many clients upload at once.
        async with upload_slots:
            data, adapter, top_k = await _parse_request(request, max_bytes)
            t0 = time.perf_counter()
            name = _pick_adapter(host, adapter)
            k = _parse_top_k(top_k, default_top_k)
            if len(data) > max_bytes:
                raise ApiError(413, "too_large", f"the image is {len(data)} bytes; this server accepts up to {max_bytes} "
                               "bytes (--max-bytes); send a smaller or more compressed image")
            transform = host.transform_for(name)
            try:
                async with decode_slots:
                    x = await run_in_threadpool(lambda: transform(decode_for(transform, data, "the uploaded image", limits)))
            except ImageTooLargeError as exc:
                raise ApiError(413, "image_too_large", str(exc)) from None
            except DataError as exc:
                raise ApiError(422, "not_an_image", str(exc)) from None
            data = b""  # the body is not kept while the request waits for its batch: the slot's bound holds
        try:
            result = await asyncio.wrap_future(batcher.submit(name, x))
        except Exception as exc:  # noqa: BLE001 - a model failure is the server's, reported as such
            raise ApiError(500, "internal", f"the model failed on this request: {type(exc).__name__}: {exc}") from exc
        preds = top_k_predictions(result.output[None], host.classes(name), k)[0]
        return {"adapter": name, "predictions": preds, "batch_size": result.batch_size,
                "latency_ms": 1000 * (time.perf_counter() - t0)}

    @app.get("/v1/adapters", response_model=AdaptersResponse, summary="Loaded adapters and the shared backbone")
    async def adapters() -> dict[str, Any]:
        """Every adapter with its method and label set; the backbone they share."""
        return {
            "backend": host.identity.get("backend", "torch"),
            "precision": host.precision,
            "backbone": public_identity,
            "adapters": [
                {"name": t.name, "method": t.method.name, "classes": t.classes, "num_classes": len(t.classes),
                 "source": _base_name(t.source), "private_bytes": t.private_bytes}
                for t in host.tasks.values()
            ],
            "default": next(iter(host.tasks)) if len(host.tasks) == 1 else None,
            "max_bytes": max_bytes,
            "max_pixels": limits.max_pixels,
            "max_aspect": limits.max_aspect,
            "default_top_k": default_top_k,
        }

    @app.get("/healthz", summary="Liveness and batching counters")
    async def healthz(request: fastapi.Request) -> dict[str, Any]:
        """``status: ok`` while the model worker runs; request / batch counters; the adapter names when the
        request may see them (an open server, or the API key sent)."""
        alive = batcher._thread.is_alive()
        body = {"status": "ok" if alive else "worker stopped", **batcher.snapshot(), **failures}
        if authorised(request):
            body["adapters"] = list(host.tasks)
        return body if alive else JSONResponse(body, status_code=503)

    page = resources.files("visiontune.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> Any:
        return HTMLResponse(page)

    return app


def serve(
    adapters: dict[str, str], host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
    max_bytes: int = DEFAULT_MAX_BYTES, max_batch: int = 32, max_wait_ms: float = 1.0, log_level: str = "info",
    max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect: float = DEFAULT_MAX_ASPECT, max_decodes: int = DEFAULT_MAX_DECODES,
    api_key: str | None = None, backend: str | None = None, int8: bool = False, precision: str = "fp32",
    allowed_hosts: Sequence[str] | None = None, max_uploads: int = DEFAULT_MAX_UPLOADS,
) -> None:
    """Load the adapters on one backbone and serve them until interrupted (blocking).

    Settings are checked and the port is bound *before* the models load, so a typo or a taken port
    fails in a second with a message, not after loading and not as a uvicorn traceback.

    Args:
        adapters: ``{name: run directory}``; all must share the backbone (name, weights, image size).
        host: interface to bind; the default loopback keeps the service private to this machine.
        port: TCP port.
        device: where the backbone runs.
        max_bytes: largest accepted image file.
        max_batch: most requests per batched forward pass.
        max_wait_ms: batching window.
        log_level: uvicorn's log level.
        max_pixels: largest decoded image (width x height).
        max_aspect: largest longer / shorter side ratio.
        max_decodes: most images decoded at once.
        api_key: require this key on ``/v1/`` requests (see :func:`create_app`).
        backend: a registered inference backend: ``torch`` (one shared backbone), an export backend such as
            ``onnxruntime`` or ``openvino`` (each adapter's export; a run directory uses its ``export/``), or None
            (the exports' own backend when every adapter is an export, else torch).
        int8: serve the INT8 exports (export backends).
        precision: torch backend: ``fp32`` (default) or ``bf16`` autocast (faster on CPUs with AMX or AVX-512 BF16).
        allowed_hosts: ``Host`` header values answered (see :func:`create_app`); default: the loopback names when
            ``host`` is a loopback address (against DNS rebinding), any host otherwise, plus ``host`` itself.
        max_uploads: most request bodies held in memory at once.

    A non-loopback ``host`` gets a warning on stderr: the service is then reachable from the network,
    and without an API key anyone who reaches it can use it.

    Raises:
        ConfigError: a bad setting, a port that cannot be bound, a path that is not a run (or has no
            export), a bad backend.
        WeightsError: runs trained on different backbones (torch backend).
    """
    import socket

    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover
        raise ConfigError("serving needs uvicorn; install it with: pip install 'visiontune[serve]'") from exc

    check_settings(max_bytes, max_batch, max_wait_ms, max_pixels, max_aspect, max_decodes)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is invalid; use 1-65535 (or 0 for any free port)")
    if api_key is not None and not api_key.strip():
        raise ConfigError("the API key is empty; set --api-key / VISIONTUNE_API_KEY to a secret, or unset it for an open service")
    if backend in (None, "auto"):
        kinds = {export_backend_of(p) for p in adapters.values()}
        if len(kinds) > 1:
            raise ConfigError("the --adapter paths are of different kinds (run directories and exports, or exports of "
                              "different formats); serve them with one backend: --backend NAME (run directories then "
                              "use their export/), or adapters of one kind")
        found = next(iter(kinds), None)
        backend = found.name if found is not None else None
    chosen = None
    for path in adapters.values():
        chosen = resolve_backend(backend, path, int8)
    if isinstance(chosen, ExportBackend):
        check_device(chosen, device)
        check_export_precision(chosen, precision)
    else:
        check_host_precision(precision)  # before binding the port, as every other setting
    sock = _bind(host, port)
    try:
        if not _is_loopback(sock.getsockname()[0]):
            guard = ("requests need the API key" if api_key else
                     "there is no API key, so anyone who can reach it can use it (set VISIONTUNE_API_KEY)")
            print(f"visiontune: warning: --host {host} makes the service reachable from other machines; {guard}. "
                  "Serve on 127.0.0.1 behind a reverse proxy with TLS for anything public.", file=sys.stderr, flush=True)
        if isinstance(chosen, ExportBackend):
            adapter_host: Any = ExportHost.from_exports(adapters, int8=int8, backend=chosen)
        else:
            adapter_host = AdapterHost.from_runs(adapters, device=resolve_device(device), precision=precision)
        if allowed_hosts is None:
            allowed_hosts = (*LOOPBACK_HOSTS, host) if _is_loopback(sock.getsockname()[0]) else None
        app = create_app(adapter_host, max_bytes=max_bytes, max_batch=max_batch, max_wait_ms=max_wait_ms,
                         max_pixels=max_pixels, max_aspect=max_aspect, max_decodes=max_decodes, api_key=api_key,
                         max_uploads=max_uploads, allowed_hosts=allowed_hosts)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if sock.family == socket.AF_INET6 else bound_host
        print(f"visiontune: serving {len(adapters)} adapter(s) [{', '.join(adapters)}] on http://{shown}:{bound_port} "
              f"(web page /, API docs /docs; backend {chosen.name if chosen else 'torch'}{' INT8' if int8 else ''}"
              f"{' bf16' if precision == 'bf16' else ''})", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        server.run(sockets=[sock])
    finally:
        sock.close()


def _host_name(header: str) -> str:
    """The host of a ``Host`` header without its port, lower-case (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> Any:
    """A listening-ready socket on ``host:port``, or a ConfigError naming the address and the fix."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r} is not an address of this machine ({exc}); use 127.0.0.1, ::1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = ("another process is listening there; stop it or choose another --port"
                if exc.errno == errno.EADDRINUSE else "check --host and --port")
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from None
    sock.set_inheritable(True)
    return sock
