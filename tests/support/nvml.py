"""Whether this machine has a usable NVML (an NVIDIA driver and GPU): GPU-only tests skip without one."""

from __future__ import annotations


def nvml_works() -> bool:
    """True when the real `pynvml` initialises here (it shuts down again before returning)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or any NVMLError: there is no usable NVML here
        return False
    pynvml.nvmlShutdown()
    return True
