"""forge.ops: the public kernel API. Every op has a plain-PyTorch reference and backend dispatch."""
from forge.ops._dispatch import (
    BackendUnavailableError,
    available_backends,
    backend_matrix_markdown,
    last_backend,
)
from forge.ops.bitnet import (
    act_quant_int8,
    pack_ternary,
    ste_act_int8,
    ste_ternary,
    ternary_linear,
    ternary_quant,
    unpack_ternary,
)
from forge.ops.fused_linear_kl import fused_linear_kl
from forge.ops.grokfast import grokfast_ema_, grokfast_ema_reference, grokfast_ma_, grokfast_ma_reference
from forge.ops.kl_div import kl_div_logits, kl_div_logits_reference
from forge.ops.newton_schulz import newton_schulz, newton_schulz_reference
from forge.ops.seedlm import seedlm_decode, seedlm_linear, seedlm_search
from forge.ops.vq import vq_decode, vq_linear

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_matrix_markdown",
    "last_backend",
    "newton_schulz",
    "newton_schulz_reference",
    "grokfast_ema_",
    "grokfast_ema_reference",
    "grokfast_ma_",
    "grokfast_ma_reference",
    "act_quant_int8",
    "pack_ternary",
    "ste_act_int8",
    "ste_ternary",
    "ternary_linear",
    "ternary_quant",
    "unpack_ternary",
    "kl_div_logits",
    "kl_div_logits_reference",
    "fused_linear_kl",
    "seedlm_search",
    "seedlm_decode",
    "seedlm_linear",
    "vq_decode",
    "vq_linear",
]
