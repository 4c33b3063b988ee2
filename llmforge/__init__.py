"""llmforge: the core of the `forge` toolchain (models, checkpoints, the tensor cache, data)."""

__version__ = "0.1.0"
