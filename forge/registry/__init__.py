"""SQLite model registry and verified safetensors checkpoints."""
from forge.registry.checkpoint import (CheckpointFormatError, CheckpointInfo, ChecksumError, file_sha256,
                                       load_checkpoint, save_checkpoint)
from forge.registry.cleanup import CleanupPolicy
from forge.registry.registry import ModelRegistry, new_session_id, safe_name, utc_now
from forge.registry.schema import SCHEMA_VERSION, RegistryBusyError, RegistryFileError, RegistryIOError

__all__ = ["CheckpointFormatError", "CheckpointInfo", "ChecksumError", "CleanupPolicy", "ModelRegistry",
           "RegistryBusyError", "RegistryFileError", "RegistryIOError",
           "SCHEMA_VERSION", "file_sha256", "load_checkpoint",
           "new_session_id", "safe_name", "save_checkpoint", "utc_now"]
