"""What XLA says about a compiled program (FLOPs, planned memory) and the peak FLOP/s of devices.

Peak dense FLOP/s per chip, without sparsity (vendor figures):

| device kind        | bfloat16     | float32 as this package runs it                        |
|--------------------|--------------|--------------------------------------------------------|
| NVIDIA H100 SXM    | 989.4 T      | 66.9 T (FP32 CUDA cores)                               |
| NVIDIA H200 SXM    | 989.4 T      | 66.9 T (same GH100 compute as the H100 SXM)            |
| NVIDIA A100 (SXM or PCIe) | 312 T | 19.5 T                                                 |
| TPU v4             | 275 T        | 45.8 T (275 / 6)                                       |
| TPU v5e            | 197 T        | 32.8 T (197 / 6)                                       |
| TPU v5p            | 459 T        | 76.5 T (459 / 6)                                       |
| TPU v6e (Trillium) | 918 T        | 153 T (918 / 6)                                        |

Sources: NVIDIA's H100 and H200 Tensor Core GPU datasheets (SXM columns; the sparse figures
halved) and the A100 datasheet; Google Cloud's TPU v4 / v5e / v5p / v6e system-architecture
pages (bf16 peak per chip). Float32 assumption: the model's float32 convolutions and matmuls ask
for ``Precision.HIGHEST`` (``mcibi_jax.models.layers.conv``, the ViT's dense layers), which on
GPUs means true FP32 (no TF32 tensor cores) and on TPUs about six bf16 passes of the MXU.
Other device kinds (H100 PCIe/NVL, H200 NVL, CPUs, ...) have no entry: MFU is 'n/a'.
"""

from __future__ import annotations

from typing import Any

TERA = 1e12

# name -> {dtype: peak FLOP/s}
PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bfloat16": 989.4 * TERA, "float32": 66.9 * TERA},
    "H200 SXM": {"bfloat16": 989.4 * TERA, "float32": 66.9 * TERA},
    "A100": {"bfloat16": 312.0 * TERA, "float32": 19.5 * TERA},
    "TPU v4": {"bfloat16": 275.0 * TERA, "float32": 275.0 / 6 * TERA},
    "TPU v5e": {"bfloat16": 197.0 * TERA, "float32": 197.0 / 6 * TERA},
    "TPU v5p": {"bfloat16": 459.0 * TERA, "float32": 459.0 / 6 * TERA},
    "TPU v6e": {"bfloat16": 918.0 * TERA, "float32": 918.0 / 6 * TERA},
}


def peak_entry(device_kind: str) -> str | None:
    """The :data:`PEAKS` entry of a ``jax.Device.device_kind`` ("NVIDIA H200", "TPU v5 lite", ...),
    or None when the kind has none (MFU 'n/a')."""
    kind = device_kind.lower()
    if "tpu" in kind:
        if "v6" in kind:
            return "TPU v6e"
        if "v5" in kind:
            return "TPU v5e" if ("lite" in kind or "v5e" in kind) else "TPU v5p"
        return "TPU v4" if "v4" in kind else None
    if any(variant in kind for variant in ("pcie", "nvl")) and "a100" not in kind:
        return None  # lower clocks and power than the SXM parts
    for chip in ("H200", "H100"):
        if chip.lower() in kind:
            return f"{chip} SXM"
    return "A100" if "a100" in kind else None


def peak_flops(device_kind: str, dtype_name: str) -> float | None:
    """Peak dense FLOP/s of one ``device_kind`` chip for ``dtype_name`` compute, or None."""
    entry = peak_entry(device_kind)
    return None if entry is None else PEAKS[entry].get(dtype_name)


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one run of a compiled program, from XLA's cost analysis (None if it has none)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per partition
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's memory plan of a compiled program in bytes: ``argument``, ``output``, ``alias``
    (outputs written into donated arguments), ``temp`` (scratch: activations, gradients) and
    ``peak``: XLA's own peak estimate where it gives one, else argument + output + temp - alias."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    plan = {
        name: int(getattr(stats, f"{name}_size_in_bytes", 0))
        for name in ("argument", "output", "alias", "temp")
    }
    estimate = plan["argument"] + plan["output"] + plan["temp"] - plan["alias"]
    plan["peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0) or estimate
    return plan


def mfu(
    flops: float | None, seconds: float | None, device_kind: str, dtype_name: str
) -> float | None:
    """Achieved FLOP/s over the device's peak for ``dtype_name`` (None where either is unknown)."""
    peak = peak_flops(device_kind, dtype_name)
    if not flops or not seconds or peak is None:
        return None
    return flops / seconds / peak
