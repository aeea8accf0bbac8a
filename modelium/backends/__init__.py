"""How models run. ``backend_class(name)`` is the backend ``spec.backend`` names."""

from __future__ import annotations

from typing import Any

# name -> "module:Class"; imported on first use (a backend may need packages others do not)
BACKENDS = {"transformers": "modelium.backends.hf:HFBackend", "vllm": "modelium.backends.vllm:VLLMBackend"}


def backend_class(name: str) -> Any:
    """The backend class called ``name``; KeyError when Modelium has no such backend."""
    import importlib

    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
