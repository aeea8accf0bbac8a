"""Asking an OpenAI-compatible chat endpoint for the ``llm`` policy, never for longer than its
``timeout_s``: whatever goes wrong comes back as a :class:`Consultation` with ``error`` set."""

from __future__ import annotations

import httpx
import trio

from modelium.core.policies.llm import SYSTEM_PROMPT, Consultation, prompt_hash


async def ask_llm(policy, prompt: str) -> Consultation:
    """Send ``prompt`` to ``policy.endpoint`` (``/v1/chat/completions`` is appended unless the
    endpoint already names a path ending in ``/completions``)."""
    h = prompt_hash(prompt)
    url = policy.endpoint.rstrip("/")
    if not url.endswith("/completions"):
        url += "/v1/chat/completions"
    body = {"model": policy.model, "temperature": 0, "max_tokens": policy.max_tokens,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]}
    error = f"no answer within {policy.timeout_s:g} s"
    with trio.move_on_after(policy.timeout_s):
        try:
            async with httpx.AsyncClient(timeout=policy.timeout_s) as client:
                r = await client.post(url, json=body)
            if r.status_code != 200:
                return Consultation(prompt_hash=h, error=f"the endpoint answered HTTP {r.status_code}")
            answer = r.json()["choices"][0]["message"]["content"]
            if not isinstance(answer, str):
                return Consultation(prompt_hash=h, error="the endpoint's reply holds no text")
            return Consultation(prompt_hash=h, answer=answer[:4000])
        except httpx.TimeoutException:
            pass
        except httpx.HTTPError as e:
            return Consultation(prompt_hash=h, error=f"the endpoint could not be reached ({type(e).__name__})")
        except (ValueError, KeyError, IndexError, TypeError):
            return Consultation(prompt_hash=h, error="the endpoint's reply is not a chat completion")
    return Consultation(prompt_hash=h, error=error)
