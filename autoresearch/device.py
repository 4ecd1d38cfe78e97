"""
What differs between CUDA, MPS and CPU when measuring a run: peak FLOP/s for MFU, waiting for queued work,
peak memory used, memory available. One function per question, each deciding by device type in one place.
"""

import sys

import torch

# Dense bf16 peak TFLOP/s, matched against torch.cuda.get_device_name(); first match wins
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.5), ("H200", 989.5), ("A100", 312.0),
                    ("L40S", 362.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("RTX 5090", 209.5),
                    ("MI300X", 1307.0)]


def peak_flops(device):
    """Peak bf16 FLOP/s of the GPU present, or None when unknown (CPU, MPS, a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{device.type}, {torch.get_num_threads()} threads"


def synchronize(device):
    """Wait for the work queued on the device: timings of asynchronous GPUs would otherwise measure nothing."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device):
    """Peak memory of this process on the device so far: allocated tensors on CUDA, driver memory on MPS, peak
    resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    import resource  # Unix only
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def device_memory_bytes(device):
    """Memory a run may use on `device`: the GPU's total, or the machine's RAM for a CPU (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        except (OSError, StopIteration):
            return None
    return None
