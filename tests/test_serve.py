"""Ray Serve over real HTTP: two registered champions, offline parity, batching, hostile input."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import sklearn.datasets
import torch
from mlflow.exceptions import MlflowException
from PIL import Image
from ray import serve

from jobs import query
from jobs import serve as serve_job
from pipelines import tracking
from pipelines.ingest import image_to_tokens
from pipelines.serve import (
    TOKEN_ENV,
    ServeConfig,
    build_app,
    deploy,
    model_cache_dir,
    replica_env,
    resolve_model,
)
from vit import VisionTransformer, ViTConfig
from vit import checkpoint as vit_checkpoint
from vit.analysis import attention_rollout_map

TUXPAINT = Path("/usr/share/tuxpaint/stamps")
TUX_CLASSES = ["animals", "food", "household", "plants", "town", "vehicles"]


def real_images() -> list[bytes]:
    """Real photos: scikit-learn's two sample JPEGs and a few Tux Paint PNG stamps."""
    folder = Path(sklearn.datasets.__file__).parent / "images"
    images = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]
    stamps = sorted(TUXPAINT.glob("*/**/*.png"))[:4] if TUXPAINT.exists() else []
    return images + [p.read_bytes() for p in stamps]


def register(tmp: Path, name: str, config: ViTConfig, classes: list[str], seed: int) -> None:
    torch.manual_seed(seed)
    model = VisionTransformer(config)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would tie every score
    directory = tmp / name
    vit_checkpoint.save(model, directory, class_names=classes, provenance={"dataset": name})
    run_id = tracking.start_run(f"register-{name}")
    tracking.client().log_artifacts(run_id, str(directory), "checkpoint")
    tracking.register_model(f"vit-{name}", run_id, "checkpoint", {}, alias="champion")


SERVE_CONFIG = ServeConfig(
    models={"vit-tux": "models:/vit-tux@champion", "vit-digits": "models:/vit-digits@champion"},
    default_model="vit-tux",
    max_body_bytes=2 * 2**20,
    max_image_pixels=4_000_000,
    batch_wait_timeout_s=0.05,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(
    ray_local: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setenv("VITRAY_MODEL_CACHE", str(tmp / "cache"))
        small = dict(width=32, depth=2, mlp_dim=64, num_heads=2)
        register(
            tmp,
            "tux",
            ViTConfig(image_size=32, patch_size=8, num_classes=6, **small),
            TUX_CLASSES,
            seed=0,
        )
        register(
            tmp,
            "digits",
            ViTConfig(image_size=8, patch_size=2, num_classes=10, **small),
            [str(i) for i in range(10)],
            seed=1,
        )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(SERVE_CONFIG), name="vitray", route_prefix="/")
        yield f"http://127.0.0.1:{port}", tmp
        # `ray_local` ends the module's Ray and Serve with it; serve.shutdown() would first
        # drain the replicas for Serve's 30 s minimum.


def post(url: str, **kwargs: object) -> requests.Response:
    return requests.post(url, timeout=60, **kwargs)


def test_two_champions_answer_through_one_endpoint(endpoint: tuple[str, Path]) -> None:
    url, _ = endpoint
    image = real_images()[0]
    headers = {"Content-Type": "image/jpeg"}
    response = post(f"{url}/v1/predict?model=vit-tux&top_k=6", data=image, headers=headers)
    assert response.status_code == 200, response.text
    tux = response.json()
    digits = post(f"{url}/v1/predict?model=vit-digits&top_k=3", data=image, headers=headers).json()
    assert sorted(p["label"] for p in tux["predictions"]) == TUX_CLASSES
    assert len(digits["predictions"]) == 3
    assert {p["label"] for p in digits["predictions"]} <= {str(i) for i in range(10)}
    assert tux["model"]["name"] == "vit-tux"
    assert tux["model"]["version"] == "1"
    assert digits["model"]["name"] == "vit-digits"
    info = requests.get(f"{url}/v1/model", params={"model": "vit-digits"}, timeout=30).json()
    assert info["classes"] == [str(i) for i in range(10)]
    assert info["image_size"] == [8, 8]
    assert requests.get(f"{url}/v1/health", timeout=30).json()["status"] == "ok"


def test_http_predictions_equal_the_offline_model(endpoint: tuple[str, Path]) -> None:
    url, tmp = endpoint
    model, meta = vit_checkpoint.load(tmp / "tux")
    model.eval()
    for image in real_images():
        response = post(f"{url}/v1/predict?top_k=6", files={"file": ("x", image)}).json()
        served = {p["label"]: p["score"] for p in response["predictions"]}
        with torch.no_grad():
            tokens = torch.from_numpy(image_to_tokens(image, meta.config)[None])
            offline = model(tokens).softmax(-1)[0]
        for index, label in enumerate(TUX_CLASSES):
            assert served[label] == pytest.approx(float(offline[index]), abs=1e-5)


def test_json_base64_and_batch_requests(endpoint: tuple[str, Path]) -> None:
    url, _ = endpoint
    images = real_images()[:3]
    encoded = [base64.b64encode(i).decode() for i in images]
    single = post(f"{url}/v1/predict", json={"image": encoded[0], "top_k": 2}).json()
    assert len(single["predictions"]) == 2
    wrapped = base64.encodebytes(images[0]).decode()  # 76 columns a line, as `base64` writes
    answer = post(f"{url}/v1/predict", json={"image": wrapped, "top_k": 2})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"] == single["predictions"]
    batch = post(f"{url}/v1/predict/batch", json={"images": encoded, "model": "vit-digits"}).json()
    assert len(batch["results"]) == 3
    assert batch["model"]["name"] == "vit-digits"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    tiny, count = (
        buffer.getvalue(),
        SERVE_CONFIG.max_batch_images + 1,
    )  # small: under the body limit
    files = [("file", (f"{i}.png", tiny)) for i in range(count)]
    for kwargs in (
        dict(json={"images": [base64.b64encode(tiny).decode()] * count}),
        dict(files=files),
    ):
        response = post(f"{url}/v1/predict/batch", **kwargs)
        assert response.status_code == 413, response.text
        assert "exceed the limit" in response.json()["detail"]


def test_concurrent_requests_are_batched(endpoint: tuple[str, Path]) -> None:
    url, _ = endpoint
    image = real_images()[1]
    before = requests.get(f"{url}/v1/stats", timeout=30).json()["forward_passes"]
    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(
            pool.map(
                lambda _: (
                    post(
                        f"{url}/v1/predict", data=image, headers={"Content-Type": "image/jpeg"}
                    ).status_code
                ),
                range(48),
            )
        )
    assert codes == [200] * 48
    stats = requests.get(f"{url}/v1/stats", timeout=30).json()
    during = stats["recent"][-(stats["forward_passes"] - before) :]  # this load's passes
    assert sum(during) == 48
    assert max(during) > 1


def png_bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 100,000 x 100,000 pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # chunk type + 13 bytes of header data
    ihdr[4:12] = struct.pack(">II", 100_000, 100_000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def chunked_multipart(size: int) -> Iterator[bytes]:
    """A multipart upload streamed in chunks: no Content-Length announces its size."""
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
    for _ in range(size // 2**16):
        yield b"\0" * 2**16
    yield b"\r\n--b--\r\n"


def hostile_requests() -> dict[str, tuple[dict, int]]:
    jpeg = real_images()[0]
    encoded = base64.b64encode(jpeg).decode()
    return {
        "empty body": (dict(data=b"", headers={"Content-Type": "image/png"}), 400),
        "not an image": (dict(data=b"hello" * 50, headers={"Content-Type": "image/png"}), 422),
        "truncated": (dict(data=jpeg[:300], headers={"Content-Type": "image/jpeg"}), 422),
        "decompression bomb": (dict(data=png_bomb(), headers={"Content-Type": "image/png"}), 422),
        "oversize body": (
            dict(data=b"\0" * (3 * 2**20), headers={"Content-Type": "image/png"}),
            413,
        ),
        "oversize chunked multipart": (
            dict(
                data=chunked_multipart(3 * 2**20),
                headers={"Content-Type": "multipart/form-data; boundary=b"},
            ),
            413,
        ),
        "unsupported type": (dict(data=b"abc", headers={"Content-Type": "text/plain"}), 415),
        "top_k too large": (
            dict(data=jpeg, headers={"Content-Type": "image/jpeg"}, params={"top_k": 99}),
            422,
        ),
        "top_k zero": (
            dict(data=jpeg, headers={"Content-Type": "image/jpeg"}, params={"top_k": 0}),
            422,
        ),
        "malformed json": (
            dict(data=b"{not json", headers={"Content-Type": "application/json"}),
            400,
        ),
        "bad base64": (dict(json={"image": "***not base64***"}), 400),
        "json integer of 5,000 digits": (
            dict(
                data=b'{"image": "' + encoded.encode() + b'", "top_k": ' + b"7" * 5000 + b"}",
                headers={"Content-Type": "application/json"},
            ),
            400,
        ),
        "json nested too deeply": (
            dict(data=b"[" * 100_000, headers={"Content-Type": "application/json"}),
            400,
        ),
        "images not a list": (dict(json={"images": 5}), 400),
        "model not a string": (dict(json={"image": encoded, "model": ["vit-tux"]}), 422),
        "top_k a fraction": (dict(json={"image": encoded, "top_k": 2.5}), 422),
        "top_k a boolean": (dict(json={"image": encoded, "top_k": True}), 422),
        "top_k not a number": (
            dict(data=jpeg, headers={"Content-Type": "image/jpeg"}, params={"top_k": "+-5"}),
            422,
        ),
        "attention not a boolean": (
            dict(data=jpeg, headers={"Content-Type": "image/jpeg"}, params={"attention": "maybe"}),
            422,
        ),
        "unknown model": (
            dict(data=jpeg, headers={"Content-Type": "image/jpeg"}, params={"model": "nope"}),
            404,
        ),
    }


@pytest.mark.parametrize("case", list(hostile_requests()))
def test_hostile_input_gets_a_4xx_with_a_reason_and_the_next_request_works(
    endpoint: tuple[str, Path], case: str
) -> None:
    url, _ = endpoint
    kwargs, status = hostile_requests()[case]
    response = post(f"{url}/v1/predict", **kwargs)
    assert response.status_code == status, response.text
    assert json.loads(response.text)["detail"]
    good = post(
        f"{url}/v1/predict",
        data=real_images()[0],
        headers={"Content-Type": "image/jpeg"},
        params={"top_k": 6},
    )
    assert good.status_code == 200
    assert np.isclose(sum(p["score"] for p in good.json()["predictions"]), 1.0, atol=1e-4)


def test_query_client_prints_the_table_and_fails_with_the_reason(
    endpoint: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = endpoint
    good, misnamed = tmp_path / "photo.jpg", tmp_path / "photo.txt"  # the bytes tell the type
    for path in (good, misnamed):
        path.write_bytes(real_images()[0])
    argv = [str(good), str(misnamed), "--url", url, "--model", "vit-tux", "--top-k", "2"]
    assert query.main(argv) == 0
    out = capsys.readouterr().out
    assert "vit-tux v1" in out
    assert out.count("\n  ") == 4
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert query.main([str(bad), "--url", url]) == 1
    assert "HTTP 422" in capsys.readouterr().err


def test_a_token_protects_predictions_and_stats(
    endpoint: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = endpoint
    monkeypatch.setenv(TOKEN_ENV, "")
    with pytest.raises(ValueError, match="set but empty"):
        build_app(SERVE_CONFIG)  # an empty token must not mean "no token"
    monkeypatch.setenv(TOKEN_ENV, "s3cret\n")  # as `$(cat token-file)` may leave it
    secured = replace(SERVE_CONFIG, num_cpus=0)  # beside the main app on the 2 test CPUs
    serve.run(build_app(secured), name="vitray-token", route_prefix="/secure")
    try:
        image = dict(data=real_images()[0], headers={"Content-Type": "image/jpeg"})
        refused = post(f"{url}/secure/v1/predict", **image)
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"  # RFC 6750: names the scheme
        wrong = {"Authorization": "Bearer nope", "Content-Type": "image/jpeg"}
        assert (
            post(f"{url}/secure/v1/predict", data=image["data"], headers=wrong).status_code == 401
        )
        assert requests.get(f"{url}/secure/v1/stats", timeout=30).status_code == 401
        assert requests.get(f"{url}/secure/v1/health", timeout=30).status_code == 200
        for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 7235)
            right = {"Authorization": f"{scheme} s3cret", "Content-Type": "image/jpeg"}
            answer = post(f"{url}/secure/v1/predict", data=image["data"], headers=right)
            assert answer.status_code == 200, answer.text
    finally:
        serve.delete("vitray-token")


def test_replicas_never_receive_the_token_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Their runtime_env is on show in the Ray dashboard: it carries the tracking server and the
    model cache, and the replicas compare digests of the token (see the test above)."""
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("VITRAY_MODEL_CACHE", str(tmp_path / "cache"))
    assert replica_env(SERVE_CONFIG) == {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "VITRAY_MODEL_CACHE": str(tmp_path / "cache"),
    }


def test_deploy_refuses_a_port_serve_does_not_listen_on(endpoint: tuple[str, Path]) -> None:
    """Serve keeps the host and port it started with: another port is refused, not a URL that
    points nowhere."""
    url, _ = endpoint
    port = url.rsplit(":", 1)[1]
    with pytest.raises(ValueError, match=f"already listens on 127.0.0.1:{port}"):
        deploy(replace(SERVE_CONFIG, port=free_port()))


def test_a_cached_model_is_never_another_registry_s_same_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions restart at 1 in every MLflow database; the cache must tell them apart."""
    config = ViTConfig(image_size=8, patch_size=2, num_classes=10, width=32, depth=2,
                       mlp_dim=64, num_heads=2)  # fmt: skip
    heads = []
    monkeypatch.setenv("VITRAY_MODEL_CACHE", str(tmp_path / "cache"))  # one cache, two stores
    for registry, seed in (("first", 0), ("second", 1)):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / registry}.db")
        register(tmp_path / registry, "digits", config, [str(i) for i in range(10)], seed=seed)
        directory, identity = resolve_model("models:/vit-digits@champion")
        assert identity["version"] == "1"
        heads.append(vit_checkpoint.load(directory)[0].head.weight)
    assert not torch.equal(heads[0], heads[1])


def test_attention_rollout_comes_back_and_matches_the_offline_map(
    endpoint: tuple[str, Path],
) -> None:
    url, tmp = endpoint
    image = real_images()[0]
    params = {"model": "vit-tux", "attention": "true"}
    response = post(
        f"{url}/v1/predict", data=image, headers={"Content-Type": "image/jpeg"}, params=params
    )
    assert response.status_code == 200, response.text
    attention = response.json()["attention"]
    assert attention["method"] == "rollout" and attention["grid"] == [4, 4]
    model, meta = vit_checkpoint.load(tmp / "tux")
    tokens = torch.from_numpy(image_to_tokens(image, meta.config)[None])
    offline = attention_rollout_map(model.eval(), tokens)[0]
    np.testing.assert_allclose(np.array(attention["map"]), offline.numpy(), atol=1e-4)
    plain = post(f"{url}/v1/predict", data=image, headers={"Content-Type": "image/jpeg"})
    assert "attention" not in plain.json()


def test_redeploy_after_the_alias_moves_serves_the_new_version_without_failed_requests(
    endpoint: tuple[str, Path],
) -> None:
    """Load keeps flowing while Serve replaces the replica; the answers switch to version 2.
    Until then the deployed version is served, also by a replica that loads it only after the
    alias moved."""
    url, tmp = endpoint
    small = dict(width=32, depth=2, mlp_dim=64, num_heads=2)
    image = real_images()[1]
    target = f"{url}/v1/predict?model=vit-digits"
    before = post(target, data=image, headers={"Content-Type": "image/jpeg"}).json()
    assert before["model"]["version"] == "1"
    pinned = replace(SERVE_CONFIG, num_cpus=0)  # beside the main app on the 2 test CPUs
    serve.run(build_app(pinned), name="vitray-pinned", route_prefix="/pinned")
    register(tmp, "digits", ViTConfig(image_size=8, patch_size=2, num_classes=10, **small),
             [str(i) for i in range(10)], seed=7)  # fmt: skip
    try:
        late = post(f"{url}/pinned/v1/predict?model=vit-digits", data=image,
                    headers={"Content-Type": "image/jpeg"})  # fmt: skip
        assert late.json()["model"]["version"] == "1", late.text
    finally:
        serve.delete("vitray-pinned")
    stop = threading.Event()

    def hammer() -> list[tuple[int, str | None]]:
        seen = []
        while not stop.is_set():
            reply = post(target, data=image, headers={"Content-Type": "image/jpeg"})
            version = reply.json()["model"]["version"] if reply.status_code == 200 else None
            seen.append((reply.status_code, version))
        return seen

    with ThreadPoolExecutor(max_workers=4) as pool:
        clients = [pool.submit(hammer) for _ in range(4)]
        serve.run(build_app(SERVE_CONFIG), name="vitray", route_prefix="/")  # rolling update
        after = post(target, data=image, headers={"Content-Type": "image/jpeg"}).json()
        stop.set()
        seen = [item for client in clients for item in client.result()]
    assert after["model"]["version"] == "2"
    assert len(seen) > 10
    assert {code for code, _ in seen} == {200}
    assert {version for _, version in seen} <= {"1", "2"}


def test_a_model_whose_checkpoint_vanished_gets_a_503_with_the_reason(
    endpoint: tuple[str, Path],
) -> None:
    url, tmp = endpoint
    checkpoint = shutil.copytree(tmp / "tux", tmp / "soon-gone")
    config = replace(SERVE_CONFIG, models={"vit-gone": str(checkpoint)}, default_model="vit-gone")
    serve.run(build_app(replace(config, num_cpus=0)), name="vitray-gone", route_prefix="/gone")
    try:
        shutil.rmtree(checkpoint)  # after the replica checked it, before its first request
        image = dict(data=real_images()[0], headers={"Content-Type": "image/jpeg"})
        response = post(f"{url}/gone/v1/predict", **image)
        assert response.status_code == 503, response.text
        assert "vit-gone" in response.json()["detail"]
        assert requests.get(f"{url}/gone/v1/health", timeout=30).status_code == 200
    finally:
        serve.delete("vitray-gone")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
        ({"max_top_k": -1}, "max_top_k must be at least 1"),
        ({"batch_wait_timeout_s": -0.1}, "batch_wait_timeout_s"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas 3 > max_replicas 2"),
        ({"num_replicas": 0}, "num_replicas must be 'auto' or at least 1"),
        ({"port": 80000}, "port must be at most 65535"),
        (
            {"models": {"vit-tux": "models:/vit-tux@champion"}, "default_model": "vit-tuxx"},
            r"default_model 'vit-tuxx' is not one of the models \['vit-tux'\]",
        ),
    ],
)
def test_settings_that_cannot_serve_are_refused_up_front(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServeConfig(**settings)


def test_checkpoints_served_from_a_submitted_job_need_no_tracking_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only registry models need MLflow. A job submitted with a working_dir, where the default
    store is refused, still serves checkpoint folders."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))  # as Ray's job supervisor
    config = ViTConfig(image_size=8, patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2)
    directory = vit_checkpoint.save(VisionTransformer(config), tmp_path / "model")
    app = build_app(ServeConfig(models={"vit-x": str(directory)}, default_model="vit-x"))
    assert isinstance(app, serve.Application)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("reference", "error", "message"),
    [
        ("no-such-checkpoint", vit_checkpoint.CheckpointError, "no-such-checkpoint does not exist"),
        ("models:/vit-nothing@champion", MlflowException, "vit-nothing"),
        ("models:/vit-nothing", ValueError, "expected models:/NAME@ALIAS"),
    ],
)
def test_a_bad_model_reference_is_refused_before_serve_sees_the_app(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reference: str,
    error: type[Exception],
    message: str,
) -> None:
    """A mistyped path or a missing alias fails the deploy; Serve would stop the old replica
    first, and the endpoint would be down."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        build_app(ServeConfig(models={"vit-x": reference}, default_model="vit-x"))


def test_the_serve_job_refuses_a_bad_model_reference_with_the_reason(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped path or a dataset without a champion: exit 1 with the reason, no traceback."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for argv, reason in (
        (["--model", f"vit-x={tmp_path / 'no-such-checkpoint'}"], "no-such-checkpoint does not"),
        (["--datasets", "nothing-here"], "vit-nothing-here"),
    ):
        with pytest.raises(SystemExit, match=reason) as exit_:
            serve_job.main(argv)
        assert str(exit_.value).startswith("[serve] cannot serve")


def test_the_serve_job_refuses_an_empty_token_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`$(cat missing-file)` must not mean "no token", nor be found only once Serve runs."""
    monkeypatch.setenv(TOKEN_ENV, "")

    def connect(address: str | None) -> bool:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(serve_job, "connect", connect)
    with pytest.raises(SystemExit, match=rf"^\[serve\] {TOKEN_ENV} is set but empty"):
        serve_job.main(["--model", f"vit-x={tmp_path / 'checkpoint'}"])


def test_the_model_cache_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas load what they find in the cache: nobody else may write there."""
    (tmp_path / "made-with-mkdir-p").mkdir(mode=0o755)
    for name in ("fresh", "made-with-mkdir-p"):
        monkeypatch.setenv("VITRAY_MODEL_CACHE", str(tmp_path / name))
        assert model_cache_dir().stat().st_mode & 0o777 == 0o700
    if os.getuid() == 0:  # only root can hand a folder to another user
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        monkeypatch.setenv("VITRAY_MODEL_CACHE", str(foreign))
        with pytest.raises(PermissionError, match="belongs to another user"):
            model_cache_dir()


def test_an_empty_model_cache_setting_is_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`VITRAY_MODEL_CACHE=` means the default cache, not `.` (chmod 700, models dumped in it)."""
    tmp_path.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VITRAY_MODEL_CACHE", "")
    assert model_cache_dir().resolve() != tmp_path
    assert tmp_path.stat().st_mode & 0o777 == 0o755


def test_the_default_top_k_fits_a_model_with_fewer_classes(
    endpoint: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request without top_k gets every class of a three-class model, not a 422. The client
    leaves top_k to the server unless told, reaches /v1/predict through a URL with a trailing
    slash, and shows no version for a model served from a checkpoint directory."""
    url, tmp = endpoint
    config = ViTConfig(image_size=8, patch_size=2, num_classes=3, width=32, depth=2,
                       mlp_dim=64, num_heads=2)  # fmt: skip
    vit_checkpoint.save(VisionTransformer(config), tmp / "three", class_names=["a", "b", "c"])
    models = {"vit-three": str(tmp / "three")}
    three = replace(SERVE_CONFIG, models=models, default_model="vit-three", num_cpus=0)
    serve.run(build_app(three), name="vitray-three", route_prefix="/three")
    try:
        image = dict(data=real_images()[0], headers={"Content-Type": "image/jpeg"})
        response = post(f"{url}/three/v1/predict", **image)
        assert response.status_code == 200, response.text
        assert sorted(p["label"] for p in response.json()["predictions"]) == ["a", "b", "c"]
        assert post(f"{url}/three/v1/predict", params={"top_k": 4}, **image).status_code == 422
        photo = tmp_path / "photo.jpg"
        photo.write_bytes(real_images()[0])
        for top_k, rows in (([], 3), (["--top-k", "2"], 2)):
            assert query.main([str(photo), "--url", f"{url}/three/", *top_k]) == 0
            out = capsys.readouterr().out
            assert "(vit-three, " in out and "None" not in out and out.count("\n  ") == rows
    finally:
        serve.delete("vitray-three")


@pytest.mark.parametrize("value", ["true", "maybe"])
def test_the_batch_route_refuses_attention_instead_of_ignoring_it(
    endpoint: tuple[str, Path], value: str
) -> None:
    url, _ = endpoint
    response = post(
        f"{url}/v1/predict/batch",
        data=real_images()[0],
        headers={"Content-Type": "image/jpeg"},
        params={"attention": value},
    )
    assert response.status_code == 422, response.text
    assert "attention" in response.json()["detail"]


def test_query_client_reports_a_model_name_it_cannot_send(
    endpoint: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """HTTP headers carry Latin-1 only: a reason and exit 1, not a traceback."""
    url, _ = endpoint
    image = tmp_path / "photo.jpg"
    image.write_bytes(real_images()[0])
    assert query.main([str(image), "--url", url, "--model", "модель"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"{image}: ") and "'latin-1' codec can't encode" in error
