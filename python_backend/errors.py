"""Errors shared by the runtime library and the Triton models (kept free of heavy imports)."""


class EngineBusy(RuntimeError):
    """The engine cannot take the request now (queue full, queue time limit): retry later."""
