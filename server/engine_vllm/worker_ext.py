"""vLLM worker extension whose import registers the svda plugin in the worker process.

The engine passes ``worker_extension_cls="svda.server.engine_vllm.worker_ext.SvdaWorkerExtension"``
to vLLM: each worker imports this module (so :func:`.plugin.register` runs there) before it builds
the model and its LoRA layers. This does not depend on the ``vllm.general_plugins`` entry point
being installed (an editable install's metadata can lag behind pyproject.toml).
"""

from __future__ import annotations

from .plugin import register

register(force=True)  # only svda's engine names this extension


class SvdaWorkerExtension:
    """No methods: importing this class's module is the point."""
