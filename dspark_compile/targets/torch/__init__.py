"""The torch target: the grafted program run by PyTorch as CUDA graphs over static caches (`CudaGraphBackend`),
falling back to the eager reference backend on machines without CUDA, plus its GPU benchmark (`bench`)."""

from dspark_compile.targets.torch.cuda_graph_backend import (
    CudaGraphBackend,
    attention_window,
    batch_bucket,
    slot_capacity,
)

__all__ = ["CudaGraphBackend", "attention_window", "batch_bucket", "slot_capacity"]
