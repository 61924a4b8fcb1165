"""``python -m mcibi_jax.port`` end to end, on the fixture checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

import mcibi_jax
from mcibi_jax import port
from mcibi_jax.porting.pth import load_state_dict, save_state_dict
from tests.reference_data import FIXTURES, nhwc, read_case, relative_error

CASE = "resnet50_cityscapes"


@pytest.fixture()
def config_file(tmp_path):
    """A config file whose model is the fixture case's reference config."""
    path = tmp_path / "fixture_config.py"
    path.write_text(
        "import json\n"
        "import ml_collections\n"
        "from mcibi_jax.reference_config import model_config_from_reference\n\n"
        "def get_config(case):\n"
        f"    meta = json.load(open({str(FIXTURES)!r} + '/' + case + '.json'))\n"
        "    return ml_collections.ConfigDict({'model': model_config_from_reference(meta['reference_config'])})\n"
    )
    return path


def test_port_writes_a_checkpoint_that_reproduces_the_reference(config_file, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert (
        port.main(
            [f"--config={config_file}:{CASE}", f"--pth={FIXTURES / CASE}.pth", f"--out={out}"]
        )
        == 0
    )
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "ported" in summary[0] and "memory (5, 1, 16)" in summary[0]
    config = mcibi_jax.load_config(f"{config_file}:{CASE}")
    _, arrays = read_case(CASE)
    logits = mcibi_jax.Segmenter.from_checkpoint(out, config).forward(nhwc(arrays["images_nchw"]))[
        "stage2"
    ]
    assert relative_error(logits, nhwc(arrays["logits_stage2_nchw"])) < 1e-4


def test_port_refuses_a_checkpoint_of_another_config(config_file, tmp_path, capsys):
    out = tmp_path / "ckpt"
    code = port.main(
        [
            f"--config={config_file}:{CASE}",
            f"--pth={FIXTURES / CASE}.pth",
            f"--out={out}",
            "--config.model.num_classes=7",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "memory_module.memory" in err and "decoder_stage2.4.weight" in err
    assert not out.exists()


def test_port_never_overwrites(config_file, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "precious").write_text("keep me")
    assert (
        port.main(
            [f"--config={config_file}:{CASE}", f"--pth={FIXTURES / CASE}.pth", f"--out={out}"]
        )
        == 2
    )
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious").read_text() == "keep me"


def test_port_accepts_wrapped_and_prefixed_state_dicts(config_file, tmp_path):
    state_dict = load_state_dict(FIXTURES / f"{CASE}.pth")
    wrapped = tmp_path / "wrapped.pth"
    save_state_dict(
        {f"module.{k}": v for k, v in state_dict.items()}, wrapped, wrap_key="state_dict"
    )
    assert (
        port.main([f"--config={config_file}:{CASE}", f"--pth={wrapped}", f"--out={tmp_path / 'a'}"])
        == 0
    )


def test_port_reports_missing_and_foreign_files(config_file, tmp_path, capsys):
    assert (
        port.main(
            [
                f"--config={config_file}:{CASE}",
                f"--pth={tmp_path / 'nope.pth'}",
                f"--out={tmp_path / 'a'}",
            ]
        )
        == 2
    )
    assert "nope.pth" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert (
        port.main([f"--config={config_file}:{CASE}", f"--pth={garbage}", f"--out={tmp_path / 'b'}"])
        == 2
    )
    assert "garbage.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a command-line mistake
        port.main(
            [f"--config={tmp_path / 'missing.py'}", f"--pth={garbage}", f"--out={tmp_path / 'c'}"]
        )
    assert exit_.value.code == 2 and "missing.py does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["resnet50_cityscapes", "hrnetv2_lip", "vit_ade20k"])
def test_forward_accepts_any_input_size(case):
    meta, _ = read_case(case)
    from mcibi_jax.reference_config import model_config_from_reference

    segmenter = mcibi_jax.Segmenter.from_pth(
        FIXTURES / f"{case}.pth", model_config_from_reference(meta["reference_config"])
    )
    for h, w in [(37, 53), (64, 64), (81, 50)]:
        out = segmenter.forward(np.zeros((1, h, w, 3), np.float32))
        assert (
            out["stage1"].shape[0] == 1
            and out["stage2"].shape[-1] == meta["reference_config"]["num_classes"]
        )
        assert np.isfinite(np.asarray(out["stage2"])).all()
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        segmenter.forward(np.zeros((1, 3, 32, 32), np.float32))


def test_checkpoint_of_another_config_is_refused_on_load(config_file, tmp_path):
    from mcibi_jax.porting.convert import PortError

    out = tmp_path / "ckpt"
    assert (
        port.main(
            [f"--config={config_file}:{CASE}", f"--pth={FIXTURES / CASE}.pth", f"--out={out}"]
        )
        == 0
    )
    config = mcibi_jax.load_config(f"{config_file}:{CASE}", ["model.num_classes=7"])
    with pytest.raises(
        PortError,
        match="memory_module/memory: checkpoint \\(5, 1, 16\\), model expects \\(7, 1, 16\\)",
    ):
        mcibi_jax.Segmenter.from_checkpoint(out, config)


def test_checkpoint_of_another_model_is_refused_in_a_few_lines(config_file, tmp_path):
    """The names and shapes are compared before orbax restores anything: its own error printed
    both whole trees (16 KB on one line for the released R-50)."""
    from mcibi_jax.porting.convert import PortError

    out = tmp_path / "ckpt"
    port.main([f"--config={config_file}:{CASE}", f"--pth={FIXTURES / CASE}.pth", f"--out={out}"])
    config = mcibi_jax.load_config(f"{config_file}:{CASE}", ["model.head.feats_channels=8"])
    with pytest.raises(PortError, match="model expects") as error:
        mcibi_jax.Segmenter.from_checkpoint(out, config)
    assert len(str(error.value)) < 3000 and "... and" in str(error.value)
    with pytest.raises(PortError, match="holds no checkpoint of variables"):
        mcibi_jax.Segmenter.from_checkpoint(tmp_path, config)
    (tmp_path / "model.pth").write_bytes(b"not a folder")
    with pytest.raises(PortError, match="is a file; a checkpoint of variables is a folder"):
        mcibi_jax.Segmenter.from_checkpoint(tmp_path / "model.pth", config)


def test_port_to_a_file_or_an_unwritable_folder_is_one_line(config_file, tmp_path, capsys):
    """Checked before orbax, which reported an unwritable folder from its threads with tracebacks
    and then waited on them for minutes."""
    import tempfile

    import orbax.checkpoint as ocp

    args = [f"--config={config_file}:{CASE}", f"--pth={FIXTURES / CASE}.pth"]
    (tmp_path / "file").write_text("")
    assert port.main([*args, f"--out={tmp_path / 'file'}"]) == 2
    assert "is a file; choose a new output directory" in capsys.readouterr().err

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(kwargs.get("dir")))

    def never(*args, **kwargs):
        raise AssertionError("orbax was asked to write")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "TemporaryFile", unwritable)
        patch.setattr(ocp, "StandardCheckpointer", never)
        assert port.main([*args, f"--out={tmp_path / 'ro' / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the checkpoint") and err.count("\n") == 1, err
    assert "Permission denied" in err
