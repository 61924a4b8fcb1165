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

import math
import os
from contextlib import AbstractContextManager
from typing import Any
from unittest import mock

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


def compiled_flops(program: Any) -> float | None:
    """FLOPs of one run of a lowered or compiled program, from XLA's cost analysis (None if it
    has none). For a GPU it undercounts: the compiled program's convolutions are cuDNN calls
    that it counts as nothing (an H200's R-50 forward: 0.0045 TFLOP, against 2.92 by
    :func:`jaxpr_flops`), and jax 0.11.2's lowered program gave no figure there at all."""
    try:
        analysis = program.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per partition
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


# The model's own formulation, for counting its FLOPs: XLA's dilated convs (the sub-grid kernel
# gradient convolves zero padding too) and attention as matmuls without chunks (chunks recompute
# their similarities in the backward pass; cuDNN's fused attention is a call whose FLOPs a jaxpr
# does not show). Set while a step is traced for its FLOPs only.
MODEL_FORMULATION = {
    "MCIBI_DILATED_CONV": "xla",
    "MCIBI_ATTENTION": "xla",
    "MCIBI_ATTENTION_CHUNK_ELEMENTS": "0",
    "MCIBI_LOSS_BAND_ELEMENTS": "0",
}


def model_formulation() -> AbstractContextManager:
    """Within: models traced as :data:`MODEL_FORMULATION` says. MFU counts the model's FLOPs,
    not those of the faster paths a device takes, which differ by padding and recomputation."""
    return mock.patch.dict(os.environ, MODEL_FORMULATION)


def model_flops(fn: Any, *args: Any) -> float:
    """FLOPs of ``fn(*args)`` as the model formulates them (:func:`model_formulation`), traced
    afresh: a jitted ``fn``'s own function, wrapped anew, since traces are cached by function."""
    import jax

    raw = getattr(fn, "__wrapped__", fn)
    with model_formulation():
        return jaxpr_flops(jax.make_jaxpr(lambda *a: raw(*a))(*args))


def jaxpr_flops(jaxpr: Any) -> float:
    """FLOPs (2 per multiply-add) of the matrix products and convolutions of a (closed) jaxpr,
    its sub-jaxprs included (a scan's body times its length, a cond's costliest branch, a while
    loop's body once). The same on every backend: XLA's cost analysis of a program compiled
    for a GPU leaves out the convolutions it hands to cuDNN."""
    from jax.extend import core

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            rhs_free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
            total += 2.0 * math.prod(lhs) * math.prod(rhs_free)
        elif name == "conv_general_dilated":
            total += 2.0 * _conv_macs(eqn)
        subs = [
            [v] if isinstance(v, (core.ClosedJaxpr, core.Jaxpr)) else list(v)
            for v in eqn.params.values()
            if isinstance(v, (core.ClosedJaxpr, core.Jaxpr))
            or (
                isinstance(v, (tuple, list))
                and v
                and all(isinstance(b, (core.ClosedJaxpr, core.Jaxpr)) for b in v)
            )
        ]
        if name == "cond":
            total += max((jaxpr_flops(b) for group in subs for b in group), default=0.0)
            continue
        times = eqn.params.get("length", 1) if name == "scan" else 1
        if name == "while":
            subs = [[eqn.params["body_jaxpr"]]]
        total += times * sum(jaxpr_flops(b) for group in subs for b in group)
    return total


def _conv_macs(eqn: Any) -> float:
    """Multiply-adds of a ``conv_general_dilated`` that read the input, not its padding or the
    holes of an input dilation (as XLA's cost analysis counts them)."""
    params = eqn.params
    lhs, kernel = (v.aval.shape for v in eqn.invars[:2])
    out = eqn.outvars[0].aval.shape
    numbers = params["dimension_numbers"]
    taps = 1
    for i, (lhs_dim, rhs_dim, out_dim) in enumerate(
        zip(numbers.lhs_spec[2:], numbers.rhs_spec[2:], numbers.out_spec[2:])
    ):
        size, k, o = lhs[lhs_dim], kernel[rhs_dim], out[out_dim]
        stride, (low, _) = params["window_strides"][i], params["padding"][i]
        lhs_dilation, rhs_dilation = params["lhs_dilation"][i], params["rhs_dilation"][i]
        last = (size - 1) * lhs_dilation
        taps *= sum(
            1
            for position in range(o)
            for tap in range(k)
            if 0 <= (p := position * stride + tap * rhs_dilation - low) <= last
            and p % lhs_dilation == 0
        )
    batch, out_features = out[numbers.out_spec[0]], out[numbers.out_spec[1]]
    in_features = kernel[numbers.rhs_spec[1]]  # per group
    return float(batch) * out_features * in_features * taps / params["batch_group_count"]


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
