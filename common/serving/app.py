"""The KServe v2 HTTP server: FastAPI routes over a runtime, a dynamic batcher, an image-decoding thread pool
and Prometheus metrics; ``serve`` runs it under uvicorn (whose SIGTERM handling drains requests in flight). With
``--index`` it also answers similar-image requests from an index written by ``convnets embed``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from common.serving.batcher import DynamicBatcher
from common.serving.config import ServeConfig
from common.serving.metrics import ServerMetrics
from common.serving.model import ImageDecoder, load_runtime
from common.serving.protocol import (
    IMAGE_INPUT,
    OUTPUTS,
    PROBABILITIES,
    InferRequest,
    ProtocolError,
    build_response,
    parse_infer,
)
from common.serving.similar import DEFAULT_K, load_similar, parse_k

log = logging.getLogger("convnets")


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (Content-Length can be absent or lie)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"request body of {int(declared)} bytes is over --max-body-mb ({limit} bytes)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"request body is over --max-body-mb ({limit} bytes)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(cfg: ServeConfig, runtime=None) -> FastAPI:
    """The ASGI app serving ``runtime`` (loaded from ``cfg`` when not given)."""
    runtime = runtime or load_runtime(cfg.checkpoint, cfg.model_dir, cfg.runtime, cfg.device, cfg.model_threads)
    meta = runtime.meta
    name = cfg.model_name or meta.arch
    metrics = ServerMetrics(cfg.max_batch_size)
    # ONNX Runtime serving resizes with PIL wherever it runs, so the slim image (no torch) answers as the full one.
    decoder = ImageDecoder(meta, cfg.max_image_pixels, torch_resize=runtime.name == "torch")
    decode_pool = concurrent.futures.ThreadPoolExecutor(cfg.workers, thread_name_prefix="decode")
    body_limit = int(cfg.max_body_mb * 1024 * 1024)

    def on_batch(size: int, queue_times: list[float]) -> None:
        metrics.batch_size.labels(name).observe(size)
        for t in queue_times:
            metrics.queue_time.labels(name).observe(t)

    batcher = DynamicBatcher(runtime, cfg.max_batch_size, cfg.max_queue_delay_ms / 1000, on_batch, cfg.instances)

    # Loaded here, not in the lifespan: an index built by another network stops the start with its reason.
    similar = load_similar(cfg.index, cfg.checkpoint, meta, cfg.device) if cfg.index else None

    def on_similar_batch(size: int, queue_times: list[float]) -> None:
        metrics.similar_batch_size.labels(name).observe(size)
        for t in queue_times:
            metrics.similar_queue_time.labels(name).observe(t)

    # The embedding network is a model of its own (the head cut off), so it gets a batcher of its own, with the
    # same limits: concurrent queries share a forward pass as inference requests do, in a second model thread.
    embed_batcher = (
        DynamicBatcher(similar.embed, cfg.max_batch_size, cfg.max_queue_delay_ms / 1000, on_similar_batch)
        if similar
        else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime(np.zeros((1, 3, meta.image_size, meta.image_size), np.float32))  # warm up before reporting ready
        batcher.start()
        if embed_batcher:
            embed_batcher.start()
        app.state.ready = True
        log.info("serving model %r (%s, %s, %d classes, input 3x%dx%d) at http://%s:%d/  batch <= %d, delay %g ms, "
                 "%d instance(s) on %d thread(s) each", name, meta.arch, runtime.name, len(meta.classes),
                 meta.image_size, meta.image_size, cfg.host, cfg.port, cfg.max_batch_size, cfg.max_queue_delay_ms,
                 cfg.instances, cfg.model_threads)  # fmt: skip
        if similar:
            log.info("similar-image search on: %d images of %s (%s index) at POST /v2/models/%s/similar?k=K",
                     len(similar), similar.folder, similar.meta.get("index"), name)  # fmt: skip
        yield
        # uvicorn calls this after the requests in flight have been answered (graceful shutdown on SIGTERM).
        app.state.ready = False
        await batcher.stop()
        if embed_batcher:
            await embed_batcher.stop()
        decode_pool.shutdown(wait=True)
        log.info("server stopped: %d inference requests received, %d answered (%d with an error)",
                 *metrics.infer_totals(name))  # fmt: skip

    app = FastAPI(title="convnets KServe v2 server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ready = False

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(str(exc.detail), exc.status_code)

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError):
        return _error(str(exc), exc.status)

    def check_model(model: str) -> None:
        if model != name:
            raise ProtocolError(f"unknown model {model!r}: this server serves {name!r}", 404)

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": app.state.ready}, status_code=200 if app.state.ready else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "convnets", "version": "1", "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str = "1"):
        check_model(model)
        s = meta.image_size
        return {
            "name": name,
            "versions": ["1"],
            "platform": runtime.name,
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [-1, 3, s, s]},
                {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [
                {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(meta.classes)]},
                {"name": OUTPUTS[1], "datatype": "BYTES", "shape": [-1, -1]},
                {"name": OUTPUTS[2], "datatype": "FP32", "shape": [-1, -1]},
            ],
            "parameters": {
                "classes": meta.classes,
                "multilabel": meta.multilabel,  # probabilities: a sigmoid per label, compared with its threshold
                **({"thresholds": meta.thresholds} if meta.multilabel else {}),
                "preprocessing": {"resize": meta.resize_size, "crop": s, "mean": meta.mean, "std": meta.std},
                "max_batch_size": cfg.max_batch_size,
                "similar": {"enabled": True, "route": f"/v2/models/{name}/similar?k=K", **similar.describe()}
                if similar
                else {"enabled": False},
            },
        }

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = "1"):
        check_model(model)
        return JSONResponse({"name": name, "ready": app.state.ready}, status_code=200 if app.state.ready else 503)

    async def read_request(request: Request) -> InferRequest:
        body = await _read_body(request, body_limit)
        return parse_infer(body, request.headers.get("inference-header-content-length"), meta.image_size,
                           len(meta.classes), cfg.top_k)  # fmt: skip

    async def model_input(parsed: InferRequest) -> np.ndarray:
        """The normalised batch of a request: its tensor, or its images decoded in the thread pool."""
        if parsed.kind != "images":
            return parsed.tensor
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(decode_pool, decoder, b) for b in parsed.images), return_exceptions=True
        )
        for i, d in enumerate(decoded):
            if isinstance(d, ValueError):
                where = f"image {i}: " if len(decoded) > 1 else ""
                raise ProtocolError(f"input 'image': {where}{d}")
            if isinstance(d, BaseException):
                raise d
        return np.stack(decoded)

    async def counted(model: str, route: str, work) -> Response:
        """Run a route's ``work()`` with its request, failure and latency series: a ProtocolError becomes its
        status with the message, anything else a logged 500."""
        requests, failures, latency, what = routes[route]
        started = time.perf_counter()
        label = name if model == name else "(unknown)"
        requests.labels(label).inc()
        try:
            response = await work()
        except ProtocolError as e:
            failures.labels(label, str(e.status)).inc()
            return _error(str(e), e.status)
        except Exception:
            failures.labels(label, "500").inc()
            log.exception("%s failed", what)
            return _error(f"internal error while {what} (see the server log)", 500)
        latency.labels(name).observe(time.perf_counter() - started)
        return response

    routes = {
        "infer": (metrics.requests, metrics.failures, metrics.latency, "running the model"),
        "similar": (metrics.similar_requests, metrics.similar_failures, metrics.similar_latency,
                    "searching similar images"),
    }  # fmt: skip

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str = "1"):
        async def work() -> Response:
            check_model(model)
            parsed = await read_request(request)
            probs = await batcher.submit(await model_input(parsed))
            content, header_length = build_response(name, parsed, probs, meta.classes)
            if header_length is None:
                return Response(content, media_type="application/json")
            headers = {"Inference-Header-Content-Length": str(header_length)}
            return Response(content, media_type="application/octet-stream", headers=headers)

        return await counted(model, "infer", work)

    @app.post("/v2/models/{model}/similar")
    @app.post("/v2/models/{model}/versions/{version}/similar")
    async def similar_images(model: str, request: Request, version: str = "1"):
        """The ``k`` indexed images nearest to each input image (the same body as ``infer``), best first."""

        async def work() -> Response:
            check_model(model)
            if similar is None:
                raise ProtocolError("this server has no similar-image index: start it with --index INDEX (a folder "
                                    "written by `convnets embed` with the served checkpoint)", 404)  # fmt: skip
            k = parse_k(request.query_params.get("k"), DEFAULT_K, len(similar))
            parsed = await read_request(request)
            vectors = await embed_batcher.submit(await model_input(parsed))
            # faiss releases the GIL while it searches: off the event loop, in the decoding threads.
            hits = await asyncio.get_running_loop().run_in_executor(decode_pool, similar.search, vectors, k)
            answer = {"model_name": name, "model_version": "1", "k": k, "results": hits}
            if parsed.id is not None:
                answer["id"] = parsed.id
            return JSONResponse(answer)

        return await counted(model, "similar", work)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = resources.files("common.serving").joinpath("page.html").read_text()
    page = (
        page.replace("{{MODEL}}", html.escape(name))
        .replace("{{TITLE}}", html.escape(f"{name} ({meta.arch}, {len(meta.classes)} classes)"))
        .replace("{{SIMILAR}}", "true" if similar else "false")
    )

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM; requests in flight are answered before it exits."""
    import signal
    from importlib.util import find_spec

    import uvicorn

    app = create_app(cfg.check())
    # uvloop and httptools when installed (the serve extra and the slim image's requirements name them): the slim
    # image without them served 7% fewer requests/s than the full one, which had them through another package.
    loop = "uvloop" if find_spec("uvloop") else "asyncio"
    http = "httptools" if find_spec("httptools") else "h11"
    log.info("HTTP on the %s event loop and the %s parser", loop, http)
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler it found: with Python's default one
    # the process would die with -15 after a clean shutdown. A requested stop is a success (exit 0).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # access_log off: one line per request costs throughput; /metrics counts them instead.
    uvicorn.run(app, host=cfg.host, port=cfg.port, loop=loop, http=http, access_log=False, log_level="info",
                timeout_graceful_shutdown=30)  # fmt: skip
