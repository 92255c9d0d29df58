"""TensorRT-LLM's Mixtral with plateforme's MoE plugins in its MoE layers.

trtllm-build loads it by path: ``trtllm-build ... --model_cls_file <this file> --model_cls_name
PlateformeMixtralForCausalLM`` (``moe_plugin.custom_moe_build_args`` gives the arguments). It needs
tensorrt_llm, TensorRT >= 10.9 and plateforme installed in trtllm-build's environment. Router,
``mlp.fc`` and ``mlp.proj`` weights load exactly as for TensorRT-LLM's own Mixtral; only the layer's
expert computation changes. Block sizes are chosen for ``config.plateforme_moe_config_tokens``
tokens (a checkpoint config.json key; default 16, decode batches).
"""
from plateforme.builders.moe_plugin import (
    MoePluginError,
    MoePluginFields,
    MoePluginUnavailable,
)

try:
    from tensorrt_llm._common import default_trtnet
    from tensorrt_llm._utils import trt_dtype_to_str
    from tensorrt_llm.functional import _create_tensor, allreduce
    from tensorrt_llm.layers.moe import MixtureOfExperts
    from tensorrt_llm.models import LLaMAForCausalLM
except ImportError as e:
    raise MoePluginUnavailable(f"the custom MoE plugin's model class needs tensorrt_llm: {e}") from None

from plateforme.builders.moe_plugin_trt import add_moe_layers, register_plugins

register_plugins()

DEFAULT_CONFIG_TOKENS = MoePluginFields.__dataclass_fields__["config_tokens"].default


class PlateformeMoe(MixtureOfExperts):
    """TensorRT-LLM's MoE layer computing its experts with plateforme's plugins (``finished``, used
    by TensorRT-LLM's plugin to skip finished beams, is not needed: every token is computed)."""

    plateforme_config_tokens = DEFAULT_CONFIG_TOKENS

    def forward_experts(self, hidden_states, routing, finished, lora_layer_params, reduce_fusion_params=None):
        if lora_layer_params is not None:
            raise MoePluginError("the custom MoE plugin does not apply LoRA to experts")
        if self.quant_mode.has_any_quant():
            raise MoePluginError("the custom MoE plugin runs unquantized experts only")
        if self.bias:
            raise MoePluginError("the custom MoE plugin has no expert biases (Mixtral has none)")
        if hidden_states.ndim() != 2:
            raise MoePluginError("the custom MoE plugin needs packed tokens: build with --remove_input_padding enable")
        fields = MoePluginFields(
            num_experts=self.num_experts,
            top_k=self.top_k,
            normalization_mode=int(self.moe_config.normalization_mode),
            dtype=self.dtype if isinstance(self.dtype, str) else trt_dtype_to_str(self.dtype),
            hidden_size=self.hidden_size,
            inter_size=self.expert_inter_size,
            ep_size=self.mapping.moe_ep_size,
            ep_rank=self.mapping.moe_ep_rank,
            config_tokens=self.plateforme_config_tokens,
        )
        layer = add_moe_layers(
            default_trtnet(),
            hidden_states.trt_tensor,
            routing.trt_tensor,
            self.fc.weight.value.trt_tensor,
            self.proj.weight.value.trt_tensor,
            fields,
        )
        output = _create_tensor(layer.get_output(0), layer)
        # TensorRT-LLM versions without forward_allreduce reduce inside forward_experts.
        if not hasattr(MixtureOfExperts, "forward_allreduce") and self.tp_size > 1 and self.tp_group is not None:
            output = allreduce(output, self.tp_group, reduce_fusion_params=reduce_fusion_params)
        return output


class PlateformeMixtralForCausalLM(LLaMAForCausalLM):
    """TensorRT-LLM's Mixtral (its LLaMAForCausalLM) whose MoE layers are ``PlateformeMoe``."""

    def __init__(self, config):
        super().__init__(config)
        tokens = getattr(config, "plateforme_moe_config_tokens", DEFAULT_CONFIG_TOKENS)
        for layer in self.transformer.layers:
            if type(layer.mlp) is MixtureOfExperts:
                # Same parameters and attributes, our forward_experts.
                layer.mlp.__class__ = PlateformeMoe
                layer.mlp.plateforme_config_tokens = tokens
