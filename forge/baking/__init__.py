"""forge.baking: Prompt Baking (Bhargava et al. 2024, arXiv 2409.13697) with peft LoRA on forge's Transformer."""
from forge.baking.baker import BakeResult, PromptBaker, Prompted, reprompt, trajectory_kl
from forge.baking.lora import DEFAULT_TARGET_MODULES, interpolate, lora_config, merge_lora, wrap_lora
from forge.baking.prompts import PROMPTS, BakingPrompt, get_prompt, prompts_for_phase
from forge.baking.trajectory import Trajectories, prefix_cache, sample_trajectories

__all__ = [
    "BakeResult",
    "BakingPrompt",
    "PROMPTS",
    "DEFAULT_TARGET_MODULES",
    "PromptBaker",
    "Prompted",
    "Trajectories",
    "get_prompt",
    "interpolate",
    "lora_config",
    "merge_lora",
    "prefix_cache",
    "prompts_for_phase",
    "reprompt",
    "sample_trajectories",
    "trajectory_kl",
    "wrap_lora",
]
