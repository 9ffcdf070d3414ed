"""Imported at interpreter start by bench/run.py's "_gpu_gib" variants (this folder is put first on PYTHONPATH):
cap this process's GPU memory with torch.cuda.set_per_process_memory_fraction, to measure a 24 GB-class card on a
larger one. The job's sizing sees the cap (job.speed.free_gpu_bytes). Starts CUDA early; for the benchmark only."""

import os

if os.environ.get("BENCH_GPU_GIB"):
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(os.environ["BENCH_GPU_GIB"]) * 2**30 / total))
