"""gpu_check.py section `env`: versions, device, what is installed."""

from __future__ import annotations

import importlib
import inspect
import platform

from gpu_check_run import Run


def section_env(run: Run, deadline: float, device, how: str) -> dict:
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "medusa_toolkit": how,
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        }
    for name in ("deepspeed", "flash_attn"):
        try:
            info[name] = importlib.import_module(name).__version__
        except Exception as e:  # ImportError, or a broken install
            info[name] = f"not available ({type(e).__name__})"
    from transformers import LlamaModel

    info["transformers_cache_api"] = "cache" in inspect.signature(LlamaModel.forward).parameters
    for k, v in info.items():
        run.log(f"   {k}: {v}")
    return info
