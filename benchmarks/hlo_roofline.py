"""A roofline estimate of an optimised XLA:GPU program, read from its HLO text.

Every kernel the program launches (a fusion, a cuDNN conv, a cuBLAS matmul, a copy) takes at
least the longer of its arithmetic at the device's peak rate and its memory traffic at the
device's bandwidth. Summed over the program (a while loop's body times its known trip count),
that is a lower bound on the step time, and the model's FLOPs over it an upper bound on its
MFU. Grouped by JAX scope, it says where a step's time must go before any GPU is timed:
``benchmarks/device_program.py`` prints it for programs compiled without a GPU.

What it counts:

* FLOPs of cuDNN convs (2 x the forward output's size x the kernel's size / its output
  features, whichever of the three operands the custom call computes), of matmuls (cuBLAS
  custom calls, or dots inside fusions: 2 x the output's size x the contracted size) and of
  cuDNN's fused attention (its matmuls: 2 forward, 5 backward);
* bytes: each operand read once and the output written once, except operands a fusion only
  slices (counted at the slices' size) and the buffer a fusion updates in place
  (``dynamic-update-slice``: counted at the update's size).

Buffers that stay in the L2 cache, kernels' launch latency, and how far cuDNN or cuBLAS fall
short of the peak are not modelled: measured times are longer.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

BYTES_PER_ELEMENT = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip

# Dense peak rates (FLOP/s) by the precision a kernel's inputs are multiplied in, and memory
# bandwidth (bytes/s). H100 SXM: NVIDIA's datasheet, without sparsity; float32 matmuls and convs
# run as TF32 unless asked for HIGHEST precision.
H100 = {
    "bf16": 989.4e12,
    "f16": 989.4e12,
    "tf32": 494.7e12,
    "f32": 66.9e12,
    "bandwidth": 3.35e12,
}

# The H200 SXM: the same GH100 compute, HBM3e at 4.8 TB/s.
H200 = {**H100, "bandwidth": 4.8e12}

COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) ", re.M)
INSTRUCTION_HEAD = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = ")
OPCODE_AND_OPERANDS = re.compile(r" ([a-z][\w-]*)\((.*?)\)(?:, |$)")
ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
OPERAND_NAME = re.compile(r"%([\w.-]+)")
OP_NAME = re.compile(r'op_name="([^"]*)"')
CALLS = re.compile(r"calls=%([\w.-]+)")
BODY = re.compile(r"body=%([\w.-]+)")
TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]+)"')
DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
PARAMETER_NUMBER = re.compile(r"parameter\((\d+)\)")
INTERMEDIATE_DIMS = re.compile(
    r'"intermediate_tensor_shape":\s*\{[^}]*"dimensions":\s*\[([^\]]*)\]'
)

# Instructions that launch no kernel of their own.
FREE = {
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
    "partition-id", "replica-id", "opt-barrier", "optimization-barrier", "add-dependency",
}  # fmt: skip


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    line: str

    def attribute(self, pattern: re.Pattern) -> str | None:
        match = pattern.search(self.line)
        return match.group(1) if match else None


def arrays(shape: str) -> list[tuple[str, list[int]]]:
    """The (dtype, dims) of each array in a shape, tuples flattened; ``token[]`` etc. skipped."""
    return [
        (dtype, [int(d) for d in dims.split(",") if d])
        for dtype, dims in ARRAY.findall(shape)
        if dtype in BYTES_PER_ELEMENT
    ]


def num_bytes(shape: str) -> float:
    return sum(BYTES_PER_ELEMENT[dtype] * math.prod(dims) for dtype, dims in arrays(shape))


def _instruction_parts(line: str) -> tuple[str, str, str, str] | None:
    """(name, shape, opcode, operands) of an instruction's line; None for other lines. A tuple
    shape is taken to its matching parenthesis: TPU layouts (``{:T(128)}``) and index comments
    (``/*index=5*/``) sit inside it."""
    head = INSTRUCTION_HEAD.match(line)
    if not head:
        return None
    rest = line[head.end() :]
    if rest.startswith("("):
        depth, end = 0, 0
        while end < len(rest):
            depth += (rest[end] == "(") - (rest[end] == ")")
            end += 1
            if depth == 0:
                break
        shape, rest = rest[:end], rest[end:]
    else:
        shape, _, rest = rest.partition(" ")
        rest = " " + rest
    tail = OPCODE_AND_OPERANDS.match(rest)
    return (head.group(1), shape, *tail.groups()) if tail else None


def parse(hlo: str) -> dict[str, list[Instruction]]:
    """The program's computations by name, each a list of its instructions; the entry
    computation is also under ``"ENTRY"``."""
    computations: dict[str, list[Instruction]] = {}
    starts = list(COMPUTATION.finditer(hlo))
    for index, start in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(hlo)
        body = hlo[start.end() : end]
        instructions = []
        for line in body.splitlines():
            parts = _instruction_parts(line)
            if parts:
                name, shape, opcode, operands = parts
                instructions.append(
                    Instruction(name, shape, opcode, OPERAND_NAME.findall(operands), line)
                )
        computations[start.group(1)] = instructions
        if start.group(0).startswith("ENTRY"):
            computations["ENTRY"] = instructions
    return computations


def _operand_arrays(
    instruction: Instruction, shapes: dict[str, str], index: int = 0
) -> list[tuple[str, list[int]]]:
    """The (dtype, dims) arrays of the instruction's ``index``-th operand ([] if unknown)."""
    if index >= len(instruction.operands):
        return []
    return arrays(shapes.get(instruction.operands[index], ""))


def _conv_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    """2 x |forward output| x |kernel| / output features, for any of cuDNN's three convs."""
    target = instruction.attribute(CUSTOM_TARGET) or ""
    labels = DIM_LABELS.search(instruction.line)
    result = arrays(instruction.shape)[0][1]
    operands = [(_operand_arrays(instruction, shapes, i) or [("", [])])[0][1] for i in range(2)]
    if not labels or len(instruction.operands) < 2:
        return 0.0
    if "BackwardInput" in target:
        output, kernel = operands[0], operands[1]
    elif "BackwardFilter" in target:
        output, kernel = operands[1], result
    else:
        output, kernel = result, operands[1]
    out_features = kernel[labels.group(2).index("o")] if kernel else 0
    return 2.0 * math.prod(output) * math.prod(kernel) / out_features if out_features else 0.0


def _matmul_flops(
    instruction: Instruction, shapes: dict[str, str], contracting: str | None
) -> float:
    """2 x |output| x the product of the left operand's ``contracting`` dims ("1,2", quoted
    or not: a dot's attribute or cuBLAS's backend config)."""
    lhs = _operand_arrays(instruction, shapes)
    if contracting is None or not lhs:
        return 0.0
    dims = [int(d.strip('" ')) for d in contracting.split(",") if d.strip('" ')]
    contracted = math.prod(lhs[0][1][d] for d in dims)
    return 2.0 * math.prod(arrays(instruction.shape)[0][1]) * contracted


def _gemm_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    return _matmul_flops(instruction, shapes, instruction.attribute(GEMM_CONTRACTING))


def _dot_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    return _matmul_flops(instruction, shapes, instruction.attribute(CONTRACTING))


def _attention_flops(instruction: Instruction, shapes: dict[str, str]) -> float:
    """cuDNN's fused attention: 2 matmuls of B x N x T x S x H forward; backward, 5 (the
    similarities recomputed, then the gradients of the probabilities, values, queries, keys)."""
    target = instruction.attribute(CUSTOM_TARGET) or ""
    match = INTERMEDIATE_DIMS.search(instruction.line)
    query = _operand_arrays(instruction, shapes)
    if not match or not query:
        return 0.0
    similarities = math.prod(int(d.strip(' "')) for d in match.group(1).split(","))
    matmuls = 5 if "Backward" in target else 2
    return 2.0 * matmuls * similarities * query[0][1][-1]


def _input_dtype(instruction: Instruction, shapes: dict[str, str]) -> str:
    first = _operand_arrays(instruction, shapes)
    dtype = first[0][0] if first else "f32"
    if dtype == "f32" and "HIGHEST" not in instruction.line:
        return "tf32"
    return dtype if dtype in ("bf16", "f16", "f32") else "bf16"


@dataclasses.dataclass
class Kernel:
    """One launched kernel: its arithmetic, its traffic, the rate class of its arithmetic."""

    name: str
    scope: str
    flops: float
    bytes: float
    precision: str
    count: int = 1

    def seconds(self, device: dict) -> float:
        compute = self.flops / device[self.precision] if self.flops else 0.0
        return self.count * max(compute, self.bytes / device["bandwidth"])


def _fusion_traffic(
    instruction: Instruction, computations: dict, shapes: dict[str, str]
) -> tuple[float, float, str]:
    """(bytes, flops, precision) of a fusion: operands it only slices count at the slices' size;
    a root that updates a parameter in place counts at the update's size."""
    fused = computations.get(instruction.attribute(CALLS) or "", [])
    parameters = {}
    users: dict[str, list[Instruction]] = collections.defaultdict(list)
    for inner in fused:
        if inner.opcode == "parameter":
            parameters[int(inner.attribute(PARAMETER_NUMBER) or 0)] = inner.name
        for operand in inner.operands:
            users[operand].append(inner)
    written = num_bytes(instruction.shape)
    in_place = None
    root = next((i for i in fused if i.line.lstrip().startswith("ROOT")), None)
    if root is not None and root.opcode == "dynamic-update-slice" and root.operands:
        in_place = root.operands[0]
        written = num_bytes(shapes.get(root.operands[1], ""))
    read = 0.0
    for number, operand in enumerate(instruction.operands):
        parameter = parameters.get(number)
        if parameter is not None and parameter == in_place:
            continue
        whole = num_bytes(shapes.get(operand, ""))
        sliced = _sliced_elements(parameter, users) if parameter else None
        if sliced is None:
            read += whole
        else:
            elements = math.prod(arrays(shapes.get(operand, ""))[0][1]) if whole else 1
            read += whole * sliced / max(elements, 1)
    flops, precision = 0.0, "bf16"
    for inner in fused:
        if inner.opcode == "dot":
            flops += _dot_flops(inner, shapes)
            precision = _input_dtype(inner, shapes)
    return read + written, flops, precision


# Element-wise, one operand: a slice after them reads no more of the parameter than its size.
TRANSPARENT = {"convert", "bitcast", "reshape", "copy", "negate", "abs"}


def _sliced_elements(value: str, users: dict[str, list[Instruction]]) -> int | None:
    """Elements of ``value`` read when every use of it, through :data:`TRANSPARENT` ops, is
    the sliced operand of a (dynamic) slice; None when some use reads all of it."""
    uses = users.get(value, [])
    if not uses:
        return None
    total = 0
    for use in uses:
        if use.opcode in ("slice", "dynamic-slice") and use.operands[0] == value:
            total += math.prod(arrays(use.shape)[0][1])
        elif use.opcode in TRANSPARENT:
            inner = _sliced_elements(use.name, users)
            if inner is None:
                return None
            total += inner
        else:
            return None
    return total


def kernels(hlo: str) -> list[Kernel]:
    """The kernels the program launches, a while loop's body once per known iteration."""
    computations = parse(hlo)
    shapes = {i.name: i.shape for body in computations.values() for i in body}
    launched: list[Kernel] = []

    def visit(body: list[Instruction], repeats: int) -> None:
        for instruction in body:
            if instruction.opcode in FREE:
                continue
            scope = instruction.attribute(OP_NAME) or "(unnamed)"
            if instruction.opcode == "while":
                trips = instruction.line[instruction.line.find("backend_config") :]
                count = TRIP_COUNT.search(trips)
                visit(
                    computations.get(instruction.attribute(BODY) or "", []),
                    repeats * (int(count.group(1)) if count else 1),
                )
                continue
            operand_bytes = sum(num_bytes(shapes.get(o, "")) for o in instruction.operands)
            flops, precision = 0.0, "bf16"
            traffic = operand_bytes + num_bytes(instruction.shape)
            if instruction.opcode == "fusion":
                traffic, flops, precision = _fusion_traffic(instruction, computations, shapes)
            elif instruction.opcode == "custom-call":
                target = instruction.attribute(CUSTOM_TARGET) or ""
                if target.startswith("__cudnn$conv"):
                    flops = _conv_flops(instruction, shapes)
                elif target.startswith("__cublas"):
                    flops = _gemm_flops(instruction, shapes)
                elif target.startswith("__cudnn$fmha"):
                    flops = _attention_flops(instruction, shapes)
                precision = _input_dtype(instruction, shapes)
                # the workspace (the tuple's last u8/s8 array) is not traffic
                workspace = arrays(instruction.shape)[-1]
                if len(arrays(instruction.shape)) > 1 and workspace[0] in ("u8", "s8"):
                    traffic -= math.prod(workspace[1])
            elif instruction.opcode == "dot":
                flops = _dot_flops(instruction, shapes)
                precision = _input_dtype(instruction, shapes)
            launched.append(Kernel(instruction.name, scope, flops, traffic, precision, repeats))

    visit(computations.get("ENTRY", []), 1)
    return launched


def estimate(hlo: str, device: dict = H100, depth: int = 4) -> dict:
    """The roofline of a program: seconds in all, of which bound by arithmetic, FLOPs counted,
    kernels launched, and seconds per JAX scope (its name stack cut to ``depth`` parts after
    the jitted function's name)."""
    launched = kernels(hlo)
    by_scope: collections.Counter = collections.Counter()
    total = compute_bound = flops = 0.0
    count = 0
    for kernel in launched:
        seconds = kernel.seconds(device)
        total += seconds
        flops += kernel.count * kernel.flops
        count += kernel.count
        if (
            kernel.flops
            and kernel.flops / device[kernel.precision] >= kernel.bytes / device["bandwidth"]
        ):
            compute_bound += seconds
        parts = kernel.scope.split("/")[1 : 1 + depth]
        by_scope["/".join(parts) or "(unnamed)"] += seconds
    return {
        "seconds": total,
        "compute_bound_seconds": compute_bound,
        "flops": flops,
        "kernels": count,
        "by_scope": by_scope,
        "launched": launched,
    }


def report(
    hlo: str,
    model_flops: float,
    device: dict = H100,
    top: int = 25,
    top_kernels: int = 10,
    device_name: str = "H100 SXM",
) -> str:
    """The estimate as text: the MFU it allows against ``model_flops`` (the model's count), the
    ``top`` largest scopes and the ``top_kernels`` longest kernels."""
    result = estimate(hlo, device)
    seconds = result["seconds"]
    peak = device["bf16"]
    lines = [
        f"roofline ({device_name} peaks, no cache, no launch latency): {1e3 * seconds:.2f} ms, of "
        f"which {1e3 * result['compute_bound_seconds']:.2f} ms bound by arithmetic; "
        f"{result['kernels']} kernels; matmul/conv FLOPs {result['flops'] / 1e12:.2f} T; "
        f"model FLOPs {model_flops / 1e12:.2f} T, MFU at most "
        f"{100 * model_flops / max(seconds, 1e-12) / peak:.1f} %",
    ]
    if top:
        lines.append("the largest scopes (ms):")
    for scope, scope_seconds in result["by_scope"].most_common(top):
        lines.append(f"  {1e3 * scope_seconds:7.3f}  {scope}")
    longest = sorted(result["launched"], key=lambda k: -k.seconds(device))[:top_kernels]
    if longest:
        lines.append("the longest kernels (ms, bound, GFLOP, MB, x runs):")
    for kernel in longest:
        compute = kernel.flops / device[kernel.precision] if kernel.flops else 0.0
        bound = "flops" if compute >= kernel.bytes / device["bandwidth"] else "bytes"
        lines.append(
            f"  {1e3 * kernel.seconds(device):7.3f}  {bound:5s} {kernel.flops / 1e9:8.1f} "
            f"{kernel.bytes / 1e6:8.1f}  x{kernel.count}  {kernel.name}  {kernel.scope}"
        )
    return "\n".join(lines)
