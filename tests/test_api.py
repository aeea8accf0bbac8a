"""The HTTP routes through Quart's test client, on a real in-process system (real log, actors):
every refusal that needs no model to be loaded, each with OpenAI's error body naming the
parameter at fault."""

import pytest


CASES = [
    # route, body, status, param, needle
    ("/v1/completions", {"model": "gen", "prompt": "hi", "max_tokens": True}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "seed": 2**64}, 400, "seed", "seed"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/completions", {"model": "gen", "prompt": [], "max_tokens": 2}, 400, "prompt", "empty list"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "4"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "temperature": 3}, 400, "temperature", "2"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "logprobs": 2}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "best_of": 3}, 400, "best_of", "not supported"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "suffix": "x"}, 400, "suffix", "not supported"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias", "token ids"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "logit_bias": {"5": 300}}, 400, "logit_bias", "-100"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty", "2"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream: true"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "top_k": 5}, 400, "top_k", "Extra inputs"),
    ("/v1/completions", {"model": "gen", "prompt": [1, "a"]}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": "gen", "prompt": [2**64]}, 400, "prompt", "below 2**31"),
    ("/v1/completions", {"model": "gen", "prompt": [[5], [-1]]}, 400, "prompt", "non-negative"),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "logit_bias": {str(10**20): 1}}, 400, "logit_bias",
     "token ids"),
    ("/v1/embeddings", {"model": "emb", "input": [[1, 10**20]]}, 400, "input", "below 2**31"),
    ("/v1/completions", {"model": "", "prompt": "hi"}, 400, "model", "at least 1"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model", "'nope' does not exist"),
    ("/v1/completions", {"model": "emb", "prompt": "hi"}, 400, "model", "embedding model"),
    ("/v1/completions", {"model": "small", "prompt": "x" * 1000}, 413, "prompt", "context is 64 tokens"),
    ("/v1/completions", {"model": "small", "prompt": "hi", "max_tokens": 100}, 400, "max_tokens", "context"),
    ("/v1/chat/completions", {"model": "gen", "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "hi"}]}, 400, "model",
     "no chat template"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages.0.role", "not supported"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content.0", "only text"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format", "text"),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "hi"}], "logprobs": True},
     400, "logprobs", "not supported"),
    ("/v1/embeddings", {"model": "emb", "input": []}, 400, "input", "empty"),
    ("/v1/embeddings", {"model": "emb", "input": "x", "encoding_format": "int8"}, 400, "encoding_format", "float"),
    ("/v1/embeddings", {"model": "gen", "input": "x"}, 400, "model", "text-generation model"),
    ("/v1/classify", {"model": "emb", "input": "x"}, 400, "model", "embedding model"),
    ("/classify", {"model": "gen", "input": ["a", 3]}, 400, "input", "valid string"),
    ("/predict/gen", {"prompt": "x", "input": "y"}, 400, None, "exactly one of prompt, messages or input"),
    ("/predict/gen", {"prompt": "x", "organizationId": 5}, 400, "organizationId", "string"),
    ("/predict/emb", {"prompt": "x"}, 400, "input", "send 'input'"),
]


@pytest.mark.parametrize("route, body, status, param, needle", CASES)
async def test_refusals_name_their_reason_and_parameter(app, route, body, status, param, needle):
    r = await app.test_client().post(route, json=body)
    assert r.status_code == status, await r.get_data()
    err = (await r.get_json())["error"]
    assert needle in err["message"], err
    assert err["param"] == param or (param is None), err
    assert err["type"] == "invalid_request_error" and err["code"]


async def test_malformed_bodies(app):
    client = app.test_client()
    for data, needle in [(b"[" * 100_000, "nested too deeply"), (b"{", "not valid JSON"), (b"", "empty"),
                         (b"\xff\xfe", "not valid JSON"), (b'"just a string"', "JSON object")]:
        r = await client.post("/v1/completions", data=data, headers={"content-type": "application/json"})
        assert r.status_code == 400, data[:10]
        assert needle in (await r.get_json())["error"]["message"]


async def test_status_routes(app):
    client = app.test_client()
    health = await (await client.get("/health")).get_json()
    assert health["status"] == "ok" and health["devices"]["cpu"]["budget_bytes"] == 2**30
    models = (await (await client.get("/v1/models")).get_json())["data"]
    assert [m["id"] for m in models] == ["emb", "gen", "small"]
    assert all(m["object"] == "model" and m["owned_by"] == "modelium" for m in models)
    assert models[0]["modelium"] == {"task": "embedding", "state": "discovered", "device": None, "reason": None}
    one = await (await client.get("/v1/models/gen")).get_json()
    assert one["id"] == "gen" and one["modelium"]["task"] == "text-generation"
    r = await client.get("/v1/models/nope")
    assert r.status_code == 404 and (await r.get_json())["error"]["code"] == "model_not_found"
    status = await (await client.get("/status")).get_json()
    assert status["server"]["state"] == "serving" and status["devices"]["cpu"]["budget_bytes"] == 2**30
    assert status["devices"]["cpu"]["reserved_bytes"] == 0
    assert {m["name"]: (m["queued"], m["inflight"]) for m in status["models"]} == {
        "emb": (0, 0), "gen": (0, 0), "small": (0, 0)}
    r = await client.get("/models/nope")
    assert r.status_code == 404 and (await r.get_json())["error"]["code"] == "model_not_found"
    r = await client.get("/nowhere")
    assert r.status_code == 404 and "error" in await r.get_json()
    r = await client.delete("/v1/completions")
    assert r.status_code == 405 and "error" in await r.get_json()
