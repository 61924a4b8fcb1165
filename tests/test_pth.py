import ast
import os
import pickle
import struct
import tracemalloc
import zipfile

import ml_dtypes
import numpy as np
import pytest

from mcibi_jax.porting.pth import PthError, load_checkpoint, load_state_dict, save_state_dict
from tests.reference_data import FIXTURES as REFERENCE_FIXTURES
from tests.reference_data import KEYS

FIXTURES = sorted(REFERENCE_FIXTURES.glob("*.pth"))

ALL_DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    ml_dtypes.bfloat16,
    np.int64,
    np.int32,
    np.int16,
    np.int8,
    np.uint8,
    np.bool_,
]


# --- a tiny hand-written pickle emitter, to build checkpoints the way torch lays them out ----------


class Tensor:
    """A ``_rebuild_tensor_v2`` record over storage ``key`` (a torch storage class name)."""

    def __init__(self, key, storage_class, numel, offset, size, stride, module="torch"):
        self.key, self.storage_class, self.numel, self.module = key, storage_class, numel, module
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)


def _emit(obj, out: bytearray, legacy: bool) -> None:
    if isinstance(obj, Tensor):
        out += b"ctorch._utils\n_rebuild_tensor_v2\n(("
        _emit("storage", out, legacy)
        out += f"c{obj.module}\n{obj.storage_class}\n".encode()
        for item in (obj.key, "cpu", obj.numel) + ((None,) if legacy else ()):
            _emit(item, out, legacy)
        out += b"tQ"
        for item in (obj.offset, obj.size, obj.stride, False):
            _emit(item, out, legacy)
        out += b"ccollections\nOrderedDict\n)RtR"
    elif isinstance(obj, dict):
        out += b"}"
        for key, value in obj.items():
            _emit(key, out, legacy)
            _emit(value, out, legacy)
            out += b"s"
    elif isinstance(obj, bool):
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        out += b"J" + struct.pack("<i", obj)
    elif isinstance(obj, float):
        out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        out += b"X" + struct.pack("<I", len(obj.encode())) + obj.encode()
    elif obj is None:
        out += b"N"
    elif isinstance(obj, tuple):
        out += b"("
        for item in obj:
            _emit(item, out, legacy)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]"
        for item in obj:
            _emit(item, out, legacy)
            out += b"a"
    else:
        raise TypeError(type(obj))


def dumps(obj, legacy=False) -> bytes:
    out = bytearray(b"\x80\x02")
    _emit(obj, out, legacy)
    return bytes(out + b".")


def write_zip(
    path,
    pickled: bytes,
    storages: dict,
    byteorder="little",
    root="archive",
    skip=(),
    compression=zipfile.ZIP_STORED,
):
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr(f"{root}/data.pkl", pickled)
        z.writestr(f"{root}/byteorder", byteorder)
        for key, data in storages.items():
            if key not in skip:
                z.writestr(f"{root}/data/{key}", data)
        z.writestr(f"{root}/version", "3\n")


def write_legacy(path, pickled: bytes, storages: dict):
    """``storages``: key -> (raw little-endian bytes, numel), written after the pickles like torch < 1.6."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(pickled)
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            data, numel = storages[key]
            f.write(struct.pack("<q", numel) + data)


def sample_state_dict(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "backbone_net.conv1.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "backbone_net.bn1.weight": rng.standard_normal(8).astype(np.float32),
        "backbone_net.bn1.running_var": rng.random(8).astype(np.float32),
        "backbone_net.bn1.num_batches_tracked": np.array(7, np.int64),
        "decoder_stage1.0.bias": rng.standard_normal(5).astype(np.float32),
    }


def assert_same(a, b):
    assert isinstance(a, np.ndarray) and a.flags.c_contiguous
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == np.asarray(b, order="C").tobytes()


# --- released-layout fixtures -----------------------------------------------------------------------


def _layout(case: str) -> dict[str, tuple[int, str]]:
    family, dataset = case.split("_", 1)
    (keys_file,) = KEYS.glob(f"{family}*_{dataset}.txt")
    layout = {}
    for line in keys_file.read_text().splitlines():
        if line.strip():
            name, shape, dtype = line.split("\t")
            layout[name] = (len(ast.literal_eval(shape)), dtype)
    return layout


@pytest.mark.skipif(not FIXTURES, reason="no reference fixtures")
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_checkpoints(path):
    ckpt = load_checkpoint(path)
    assert list(ckpt) == ["model"]
    sd = load_state_dict(path)
    assert sd and all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in sd.values())
    layout = _layout(path.stem)
    assert set(sd) <= set(layout)  # narrow/shallow variants of the released layout
    for key, value in sd.items():
        ndim, dtype = layout[key]
        assert (value.ndim, value.dtype.name) == (ndim, dtype), key
        assert value.dtype == (np.int64 if key.endswith(".num_batches_tracked") else np.float32)
    golden = np.load(path.with_suffix(".npz"))
    after = {
        k[len("state_after/") :]: golden[k].shape
        for k in golden.files
        if k.startswith("state_after/")
    }
    assert set(after) <= set(sd)
    assert all(k.endswith(".num_batches_tracked") for k in set(sd) - set(after))
    assert all(sd[k].shape == shape for k, shape in after.items())
    for key, value in sd.items():
        if key.endswith("running_var"):
            assert np.all(value > 0), key
        if value.dtype == np.float32:
            assert np.all(np.isfinite(value)), key


# --- round trips ------------------------------------------------------------------------------------


def test_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    sd = {}
    for dtype in ALL_DTYPES:
        name = np.dtype(dtype).name
        sd[f"{name}.matrix"] = (rng.standard_normal((3, 4)) * 50).astype(dtype)
        sd[f"{name}.scalar"] = np.array(1, dtype)
        sd[f"{name}.empty"] = np.zeros((0, 2), dtype)
    sd["view.transposed"] = np.arange(12, dtype=np.float32).reshape(3, 4).T
    sd["view.strided"] = np.arange(40, dtype=np.int64).reshape(5, 8)[::2, 1::3]
    sd["view.big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    sd.update({f"many.{i}": np.full(2, i, np.float32) for i in range(1100)})  # > one SETITEMS batch
    for wrap in ("model", "state_dict", None):
        path = tmp_path / f"rt_{wrap}.pth"
        save_state_dict(sd, path, wrap_key=wrap)
        back = load_state_dict(path)
        assert list(back) == list(sd)
        for key, value in sd.items():
            assert_same(back[key], value.astype(value.dtype.newbyteorder("=")))
        ckpt = load_checkpoint(path)
        assert isinstance(ckpt, dict) and (list(ckpt) == [wrap] if wrap else "many.0" in ckpt)


def test_writer_layout(tmp_path):
    path = tmp_path / "layout.pth"
    save_state_dict(sample_state_dict(), path)
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        names = z.namelist()
        assert names[0] == "layout/data.pkl"
        assert {"layout/byteorder", "layout/version", "layout/data/0", "layout/data/4"} <= set(
            names
        )
        for info in z.infolist():  # record data 64-byte aligned, like torch.save
            assert info.compress_type == zipfile.ZIP_STORED
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0


def test_results_are_writable_and_unshared(tmp_path):
    path = tmp_path / "w.pth"
    save_state_dict(sample_state_dict(), path)
    sd = load_state_dict(path)
    arrays = list(sd.values())
    assert all(a.flags.writeable for a in arrays)
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1 :])


# --- hand-built storages: strides, offsets, shared storages, byte order -----------------------------


def test_strided_views_on_shared_storage(tmp_path):
    storage = np.arange(24, dtype=np.float32)
    obj = {
        "model": {
            "whole": Tensor("0", "FloatStorage", 24, 0, (4, 6), (6, 1)),
            "transposed": Tensor("0", "FloatStorage", 24, 0, (6, 4), (1, 6)),
            "sliced": Tensor("0", "FloatStorage", 24, 2, (3, 4), (1, 5)),
            "expanded": Tensor("0", "FloatStorage", 24, 3, (2, 3), (0, 1)),
            "scalar": Tensor("0", "FloatStorage", 24, 23, (), ()),
            "empty": Tensor("0", "FloatStorage", 24, 0, (0, 5), (5, 1)),
            "ints": Tensor("1", "LongStorage", 3, 1, (2,), (1,), module="torch.cuda"),
        },
        "epoch": 12,
        "optimizer": {
            "state": {},
            "param_groups": [{"lr": 0.01, "params": [0, 1], "nesterov": False}],
        },
    }
    path = tmp_path / "views.pth"
    write_zip(
        path, dumps(obj), {"0": storage.tobytes(), "1": np.array([5, 6, 7], np.int64).tobytes()}
    )
    sd = load_state_dict(path)
    assert list(sd) == list(obj["model"])
    i, j = np.arange(3)[:, None], np.arange(4)[None, :]
    assert_same(sd["whole"], storage.reshape(4, 6))
    assert_same(sd["transposed"], storage.reshape(4, 6).T)
    assert_same(sd["sliced"], storage[2 + i * 1 + j * 5])
    assert_same(sd["expanded"], np.tile(storage[3:6], (2, 1)))
    assert_same(sd["scalar"], np.array(23, np.float32))
    assert_same(sd["empty"], np.zeros((0, 5), np.float32))
    assert_same(sd["ints"], np.array([6, 7], np.int64))
    arrays = list(sd.values())
    assert not any(np.shares_memory(a, b) for k, a in enumerate(arrays) for b in arrays[k + 1 :])
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 12 and ckpt["optimizer"]["param_groups"][0]["lr"] == 0.01


def test_big_endian_archive(tmp_path):
    values = np.arange(6, dtype=np.float64).reshape(2, 3) - 2.5
    obj = {
        "model": {
            "w": Tensor("0", "DoubleStorage", 6, 0, (3, 2), (1, 3)),
            "h": Tensor("1", "HalfStorage", 2, 0, (2,), (1,)),
        }
    }
    path = tmp_path / "big.pth"
    write_zip(
        path,
        dumps(obj),
        {"0": values.astype(">f8").tobytes(), "1": np.array([1.5, -2], ">f2").tobytes()},
        byteorder="big",
    )
    sd = load_state_dict(path)
    assert_same(sd["w"], values.T)
    assert_same(sd["h"], np.array([1.5, -2], np.float16))


def test_legacy_format(tmp_path):
    storage = np.arange(12, dtype=np.float32)
    obj = {
        "state_dict": {
            "module.a": Tensor("94", "FloatStorage", 12, 0, (3, 4), (4, 1)),
            "module.b": Tensor("94", "FloatStorage", 12, 1, (4, 2), (1, 4)),
            "module.c": Tensor("17", "LongStorage", 1, 0, (), ()),
        }
    }
    path = tmp_path / "legacy.pth"
    write_legacy(
        path,
        dumps(obj, legacy=True),
        {"94": (storage.tobytes(), 12), "17": (np.array([9], np.int64).tobytes(), 1)},
    )
    sd = load_state_dict(path)
    assert list(sd) == ["a", "b", "c"]
    assert_same(sd["a"], storage.reshape(3, 4))
    assert_same(sd["b"], storage[1 + np.arange(4)[:, None] + 4 * np.arange(2)[None, :]])
    assert_same(sd["c"], np.array(9, np.int64))
    truncated = tmp_path / "legacy_truncated.pth"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PthError, match="truncated"):
        load_state_dict(truncated)


# --- state_dict selection ---------------------------------------------------------------------------


def test_wrappers_prefix_and_entry(tmp_path):
    sd = sample_state_dict()
    for wrap in ("model", "state_dict", None):
        path = tmp_path / f"{wrap}.pth"
        save_state_dict({f"module.{k}": v for k, v in sd.items()}, path, wrap_key=wrap)
        back = load_state_dict(path)
        assert list(back) == list(sd)
        for key in sd:
            assert_same(back[key], sd[key])
    mixed = tmp_path / "mixed.pth"
    save_state_dict(
        {"module.a": sd["decoder_stage1.0.bias"], "b": sd["decoder_stage1.0.bias"]}, mixed
    )
    assert list(load_state_dict(mixed)) == [
        "module.a",
        "b",
    ]  # prefix stripped only when on every key

    ema = tmp_path / "ema.pth"
    save_state_dict(sd, ema, wrap_key="model_ema")
    assert list(load_state_dict(ema, entry="model_ema")) == list(sd)
    with pytest.raises(PthError, match="entry="):
        load_state_dict(ema)
    with pytest.raises(PthError, match="no entry 'model'"):
        load_state_dict(ema, entry="model")

    both = tmp_path / "both.pth"
    write_zip(
        both,
        dumps(
            {
                "model": {"x": Tensor("0", "FloatStorage", 1, 0, (), ())},
                "model_ema": {"x": Tensor("1", "FloatStorage", 1, 0, (), ())},
                "epoch": 3,
            }
        ),
        {"0": np.float32(1).tobytes(), "1": np.float32(2).tobytes()},
    )
    assert load_state_dict(both)["x"] == 1 and load_state_dict(both, entry="model_ema")["x"] == 2


# --- refusals and errors ----------------------------------------------------------------------------


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_System, _Eval])
@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_pickle_is_refused(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    pickled = pickle.dumps({"model": {"w": payload(marker)}}, protocol=protocol)
    path = tmp_path / "evil.pth"
    write_zip(path, pickled, {})
    with pytest.raises(
        PthError,
        match=r"refusing to load .*evil\.pth: it references (posix\.system|builtins\.eval)",
    ):
        load_checkpoint(path)
    legacy = tmp_path / "evil_legacy.pth"
    write_legacy(legacy, pickled, {})
    with pytest.raises(PthError, match="refusing to load"):
        load_state_dict(legacy)
    assert not marker.exists()


def test_loader_objects_cannot_be_modified(tmp_path):
    # BUILD with (None, {"__defaults__": ({"neg": True},)}) on a rebuild function would
    # silently negate every tensor of later loads if the loader handed out its own functions.
    tamper = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__"
        b"}X\x03\x00\x00\x00neg\x88s\x85s\x86b."
    )
    path = tmp_path / "tamper.pth"
    write_zip(path, tamper, {})
    with pytest.raises(
        PthError, match="refusing to load .*tries to modify torch._utils._rebuild_tensor_v2"
    ):
        load_checkpoint(path)
    good = tmp_path / "good.pth"
    save_state_dict({"w": np.arange(3, dtype=np.float32)}, good)
    assert_same(load_state_dict(good)["w"], np.arange(3, dtype=np.float32))


def test_unsupported_torch_global(tmp_path):
    path = tmp_path / "q.pth"
    write_zip(path, b"\x80\x02ctorch._utils\n_rebuild_qtensor\n.", {})
    with pytest.raises(PthError, match="torch._utils._rebuild_qtensor"):
        load_checkpoint(path)


def test_bad_files(tmp_path):
    good = tmp_path / "good.pth"
    save_state_dict(sample_state_dict(), good)
    data = good.read_bytes()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "garbage.pth": b"this is not a checkpoint at all" * 10,
        "empty.pth": b"",
        "plain_pickle.pth": pickle.dumps({"a": 1}),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PthError, match=name.replace(".", r"\.")):
            load_checkpoint(tmp_path / name)
    with pytest.raises(PthError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")

    no_record = tmp_path / "no_record.pth"
    write_zip(
        no_record,
        dumps({"w": Tensor("0", "FloatStorage", 4, 0, (4,), (1,))}),
        {"0": b""},
        skip=("0",),
    )
    with pytest.raises(PthError, match="data/0 is missing"):
        load_checkpoint(no_record)

    overrun = tmp_path / "overrun.pth"
    write_zip(
        overrun, dumps({"w": Tensor("0", "FloatStorage", 4, 1, (2, 2), (2, 1))}), {"0": bytes(16)}
    )
    with pytest.raises(PthError, match="past the end"):
        load_checkpoint(overrun)

    no_pickle = tmp_path / "no_pickle.pth"
    with zipfile.ZipFile(no_pickle, "w") as z:
        z.writestr("archive/version", "3\n")
    with pytest.raises(PthError, match="no data.pkl"):
        load_checkpoint(no_pickle)

    corrupt = bytearray(data)
    with zipfile.ZipFile(good) as z:
        offset = z.getinfo("good/data/0").header_offset
    name_len, extra_len = struct.unpack("<HH", corrupt[offset + 26 : offset + 30])
    corrupt[offset + 30 + name_len + extra_len] ^= 0xFF  # first byte of the first storage
    (tmp_path / "corrupt.pth").write_bytes(bytes(corrupt))
    with pytest.raises(PthError, match="checksum mismatch in good/data/0"):
        load_checkpoint(tmp_path / "corrupt.pth")

    with pytest.raises(PthError, match="dtype object"):
        save_state_dict({"x": np.array([None])}, tmp_path / "obj.pth")


# --- hostile files: no attribute tampering, no allocation on the file's say -------------------------


def patch_entry(path, name, file_size=None, compress_size=None, header_offset=None):
    """Rewrites the sizes / offset a zip declares for record ``name`` (central directory and local header)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        local, pos = z.getinfo(name).header_offset, z.start_dir
    while data[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        if data[pos + 46 : pos + 46 + n].decode() == name:
            for offset, value in ((20, compress_size), (24, file_size), (42, header_offset)):
                if value is not None:
                    struct.pack_into("<I", data, pos + offset, value)
        pos += 46 + n + m + k
    for offset, value in ((18, compress_size), (22, file_size)):
        if value is not None and header_offset is None:
            struct.pack_into("<I", data, local + offset, value)
    path.write_bytes(bytes(data))


def load_with_peak(path, loader=load_checkpoint):
    """(result or PthError, peak bytes traced while loading)."""
    tracemalloc.start()
    try:
        try:
            result = loader(path)
        except PthError as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


FOUR_FLOATS = {"model": {"w": Tensor("0", "FloatStorage", 4, 0, (4,), (1,))}}


@pytest.mark.parametrize("state", ["slots", "dict"])
def test_build_cannot_empty_an_ordered_dict(tmp_path, state):
    # OrderedDict(w=...), then BUILD shadowing its keys()/items() with set(): an OrderedDict
    # stand-in would then look empty to everything that reads it.
    pickled = bytearray(b"\x80\x02}X\x05\x00\x00\x00modelccollections\nOrderedDict\n)R")
    _emit("w", pickled, False)
    _emit(FOUR_FLOATS["model"]["w"], pickled, False)
    pickled += b"s"
    shadow = b"}X\x04\x00\x00\x00keyscbuiltins\nset\nsX\x05\x00\x00\x00itemscbuiltins\nset\ns"
    pickled += (b"N" + shadow + b"\x86b" if state == "slots" else shadow + b"b") + b"s."
    path = tmp_path / "tamper.pth"
    write_zip(path, bytes(pickled), {"0": np.arange(4, dtype=np.float32).tobytes()})
    assert type(load_checkpoint(path)["model"]) is dict
    assert_same(load_state_dict(path)["w"], np.arange(4, dtype=np.float32))


def test_ordered_dict_metadata_is_dropped(tmp_path):
    # torch pickles a state_dict as OrderedDict + BUILD {'_metadata': ...}; it reads as a plain dict.
    pickled = bytearray(b"\x80\x02}X\x05\x00\x00\x00modelccollections\nOrderedDict\n)R")
    _emit("w", pickled, False)
    _emit(FOUR_FLOATS["model"]["w"], pickled, False)
    pickled += (
        b"s}X\t\x00\x00\x00_metadata}sbsX\x04\x00\x00\x00list]ccollections\nOrderedDict\n)Ras."
    )
    path = tmp_path / "metadata.pth"
    write_zip(path, bytes(pickled), {"0": np.arange(4, dtype=np.float32).tobytes()})
    ckpt = load_checkpoint(path)
    assert type(ckpt["model"]) is dict and not hasattr(ckpt["model"], "_metadata")
    assert type(ckpt["model"]["w"]) is np.ndarray and type(ckpt["list"][0]) is dict


def test_build_on_a_container_is_refused(tmp_path):
    path = tmp_path / "build_list.pth"
    write_zip(path, b"\x80\x02]}X\x01\x00\x00\x00aJ\x01\x00\x00\x00sb.", {})
    with pytest.raises(PthError, match="refusing to load .*tries to set attributes"):
        load_checkpoint(path)


def test_bytearray_cannot_allocate(tmp_path):
    path = tmp_path / "bytearray.pth"
    # bytearray(256 MiB)
    write_zip(path, b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x10\x85R.", {})
    result, peak = load_with_peak(path)
    assert isinstance(result, PthError) and "unsupported bytearray call" in str(result)
    assert peak < 16 << 20
    ok = tmp_path / "bytearray_ok.pth"
    write_zip(ok, pickle.dumps([bytearray(b"ab"), bytearray()], protocol=2), {})
    assert load_checkpoint(ok) == [bytearray(b"ab"), bytearray()]


def test_zip_bomb_member_is_not_inflated(tmp_path):
    # A storage record that honestly declares 64 MiB of zeros where the pickle needs 16 bytes.
    path = tmp_path / "bomb.pth"
    write_zip(path, dumps(FOUR_FLOATS), {"0": bytes(64 << 20)}, compression=zipfile.ZIP_DEFLATED)
    result, peak = load_with_peak(path)
    assert isinstance(result, PthError) and "holds 67108864 bytes, but the pickle needs 16" in str(
        result
    )
    assert peak < 8 << 20


def test_zip_bomb_member_lying_about_its_size(tmp_path):
    # The same bomb declaring the 16 bytes the pickle needs: inflation stops there.
    path = tmp_path / "liar.pth"
    write_zip(path, dumps(FOUR_FLOATS), {"0": bytes(64 << 20)}, compression=zipfile.ZIP_DEFLATED)
    patch_entry(path, "archive/data/0", file_size=16)
    result, peak = load_with_peak(path)
    assert isinstance(result, PthError) and "cannot decompress archive/data/0" in str(result)
    assert peak < 8 << 20


def test_impossible_compression_ratio_is_refused(tmp_path):
    # Pickle and record agree on 1 GiB, but 16 compressed bytes cannot inflate to that.
    obj = {"model": {"w": Tensor("0", "FloatStorage", 1 << 28, 0, (4,), (1,))}}
    path = tmp_path / "ratio.pth"
    write_zip(path, dumps(obj), {"0": bytes(16)}, compression=zipfile.ZIP_DEFLATED)
    patch_entry(path, "archive/data/0", file_size=1 << 30)
    result, peak = load_with_peak(path)
    assert isinstance(result, PthError) and "more than deflate can" in str(result)
    assert peak < 8 << 20


def test_oversized_pickle_record_is_refused(tmp_path):
    path = tmp_path / "big_pickle.pth"
    write_zip(path, dumps(FOUR_FLOATS), {"0": bytes(16)}, compression=zipfile.ZIP_DEFLATED)
    patch_entry(path, "archive/data.pkl", file_size=1 << 30)
    with pytest.raises(PthError, match="refusing to load .*data.pkl claims 1073741824 bytes"):
        load_checkpoint(path)


def test_storage_size_must_match_its_record(tmp_path):
    path = tmp_path / "sizes.pth"
    write_zip(path, dumps(FOUR_FLOATS), {"0": bytes(32)})
    with pytest.raises(PthError, match="archive/data/0 holds 32 bytes, but the pickle needs 16"):
        load_checkpoint(path)


def test_storage_size_checked_against_the_file_before_allocation(tmp_path):
    # Pickle and zip directory both claim a 2 GiB storage; the file holds 16 bytes of it.
    obj = {"model": {"w": Tensor("0", "FloatStorage", 1 << 29, 0, (4,), (1,))}}
    path = tmp_path / "claims.pth"
    write_zip(path, dumps(obj), {"0": bytes(16)})
    patch_entry(path, "archive/data/0", file_size=1 << 31, compress_size=1 << 31)
    result, peak = load_with_peak(path)
    assert isinstance(result, PthError) and "truncated inside archive/data/0" in str(result)
    assert peak < 8 << 20

    legacy = tmp_path / "claims_legacy.pth"
    write_legacy(legacy, dumps(obj, legacy=True), {"0": (bytes(16), 1 << 29)})
    result, peak = load_with_peak(legacy)
    assert isinstance(result, PthError)
    assert "truncated inside storage 0 (2147483648 bytes declared, 16 left in the file)" in str(
        result
    )
    assert peak < 8 << 20


def test_overlapping_records_are_refused(tmp_path):
    # Two storages whose directory entries point at the same bytes (N of them would multiply memory).
    obj = {
        "model": {
            "a": Tensor("0", "FloatStorage", 4, 0, (4,), (1,)),
            "b": Tensor("1", "FloatStorage", 4, 0, (4,), (1,)),
        }
    }
    path = tmp_path / "overlap.pth"
    write_zip(path, dumps(obj), {"0": bytes(16), "1": bytes(16)})
    with zipfile.ZipFile(path) as z:
        first = z.getinfo("archive/data/0").header_offset
    patch_entry(path, "archive/data/1", header_offset=first)
    with pytest.raises(PthError, match="refusing to load .*archive/data/1 overlaps another record"):
        load_checkpoint(path)


def test_broadcast_views_cannot_multiply_memory(tmp_path):
    # One stored float viewed as 2**26 elements (stride 0): a 256 MiB copy from a 4-byte storage.
    obj = {"model": {"w": Tensor("0", "FloatStorage", 1, 0, (1 << 26,), (0,))}}
    path = tmp_path / "broadcast.pth"
    write_zip(path, dumps(obj), {"0": np.float32(1).tobytes()})
    result, peak = load_with_peak(path)
    assert isinstance(result, PthError) and "refusing to load" in str(result)
    assert "would take 268435456 bytes" in str(result)
    assert peak < 8 << 20
    legacy = tmp_path / "broadcast_legacy.pth"
    write_legacy(legacy, dumps(obj, legacy=True), {"0": (np.float32(1).tobytes(), 1)})
    with pytest.raises(PthError, match="would take 268435456 bytes"):
        load_checkpoint(legacy)
    # tied weights (two tensors on one storage) still load
    tied = tmp_path / "tied.pth"
    storage = np.arange(6, dtype=np.float32)
    write_zip(
        tied,
        dumps(
            {
                "model": {
                    "a": Tensor("0", "FloatStorage", 6, 0, (2, 3), (3, 1)),
                    "b": Tensor("0", "FloatStorage", 6, 0, (2, 3), (3, 1)),
                }
            }
        ),
        {"0": storage.tobytes()},
    )
    sd = load_state_dict(tied)
    assert_same(sd["a"], storage.reshape(2, 3))
    assert_same(sd["b"], storage.reshape(2, 3))
