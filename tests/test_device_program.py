"""benchmarks/device_program.py: reading XLA's optimised HLO for a GPU or a TPU (the compiles
themselves need JAX's CUDA plugin or libtpu, which the test environment does not install)."""

from __future__ import annotations

import pytest

from tests.helpers import load_script

device_program = load_script("benchmarks", "device_program")

# Lines in the form XLA:GPU prints them (R-50's train step, shortened): a dilated conv's kernel
# gradient as a forward conv over a 2-channel input, the same gradient on the sub-grids, a
# backward-filter conv, a scatter and a while loop.
HLO = """
  %bitcast.1 = bf16[256,64,128,2]{3,2,1,0} bitcast(%p.1)
  %bitcast.2 = bf16[128,64,128,2]{3,2,1,0} bitcast(%p.2)
  %cudnn-conv.1 = (bf16[256,3,3,128]{3,2,1,0}, u8[0]{0}) custom-call(%bitcast.1, %bitcast.2), window={size=64x128 stride=12x12 pad=12_12x12_12}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/aspp/conv_general_dilated"}
  %bitcast.3 = bf16[2048,8,13,2592]{3,2,1,0} bitcast(%p.3)
  %cudnn-conv.2 = (bf16[2048,3,3,512]{3,2,1,0}, u8[0]{0}) custom-call(%bitcast.3, %bitcast.4), window={size=3x6}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/aspp2/conv_general_dilated"}
  %cudnn-conv-bw-filter.1 = (bf16[128,3,3,256]{3,2,1,0}, u8[0]{0}) custom-call(%x.1, %g.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter"
  ROOT %scatter-add.1 = f32[2,512,1024,19]{3,2,1,0} scatter(%a, %b, %c), update_window_dims={1,2,3,4}, to_apply=%add, metadata={op_name="jit(train_step)/scatter-add"}
  %while.1 = (s32[], bf16[2,8192,256]{2,1,0}) while(%tuple.1), condition=%cond, body=%body, metadata={op_name="jit(train_step)/attention/while"}
"""


def test_summary_counts_convs_and_flags_missed_backward_filters():
    summary = device_program.summarize(HLO)
    assert summary["convs"] == {
        ("convForward", "size=64x128 stride=12x12 pad=12_12x12_12"): 1,
        ("convForward", "size=3x6"): 1,
        ("convBackwardFilter", "size=3x3 pad=1_1x1_1"): 1,
    }
    # only the 2-channel one: the sub-grid gradient contracts over 2592 channels
    assert summary["wide_kernels"] == [
        "size=64x128 stride=12x12 pad=12_12x12_12  jit(train_step)/aspp/conv_general_dilated"
    ]
    assert summary["flagged"] == {
        ("scatter", "jit(train_step)/scatter-add"): 1,
        ("while", "jit(train_step)/attention/while"): 1,
    }
    text = device_program.report("r50", HLO, 1.0)
    assert "(missed backward-filter convs): 1" in text and "1  while" in text


def test_without_the_cuda_plugin_it_says_what_to_install(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "_topology_factories", {})
    monkeypatch.setattr(xla_bridge, "_discover_and_register_pjrt_plugins", lambda: None)
    with pytest.raises(SystemExit, match=r'pip install "jax\[cuda12\]=='):
        device_program.h100_mesh()


def test_memory_plan_in_gib():
    class Stats:
        peak_memory_in_bytes = 3 * 2**30
        argument_size_in_bytes = 2**30
        output_size_in_bytes = 2**30
        alias_size_in_bytes = 2**29
        temp_size_in_bytes = 2**31

    class Compiled:
        def memory_analysis(self):
            return Stats()

    assert device_program.memory_plan(Compiled()) == (
        "XLA's memory plan: peak 3.00 GiB (arguments 1.00, outputs 1.00 of which 0.50 reuse "
        "the arguments' buffers, scratch 2.00)"
    )


TPU_HLO = """
  %fusion.1 = bf16[2,64,128,512]{3,2,1,0} fusion(%a, %b), kind=kOutput, metadata={op_name="jit(train_step)/jvp(MCIBI)/aspp/branch/0/conv_general_dilated"}, backend_config={"window_config":{"estimated_cycles":"300"}}
  %fusion.2 = bf16[2,64,128,512]{3,2,1,0} fusion(%c), kind=kLoop, metadata={op_name="jit(train_step)/jvp(MCIBI)/aspp/branch/1/add"}, backend_config={"estimated_cycles":"100"}
  %copy.3 = bf16[2,64,128,512]{3,2,1,0} copy(%d), backend_config={"estimated_cycles":"600"}
"""


def test_tpu_cycles_by_scope():
    total, by_scope = device_program.cycles_by_scope(TPU_HLO, depth=2)
    assert total == 1000
    assert by_scope == {"jvp(MCIBI)/aspp": 400, "(unnamed)": 600}
    text = device_program.report("r50", TPU_HLO, 1.0, "tpu-v5e")
    assert "1,000 estimated cycles" in text and " 60.0 %" in text and "cuDNN" not in text


TPU_LOOP_HLO = """
%body.1 (arg: (s32[], f32[8])) -> (s32[], f32[8]) {
  %fusion.7 = f32[8]{0} fusion(%x), kind=kLoop, metadata={op_name="jit(train_step)/jvp()/while/body/log_softmax"}, backend_config={"estimated_cycles":"50"}
}

%condition.2 (arg: (s32[], f32[8])) -> pred[] {
  %constant.9 = s32[]{:T(128)} constant(3)
  ROOT %lt.1 = pred[]{:T(512)} compare(%counter, %constant.9), direction=LT
}

ENTRY %main.3 (p: f32[8]) -> f32[8] {
  %fusion.1 = f32[8]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(train_step)/jvp(MCIBI)/aspp/add"}, backend_config={"estimated_cycles":"100"}
  %while.4 = (s32[]{:T(128)}, f32[8]{0:T(8,128)}, /*index=2*/s32[]{:T(128)}) while(%tuple.2), condition=%condition.2, body=%body.1
}
"""


def test_tpu_cycles_count_a_loop_body_once_per_trip():
    """Also where the loop's tuple shape holds TPU layouts and index comments: a parse that
    stopped at their parentheses or '=' dropped the loop (and on GPUs, a loop's kernels)."""
    total, by_scope = device_program.cycles_by_scope(TPU_LOOP_HLO, depth=2)
    assert by_scope == {"jvp(MCIBI)/aspp": 100, "jvp()/while": 150}
    assert total == 250


def test_without_libtpu_it_says_what_to_install(monkeypatch):
    from jax.experimental import topologies

    def no_tpu(**kwargs):
        raise RuntimeError("Unknown backend tpu")

    monkeypatch.setattr(topologies, "get_topology_desc", no_tpu)
    with pytest.raises(SystemExit, match=r'pip install "jax\[tpu\]=='):
        device_program.tpu_mesh("tpu-v5e")


hlo_roofline = load_script("benchmarks", "hlo_roofline")

# A program in XLA:GPU's form: a forward conv and its kernel gradient, a cuBLAS matmul, an
# elementwise fusion, and a while loop (3 known trips) whose fusion slices one row of its
# operand and updates another buffer in place.
ROOFLINE_HLO = """
%fused_slice (p0: bf16[16,1024], p1: s32[]) -> bf16[1,1024] {
  %p0 = bf16[16,1024]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = bf16[1,1024]{1,0} dynamic-slice(%p0, %p1, %zero), dynamic_slice_sizes={1,1024}
}

%fused_update (q0: f32[16,1024], q1: bf16[1,1024], q2: s32[]) -> f32[16,1024] {
  %q0 = f32[16,1024]{1,0} parameter(0)
  %q1 = bf16[1,1024]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  %c = f32[1,1024]{1,0} convert(%q1)
  ROOT %dus = f32[16,1024]{1,0} dynamic-update-slice(%q0, %c, %q2, %zero.1)
}

%body (state: (s32[], bf16[16,1024], f32[16,1024])) -> (s32[], bf16[16,1024], f32[16,1024]) {
  %state = (s32[], bf16[16,1024]{1,0}, f32[16,1024]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %rows = bf16[16,1024]{1,0} get-tuple-element(%state), index=1
  %acc = f32[16,1024]{1,0} get-tuple-element(%state), index=2
  %row = bf16[1,1024]{1,0} fusion(%rows, %i), kind=kLoop, calls=%fused_slice, metadata={op_name="jit(step)/loop/slice"}
  %new = f32[16,1024]{1,0} fusion(%acc, %row, %i), kind=kLoop, calls=%fused_update, metadata={op_name="jit(step)/loop/update"}
  ROOT %t = (s32[], bf16[16,1024]{1,0}, f32[16,1024]{1,0}) tuple(%i, %rows, %new)
}

ENTRY %main (x: bf16[2,64,128,256], w: bf16[512,3,3,256], a: bf16[4096,2048], b: bf16[2048,512]) -> f32[16,1024] {
  %x = bf16[2,64,128,256]{3,2,1,0} parameter(0)
  %w = bf16[512,3,3,256]{3,2,1,0} parameter(1)
  %a = bf16[4096,2048]{1,0} parameter(2)
  %b = bf16[2048,512]{1,0} parameter(3)
  %conv = (bf16[2,64,128,512]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/net/conv"}
  %y = bf16[2,64,128,512]{3,2,1,0} get-tuple-element(%conv), index=0
  %dw = (bf16[512,3,3,256]{3,2,1,0}, u8[65536]{0}) custom-call(%x, %y), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(step)/transpose(net)/conv"}
  %mm = (bf16[4096,512]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/net/dense"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %relu = bf16[2,64,128,512]{3,2,1,0} fusion(%y), kind=kLoop, calls=%fused_relu, metadata={op_name="jit(step)/net/relu"}
  %rows.0 = bf16[16,1024]{1,0} parameter(4)
  %acc.0 = f32[16,1024]{1,0} parameter(5)
  %zero.2 = s32[] constant(0)
  %init = (s32[], bf16[16,1024]{1,0}, f32[16,1024]{1,0}) tuple(%zero.2, %rows.0, %acc.0)
  %loop = (s32[], bf16[16,1024]{1,0}, f32[16,1024]{1,0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(step)/loop/while"}, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[16,1024]{1,0} get-tuple-element(%loop), index=2
}
"""


def test_roofline_counts_flops_and_traffic_per_kernel():
    kernels = {k.name: k for k in hlo_roofline.kernels(ROOFLINE_HLO)}
    assert set(kernels) == {"conv", "dw", "mm", "relu", "row", "new"}
    conv_flops = 2 * (2 * 64 * 128 * 512) * (3 * 3 * 256)
    activation = 2 * 64 * 128 * 256 * 2
    assert kernels["conv"].flops == conv_flops
    assert kernels["conv"].bytes == activation + 512 * 9 * 256 * 2 + 2 * activation
    assert kernels["dw"].flops == conv_flops  # the same sums, the kernel as the result
    assert kernels["dw"].bytes == activation + 2 * activation + 512 * 9 * 256 * 2  # no workspace
    assert kernels["mm"].flops == 2 * 4096 * 512 * 2048
    assert kernels["relu"].flops == 0 and kernels["relu"].bytes == 2 * 2 * activation
    # the loop's fusions: one row read, one row written, three times
    assert kernels["row"].count == kernels["new"].count == 3
    assert kernels["row"].bytes == 1024 * 2 + 4 + 1024 * 2
    assert kernels["new"].bytes == 1024 * 2 + 4 + 1024 * 4
    assert kernels["conv"].precision == "bf16"


def test_roofline_estimate_and_report():
    device = {"bf16": 1e15, "tf32": 5e14, "f32": 5e13, "f16": 1e15, "bandwidth": 1e12}
    result = hlo_roofline.estimate(ROOFLINE_HLO, device, depth=2)
    conv_flops = 2 * (2 * 64 * 128 * 512) * (3 * 3 * 256)
    # the convs are bound by arithmetic; the matmul (24 MB for 8.6 GFLOP here) and the rest
    # by traffic
    expected_compute = 2 * conv_flops / 1e15
    relu = 2 * 2 * (2 * 64 * 128 * 512) / 1e12
    assert result["compute_bound_seconds"] == pytest.approx(expected_compute)
    assert result["seconds"] > expected_compute + relu
    assert result["kernels"] == 4 + 2 * 3
    assert result["by_scope"]["net/relu"] == pytest.approx(relu)
    text = hlo_roofline.report(ROOFLINE_HLO, conv_flops, device)
    assert "10 kernels" in text and "MFU at most" in text and "net/conv" in text
    longest = text.split("the longest kernels")[1].splitlines()[1]
    assert longest.split()[1:2] == ["flops"] and " conv " in f" {longest.split()[5]} "
    assert hlo_roofline.report(ROOFLINE_HLO, conv_flops, device, 0, 0).count("\n") == 0
