"""The HTTP routes through Quart's test client, on a real in-process system (real log, actors)."""

import pytest
import trio

from modelium.api.app import create_app
from modelium.config import Settings
from modelium.system import run_system


@pytest.fixture
async def app(tmp_path, nursery):
    (tmp_path / "models").mkdir()
    settings = Settings(models_dirs=[tmp_path / "models"], db=tmp_path / "log.db", spare_workers=0,
                        cpu_memory="1GiB")
    system = await nursery.start(lambda task_status: run_system(settings, task_status=task_status, serve_api=False))
    app = create_app(system)
    yield app
    nursery.cancel_scope.cancel()


async def post(app, body=None, *, data=None):
    client = app.test_client()
    if data is not None:
        return await client.post("/v1/completions", data=data, headers={"content-type": "application/json"})
    return await client.post("/v1/completions", json=body)


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "x", "prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "x", "prompt": "hi", "seed": 2**64}, 400, "seed"),
    ({"model": "x", "prompt": "hi", "n": 2}, 400, "n=1"),
    ({"model": "x", "prompt": [], "max_tokens": 2}, 400, "empty list"),
    ({"model": "x", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "x", "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ({"model": "", "prompt": "hi"}, 400, "model"),
    ({"model": "nope", "prompt": "hi"}, 404, "'nope' does not exist"),
])
async def test_bad_completion_requests_get_a_reason(app, body, status, needle):
    r = await post(app, body)
    assert r.status_code == status
    err = (await r.get_json())["error"]
    assert needle in err["message"] and err["type"] in ("invalid_request_error", "server_error")


async def test_malformed_bodies(app):
    for data, needle in [(b"[" * 100_000, "nested too deeply"), (b"{", "not valid JSON"), (b"", "empty"),
                         (b"\xff\xfe", "not valid JSON"), (b'"just a string"', "JSON object")]:
        r = await post(app, data=data)
        assert r.status_code == 400, data[:10]
        assert needle in (await r.get_json())["error"]["message"]


async def test_status_routes(app):
    client = app.test_client()
    health = await (await client.get("/health")).get_json()
    assert health["status"] == "ok" and health["devices"]["cpu"]["budget_bytes"] == 2**30
    assert (await (await client.get("/v1/models")).get_json()) == {"object": "list", "data": []}
    r = await client.get("/models/nope")
    assert r.status_code == 404 and (await r.get_json())["error"]["code"] == "model_not_found"
    r = await client.get("/nowhere")
    assert r.status_code == 404 and "error" in await r.get_json()
    r = await client.delete("/v1/completions")
    assert r.status_code == 405 and "error" in await r.get_json()
