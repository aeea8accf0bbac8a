"""The pure layer: Modelium's vocabulary and rules. Nothing here does I/O, imports trio, sqlite,
HTTP or torch, or reads a clock; the live actors and offline replay call the same functions."""
