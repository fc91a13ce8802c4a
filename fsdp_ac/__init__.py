"""fsdp_ac: activation checkpointing and offloading for PyTorch distributed training.

A drop-in for ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper`` whose wrapped models
keep the names, state dicts and optimizer ``param_names`` of the unwrapped model.

Example:
    >>> from fsdp_ac import apply_activation_checkpointing, checkpoint_wrapper
"""

from fsdp_ac.apply import apply_activation_checkpointing, remove_activation_checkpointing
from fsdp_ac.memory import ActivationMemoryMeter
from fsdp_ac.names import clean_name, clean_state_dict, unwrap
from fsdp_ac.plan import ActivationPlan
from fsdp_ac.policies import ModulePolicy, check_alignment, fully_shard_by_policy
from fsdp_ac.recompute import is_recomputing, replay_hook
from fsdp_ac.selective import SelectiveCheckpoint
from fsdp_ac.wrappers import (
    ActivationWrapper,
    CheckpointImpl,
    CheckpointWrapper,
    OffloadWrapper,
    checkpoint_wrapper,
    offload_wrapper,
)

__all__ = [
    "ActivationMemoryMeter",
    "ActivationPlan",
    "ActivationWrapper",
    "CheckpointImpl",
    "CheckpointWrapper",
    "ModulePolicy",
    "OffloadWrapper",
    "SelectiveCheckpoint",
    "apply_activation_checkpointing",
    "check_alignment",
    "checkpoint_wrapper",
    "clean_name",
    "clean_state_dict",
    "fully_shard_by_policy",
    "is_recomputing",
    "offload_wrapper",
    "remove_activation_checkpointing",
    "replay_hook",
    "unwrap",
]

__version__ = "0.1.0"
