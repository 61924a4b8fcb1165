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


def test_without_libtpu_it_says_what_to_install(monkeypatch):
    from jax.experimental import topologies

    def no_tpu(**kwargs):
        raise RuntimeError("Unknown backend tpu")

    monkeypatch.setattr(topologies, "get_topology_desc", no_tpu)
    with pytest.raises(SystemExit, match=r'pip install "jax\[tpu\]=='):
        device_program.tpu_mesh("tpu-v5e")
