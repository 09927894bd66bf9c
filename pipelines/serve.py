"""Ray Serve: every dataset's champion behind one HTTP endpoint, with dynamic batching.

One deployment serves many models: a request names its model (`vit-digits`, a registry URI, or
nothing for the default), the replica loads it on demand into a bounded LRU cache (Serve model
multiplexing), and `@serve.batch` groups concurrent requests so the model runs on batches.

Requests are preprocessed by `pipelines.ingest.image_to_tokens` with the checkpoint's own config,
the same function the training pipeline used. Hostile input never reaches the model: empty or
oversized bodies, unsupported content types, undecodable or gigantic images, bad JSON or base64,
and out-of-range `top_k` all get a 4xx with a JSON reason. `attention=true` adds the attention-
rollout map of the image (the paper's Fig. 6) to a single-image prediction.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type on the
# ingress methods to inject the request instead of treating it as a query parameter.
import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException
from ray import serve

from pipelines import tracking
from pipelines.ingest import BadImageError, image_to_tokens
from vit import checkpoint as vit_checkpoint
from vit.analysis import attention_rollout_map
from vit.model import VisionTransformer

TOKEN_ENV = "VITRAY_API_TOKEN"
MODEL_CACHE_ENV = "VITRAY_MODEL_CACHE"
REGISTRY_PREFIX = "models:/"
APP_NAME = "vitray"  # the Serve application (see `undeploy`)
MODELS_PER_REPLICA = 4  # LRU cache of loaded models per replica (Serve multiplexing)
DEFAULT_TOP_K = 5  # or every class of a model with fewer


@dataclass(frozen=True)
class ServeConfig:
    """How the endpoint runs; safe defaults (loopback only, bounded bodies and pixels)."""

    models: dict[str, str] = field(default_factory=dict)  # name -> checkpoint dir or models:/ URI
    default_model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 64  # Serve's default of 5 would cap every batch at 5
    num_replicas: int | str = 1
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: int = 16
    num_cpus: float = 1.0
    use_gpu: bool = False
    max_body_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000
    max_top_k: int = 20
    max_batch_images: int = 32

    def __post_init__(self) -> None:
        """Refused here, not as a replica that fails to start inside Serve."""
        counts = (
            "port", "max_batch_size", "max_ongoing_requests", "min_replicas", "max_replicas",
            "target_ongoing_requests", "max_body_bytes", "max_image_pixels", "max_top_k",
            "max_batch_images",
        )  # fmt: skip
        wrong = [name for name in counts if getattr(self, name) < 1]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} must be at least 1")
        if self.port > 65535:
            raise ValueError(f"port must be at most 65535, got {self.port}")
        if self.default_model is not None and self.default_model not in self.models:
            # Else every request that names no model gets a 404 from a healthy-looking endpoint.
            raise ValueError(
                f"default_model {self.default_model!r} is not one of the models "
                f"{sorted(self.models)}"
            )
        if self.batch_wait_timeout_s < 0 or self.num_cpus < 0:
            raise ValueError("batch_wait_timeout_s and num_cpus must be 0 or more")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.num_replicas != "auto" and not (
            isinstance(self.num_replicas, int) and self.num_replicas >= 1
        ):
            raise ValueError(
                f"num_replicas must be 'auto' or at least 1, got {self.num_replicas!r}"
            )


@dataclass
class LoadedModel:
    name: str
    model: VisionTransformer
    class_names: tuple[str, ...]
    identity: dict[str, Any]


def _registry_version(reference: str) -> Any:
    """The registered model version a `models:/name@alias` or `models:/name/N` URI names."""
    spec = reference.removeprefix(REGISTRY_PREFIX)
    mlflow = tracking.client()
    if "@" in spec:
        return mlflow.get_model_version_by_alias(*spec.split("@", 1))
    if "/" in spec:
        return mlflow.get_model_version(*spec.rsplit("/", 1))
    raise ValueError(f"{reference}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def check_reference(reference: str) -> str:
    """Raise unless the reference names a readable checkpoint or an existing model version;
    return it with a registry alias replaced by the version the alias names now.

    `build_app` checks the whole table before Serve sees it: Serve stops a one-replica
    deployment's old replica before it starts the new one, so a redeploy with a mistyped path or
    a missing alias would otherwise take the endpoint down. Replicas do not check again: one
    restarted while the registry is unreachable still serves its local models. They get the
    pinned version, not the alias: replicas load models on first use, and one started after the
    alias moved (autoscaling, a restart, a model back from LRU eviction) would otherwise serve
    another version under the same name until the next deploy.
    """
    if reference.startswith(REGISTRY_PREFIX):
        version = _registry_version(reference)
        return f"{REGISTRY_PREFIX}{version.name}/{version.version}"
    vit_checkpoint.read_metadata(reference)
    return reference


def resolve_model(reference: str) -> tuple[Path, dict[str, Any]]:
    """A checkpoint directory for a local path or a `models:/name@alias` / `models:/name/N` URI;
    registry models are downloaded into `model_cache_dir()`."""
    if not reference.startswith(REGISTRY_PREFIX):
        return Path(reference), {"source": reference, "version": None, "run_id": None}
    cache_dir = model_cache_dir()
    version = _registry_version(reference)
    name = version.name
    # download_artifacts keeps the artifact folder's own name under the destination. Version
    # numbers restart in every registry, so the run id (unique) is part of the cache key.
    target = cache_dir / f"{name}-v{version.version}-{version.run_id}"
    directory = target / Path(version.source).name
    if not directory.exists():
        _download(version.source, target, directory)
    identity = {"source": reference, "version": str(version.version), "run_id": version.run_id}
    return directory, identity


def _download(source: str, target: Path, directory: Path) -> None:
    """Download into a staging folder, then rename it into place in one step.

    A cached checkpoint directory is therefore always complete, even when replicas on one node
    download the same version at once or a download dies half-way.
    """
    from mlflow.artifacts import download_artifacts

    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".download-") as staging:
        download_artifacts(
            artifact_uri=source, dst_path=staging, tracking_uri=tracking.tracking_uri()
        )
        try:
            os.rename(Path(staging) / directory.name, directory)
        except OSError:
            if not directory.exists():  # not another replica's finished copy: a real failure
                raise


def load_model(name: str, reference: str, device: torch.device) -> LoadedModel:
    directory, identity = resolve_model(reference)
    model, meta = vit_checkpoint.load(directory, map_location=device)
    model.eval()
    class_names = meta.class_names or tuple(str(i) for i in range(meta.config.num_classes))
    identity = {
        "name": name,
        **identity,
        "dataset": meta.provenance.get("dataset"),
        "classes": list(class_names),
        "preprocessing": meta.config.to_dict()["preprocessing"],
        "image_size": list(meta.config.image_size),
        "provenance": meta.provenance,
    }
    return LoadedModel(name, model, class_names, identity)


app = FastAPI(
    title="vitray",
    description="Vision Transformer image classification: every dataset's champion model.",
    version="1",
)


def api_token() -> str | None:
    """The bearer token requests must carry, or None for none.

    Set but empty (say ``$(cat missing-file)``) is an error: it must never mean "no token".
    Surrounding whitespace (a token file's newline) is not part of it.
    """
    token = os.environ.get(TOKEN_ENV)
    if token is not None and not token.strip():
        raise ValueError(f"{TOKEN_ENV} is set but empty; unset it or give it a token")
    return token.strip() if token is not None else None


def token_digest(token: str) -> str:
    """SHA-256 of a bearer token: what replicas hold and compare, so that the token itself never
    leaves the process that deploys (a replica's arguments and environment are less guarded)."""
    return hashlib.sha256(token.encode()).hexdigest()


def model_cache_dir() -> Path:
    """Where registry models are downloaded: `$VITRAY_MODEL_CACHE`, else a folder of this user's
    in the temp dir. Replicas trust what they find there, so it is made private to this user;
    one that belongs to someone else is refused. Set but empty counts as unset: as a path it
    would be the working directory, filled with models and made private."""
    default = Path(tempfile.gettempdir()) / f"vitray-models-{os.getuid()}"
    directory = Path(os.environ.get(MODEL_CACHE_ENV) or default)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_uid != os.getuid():
        raise PermissionError(
            f"model cache {directory} belongs to another user; replicas load what it holds "
            f"without further checks (set {MODEL_CACHE_ENV} to a folder of your own)"
        )
    directory.chmod(0o700)
    return directory


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=reason, headers=headers)


@serve.deployment
@serve.ingress(app)
class ViTService:
    def __init__(self, config: ServeConfig, token_sha256: str | None) -> None:
        """`token_sha256`: `token_digest` of the bearer token requests must carry, None for none."""
        self.config = config
        self.device = torch.device(
            "cuda" if config.use_gpu and torch.cuda.is_available() else "cpu"
        )
        self.token_sha256 = token_sha256
        self.forward_passes = 0
        self.images_forwarded = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # the latest
        self.in_flight = 0
        self.predict_batched.set_max_batch_size(config.max_batch_size)
        self.predict_batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    # ----------------------------------------------------------------- models
    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, name: str) -> LoadedModel:
        reference = self.config.models.get(name)
        if reference is None:
            raise _error(404, f"unknown model {name!r}; known: {sorted(self.config.models)}")
        try:
            return await asyncio.to_thread(load_model, name, reference, self.device)
        except (vit_checkpoint.CheckpointError, MlflowException, OSError) as error:
            # Checked at deploy, so gone since: a deleted checkpoint, the registry unreachable.
            raise _error(503, f"model {name!r} cannot be loaded now: {error}") from None

    async def _model_for(self, requested: str | None) -> LoadedModel:
        name = requested or serve.get_multiplexed_model_id() or self.config.default_model
        if not name:
            raise _error(400, f"name a model: one of {sorted(self.config.models)}")
        if name not in self.config.models:
            raise _error(404, f"unknown model {name!r}; known: {sorted(self.config.models)}")
        return await self.get_model(name)

    # ----------------------------------------------------------------- batching
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict_batched(
        self, items: list[tuple[LoadedModel, np.ndarray]]
    ) -> list[np.ndarray]:
        """One forward pass per model present in the batch; returns class probabilities."""
        results: list[np.ndarray | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for index, (loaded, _) in enumerate(items):
            groups.setdefault(id(loaded), []).append(index)
        for indices in groups.values():
            probs = self._forward(items[indices[0]][0], [items[i][1] for i in indices])
            for row, index in enumerate(indices):
                results[index] = probs[row]
        return results

    def _forward(self, loaded: LoadedModel, tokens: list[np.ndarray]) -> np.ndarray:
        self.forward_passes += 1
        self.images_forwarded += len(tokens)
        self.batch_sizes.append(len(tokens))
        batch = torch.from_numpy(np.stack(tokens)).to(self.device)
        with torch.inference_mode():
            return loaded.model(batch).float().softmax(-1).cpu().numpy()

    def _top_k_option(self, loaded: LoadedModel, options: dict[str, Any]) -> int:
        """The request's `top_k`, checked against the model; by default `DEFAULT_TOP_K`, or every
        class of a model with fewer (a two-class model must answer a request that names none)."""
        limit = min(self.config.max_top_k, len(loaded.class_names))
        top_k = self._int_option(options, "top_k", min(DEFAULT_TOP_K, limit))
        if not 1 <= top_k <= limit:
            raise _error(422, f"top_k must be between 1 and {limit}, got {top_k}")
        return top_k

    async def _tokenize(self, loaded: LoadedModel, images: list[bytes]) -> list[np.ndarray]:
        """Decode every image with the checkpoint's preprocessing, or 422 naming the bad one.

        Decoding runs on the event loop (a worker thread would fight the forward pass for the
        GIL), but yields to it between images: a batch of 32 flat PNGs of 40 MP each (1.3 s to
        decode apiece) would otherwise hold it past Serve's 30 s health-check timeout, and the
        check runs on this loop too.
        """
        tokens = []
        for index, data in enumerate(images):
            if index:
                await asyncio.sleep(0)
            try:
                tokens.append(
                    image_to_tokens(
                        data, loaded.model.config, max_image_pixels=self.config.max_image_pixels
                    )
                )
            except BadImageError as error:
                where = f"image {index}: " if len(images) > 1 else ""
                raise _error(422, f"{where}{error}") from None
        return tokens

    async def _predict(
        self, loaded: LoadedModel, tokens: list[np.ndarray], top_k: int
    ) -> list[list[dict[str, Any]]]:
        """Batch with concurrent requests; a request alone, or any with batching off, runs at once.

        Alone, the batch queue would only add its wait (`batch_wait_timeout_s`) to the latency,
        so the model runs straight away. Before deciding, the request yields to the event loop
        once: requests that arrived while the previous forward pass ran (already read by the
        replica's HTTP server, or handed over by Serve) get to this point too, so under load they
        meet in the batch queue instead of each finding the model free and running alone.
        """
        await asyncio.sleep(0)
        alone = self.in_flight == 1 and len(tokens) == 1
        if alone or self.config.max_batch_size == 1:  # 1: batching off, no queue to pass
            probabilities = [self._forward(loaded, [t])[0] for t in tokens]
        else:
            probabilities = await asyncio.gather(
                *(self.predict_batched((loaded, t)) for t in tokens)
            )
        return [self._top_k(loaded, p, top_k) for p in probabilities]

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Count the prediction requests this replica is handling (see `_predict`)."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def _attention(self, loaded: LoadedModel, tokens: np.ndarray) -> dict[str, Any]:
        """Attention rollout of one image: a (grid_h, grid_w) map scaled to a maximum of 1.

        It needs the eager attention path, so it runs outside the batched forward pass.
        """
        batch = torch.from_numpy(tokens[None]).to(self.device)
        with torch.inference_mode():
            heat = attention_rollout_map(loaded.model, batch)[0]
        return {
            "method": "rollout",
            "grid": list(loaded.model.config.grid_size),
            "patch_size": loaded.model.config.patch_size,
            "map": [[round(float(v), 4) for v in row] for row in heat.cpu()],
        }

    @staticmethod
    def _top_k(loaded: LoadedModel, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        order = np.argsort(-probs)[:k]
        return [
            {"label": loaded.class_names[i], "index": int(i), "score": float(probs[i])}
            for i in order
        ]

    # ----------------------------------------------------------------- request parsing
    def _authorise(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        supplied = credentials.strip() if scheme.lower() == "bearer" else ""  # RFC 7235: any case
        if not hmac.compare_digest(token_digest(supplied), self.token_sha256):
            raise _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        """The body, read under the size limit: refused on its declared length when it has one,
        else as soon as the bytes read pass the limit (chunked uploads)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            raise _error(413, f"body of {declared} bytes exceeds {self.config.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > self.config.max_body_bytes:
                raise _error(413, f"body exceeds {self.config.max_body_bytes} bytes")
        if not body:
            raise _error(400, "empty request body")
        return bytes(body)

    async def _images(self, request: Request) -> tuple[list[bytes], dict[str, Any]]:
        """Images and options from raw bytes, multipart files or JSON with base64."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        options: dict[str, Any] = dict(request.query_params)
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return [await self._body(request)], options
        if content_type == "multipart/form-data":
            # Parsed from the body read under the size limit: Starlette's own parser would spool
            # a chunked upload (no Content-Length to check) to disk without any limit.
            replay = self._replay(request, await self._body(request))
            form = await replay.form()
            images = [await f.read() for key, f in form.multi_items() if hasattr(f, "read")]
            options.update({k: v for k, v in form.multi_items() if isinstance(v, str)})
            if not images:
                raise _error(400, "multipart body has no file part")
            return images, options
        if content_type == "application/json":
            return self._json_images(await self._body(request), options)
        raise _error(
            415,
            f"unsupported content type {content_type or '(none)'}; use image/*, "
            "multipart/form-data or application/json",
        )

    @staticmethod
    def _replay(request: Request, body: bytes) -> Request:
        """The same request, its body served from memory."""

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        return Request(request.scope, receive)

    @staticmethod
    def _json_images(body: bytes, options: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]]:
        try:
            payload = json.loads(body)
        except ValueError as error:  # bad syntax or UTF-8, or an integer of over 4,300 digits
            raise _error(400, f"malformed JSON: {error}") from None
        except RecursionError:  # e.g. 100,000 nested brackets, well under the body limit
            raise _error(400, "malformed JSON: nested too deeply") from None
        if not isinstance(payload, dict):
            raise _error(400, "JSON body must be an object")
        encoded = payload.get("images") or ([payload["image"]] if "image" in payload else None)
        if (
            not isinstance(encoded, list)
            or not encoded
            or not all(isinstance(e, str) for e in encoded)
        ):
            raise _error(400, 'JSON body needs "image" (base64 string) or "images" (list)')
        try:  # line breaks allowed: MIME encoders and the `base64` command wrap at 76 columns
            images = [base64.b64decode("".join(e.split()), validate=True) for e in encoded]
        except (binascii.Error, ValueError):
            raise _error(400, "image is not valid base64") from None
        options.update({k: v for k, v in payload.items() if k not in ("image", "images")})
        return images, options

    @staticmethod
    def _int_option(options: dict[str, Any], name: str, default: int) -> int:
        """An integer from the query string or JSON; not a bool, a fraction or a list."""
        value = options.get(name, default)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
        raise _error(422, f"{name} must be an integer, got {value!r}")

    @staticmethod
    def _str_option(options: dict[str, Any], name: str) -> str | None:
        value = options.get(name)
        if value is None or isinstance(value, str):
            return value
        raise _error(422, f"{name} must be a string, got {value!r}")

    @staticmethod
    def _bool_option(options: dict[str, Any], name: str) -> bool:
        value = options.get(name, False)
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in ("true", "false", "1", "0"):
            raise _error(422, f"{name} must be true or false, got {value!r}")
        return text in ("true", "1")

    # ----------------------------------------------------------------- routes
    @app.post("/v1/predict")
    async def predict(self, request: Request) -> JSONResponse:
        with self._counted():
            return await self._predict_one(request)

    async def _predict_one(self, request: Request) -> JSONResponse:
        self._authorise(request)
        images, options = await self._images(request)
        if len(images) != 1:
            raise _error(400, "send one image to /v1/predict; use /v1/predict/batch for several")
        loaded = await self._model_for(self._str_option(options, "model"))
        top_k = self._top_k_option(loaded, options)
        with_attention = self._bool_option(options, "attention")
        start = time.perf_counter()
        tokens = await self._tokenize(loaded, images)
        [predictions] = await self._predict(loaded, tokens, top_k)
        body = {"predictions": predictions, "model": self._identity(loaded)}
        if with_attention:
            body["attention"] = await asyncio.to_thread(self._attention, loaded, tokens[0])
        body["latency_ms"] = round((time.perf_counter() - start) * 1000, 2)
        return JSONResponse(body)

    @app.post("/v1/predict/batch")
    async def predict_batch(self, request: Request) -> JSONResponse:
        with self._counted():
            return await self._predict_many(request)

    async def _predict_many(self, request: Request) -> JSONResponse:
        self._authorise(request)
        images, options = await self._images(request)
        if len(images) > self.config.max_batch_images:
            raise _error(
                413, f"{len(images)} images exceed the limit of {self.config.max_batch_images}"
            )
        if self._bool_option(options, "attention"):  # asked for, it must not silently go missing
            raise _error(422, "attention maps come from /v1/predict, one image per request")
        loaded = await self._model_for(self._str_option(options, "model"))
        top_k = self._top_k_option(loaded, options)
        results = await self._predict(loaded, await self._tokenize(loaded, images), top_k)
        return JSONResponse(
            {"results": [{"predictions": p} for p in results], "model": self._identity(loaded)}
        )

    @app.get("/v1/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.config.models)}

    @app.get("/v1/model")
    async def model_info(self, request: Request, model: str | None = None) -> dict[str, Any]:
        self._authorise(request)
        return (await self._model_for(model)).identity

    @app.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """How well dynamic batching is working: lifetime counts and the latest batch sizes."""
        self._authorise(request)
        sizes = list(self.batch_sizes)
        return {
            "forward_passes": self.forward_passes,
            "images": self.images_forwarded,
            "max_batch": max(sizes, default=0),  # over the latest 1000 forward passes
            "mean_batch": round(float(np.mean(sizes)), 2) if sizes else 0.0,
            "recent": sizes[-50:],
        }

    @staticmethod
    def _identity(loaded: LoadedModel) -> dict[str, Any]:
        keys = ("name", "version", "run_id", "dataset")
        return {k: loaded.identity.get(k) for k in keys}

    def check_health(self) -> None:
        """Serve's health probe: a replica whose model device vanished is restarted."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def build_app(config: ServeConfig) -> serve.Application:
    """The Serve application for `serve.run`, `jobs/serve.py` and `serve deploy`; raises if a
    model reference names no checkpoint or model version (see `check_reference`), or if
    `VITRAY_API_TOKEN` is set but empty. Replicas get the token's digest, never the token."""
    config = replace(
        config, models={name: check_reference(ref) for name, ref in config.models.items()}
    )
    token = api_token()
    actor_options: dict[str, Any] = {
        "num_cpus": config.num_cpus,
        "num_gpus": int(config.use_gpu),
        "runtime_env": {"env_vars": replica_env(config)},
    }
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": actor_options,
        "health_check_period_s": 10,
    }
    if config.num_replicas == "auto":
        options["autoscaling_config"] = {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = config.num_replicas
    return ViTService.options(**options).bind(
        config, token_digest(token) if token is not None else None
    )


def replica_env(config: ServeConfig) -> dict[str, str]:
    """Environment variables the replicas get from the deploying process: its tracking server
    (for registry URIs; checkpoint folders alone need none) and model cache setting.

    Never the bearer token: a runtime_env is shown to anyone who can open the Ray dashboard.
    Replicas get its digest as an argument instead (see `build_app`).
    """
    env = {}
    if any(reference.startswith(REGISTRY_PREFIX) for reference in config.models.values()):
        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    if MODEL_CACHE_ENV in os.environ:
        env[MODEL_CACHE_ENV] = os.environ[MODEL_CACHE_ENV]
    return env


def deploy(config: ServeConfig) -> str:
    """Start Serve's HTTP proxy where the config says and (re)deploy the app; returns its URL.

    Raises ValueError, before touching any application, when Serve already runs in this Ray
    cluster on another host or port: Serve keeps the ones it started with and would only log
    that the new ones are ignored, so the URL returned would be wrong (and a loopback-only
    request could end up listening on every interface).
    """
    serve.start(http_options={"host": config.host, "port": config.port})
    running = serve.context._get_global_client().http_config
    if (running.host, running.port) != (config.host, config.port):
        raise ValueError(
            f"Serve already listens on {running.host}:{running.port} in this Ray cluster, not "
            f"{config.host}:{config.port}: use those, or stop it first (`serve shutdown`)"
        )
    serve.run(build_app(config), name=APP_NAME, route_prefix=config.route_prefix)
    return f"http://{config.host}:{config.port}"


def undeploy() -> None:
    """Delete the vitray app and no other. Serve itself stops only when no application is left,
    so the next deploy can choose its own host and port (Serve keeps the first ones it got)."""
    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serve deploy configs/serve.yaml` (its `args` are ServeConfig fields)."""
    return build_app(ServeConfig(**args))


def champions(datasets: list[str]) -> dict[str, str]:
    """Model table serving each dataset's registered champion."""
    names = [tracking.registered_model_name(d) for d in datasets]
    return {name: f"models:/{name}@champion" for name in names}
