"""Grain input pipelines on small in-memory sources and a tiny ADE20K layout."""

from __future__ import annotations

import json
import logging
import textwrap

import numpy as np
import pytest
from PIL import Image

from mcibi_jax.data import pipeline
from mcibi_jax.data.datasets import IGNORE_LABEL, CorruptSample
from mcibi_jax.data.transforms import resized_shape
from tests.helpers import PIPELINE_CROP, run_python, small_ade20k_config, write_ade20k

ShardOptions = pipeline.grain.sharding.ShardOptions
SIZES = [(37, 53), (29, 41), (50, 23), (31, 31), (22, 47), (45, 38), (19, 26), (40, 60)]


class IdentitySource:
    """Odd-sized random images whose label is the sample's index everywhere (so it survives
    augmentation); the indices in ``corrupt`` raise CorruptSample like an unreadable file."""

    def __init__(self, sizes=SIZES, corrupt=(), seed=0):
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]
        self.corrupt = set(corrupt)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if index in self.corrupt:
            raise CorruptSample(
                f"/data/bad/{index}.jpg", "cannot decode image: truncated", f"img{index}"
            )
        image = self.images[index]
        return {
            "image": image,
            "label": np.full(image.shape[:2], index, np.int32),
            "id": f"img{index}",
        }

    def __repr__(self):
        return f"IdentitySource({len(self)})"


def identities(batch):
    """The source index of each row of a batch of IdentitySource samples."""
    out = []
    for label in batch["label"]:
        values = np.unique(label[label != IGNORE_LABEL])
        assert len(values) == 1
        out.append(int(values[0]))
    return out


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_have_the_crop_shape_and_dtypes():
    loader = pipeline.train_loader(small_ade20k_config(), source=IdentitySource(), num_workers=0)
    assert loader.batch_size == 4 and loader.shape == (PIPELINE_CROP, PIPELINE_CROP)
    batch = next(iter(loader))
    assert set(batch) == {"image", "label"}
    assert (
        batch["image"].shape == (4, PIPELINE_CROP, PIPELINE_CROP, 3)
        and batch["image"].dtype == np.float32
    )
    assert (
        batch["label"].shape == (4, PIPELINE_CROP, PIPELINE_CROP)
        and batch["label"].dtype == np.int32
    )
    assert np.isfinite(batch["image"]).all() and abs(float(batch["image"].mean())) < 3  # normalised


def test_epochs_are_reshuffled_permutations_and_the_seed_decides():
    source = IdentitySource()
    config = small_ade20k_config(batch_size=8)
    a = take(iter(pipeline.train_loader(config, source=source, num_workers=0)), 3)
    b = take(iter(pipeline.train_loader(config, source=source, num_workers=0)), 3)
    assert_same_batches(a, b)
    epochs = [identities(batch) for batch in a]  # batch == epoch here
    assert all(sorted(e) == list(range(8)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3
    c = next(iter(pipeline.train_loader(config, source=source, num_workers=0, seed=1)))
    assert identities(c) != epochs[0] or not np.array_equal(c["image"], a[0]["image"])


def test_worker_and_thread_counts_do_not_change_the_batches():
    source = IdentitySource()
    config = small_ade20k_config()
    expected = take(
        iter(pipeline.train_loader(config, source=source, num_workers=0, num_threads=0)), 3
    )
    assert_same_batches(
        take(iter(pipeline.train_loader(config, source=source, num_workers=0, num_threads=3)), 3),
        expected,
    )
    with iter(pipeline.train_loader(config, source=source, num_workers=2, num_threads=2)) as it:
        assert_same_batches(take(it, 3), expected)


def test_two_hosts_read_disjoint_halves_of_the_single_host_stream():
    source = IdentitySource()
    single = take(
        iter(
            pipeline.train_loader(small_ade20k_config(batch_size=4), source=source, num_workers=0)
        ),
        2,
    )
    hosts = []
    for h in range(2):
        loader = pipeline.train_loader(
            small_ade20k_config(batch_size=4),
            source=source,
            num_workers=0,
            shard_options=ShardOptions(shard_index=h, shard_count=2, drop_remainder=True),
        )
        assert loader.batch_size == 2
        hosts.append(take(iter(loader), 2))
    seen = [sum((identities(b) for b in batches), []) for batches in hosts]
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(8))
    # host h holds the single-host stream's positions h, h + 2, ...: the same samples, same augmentation
    stream = {k: np.concatenate([b[k] for b in single]) for k in ("image", "label")}
    for h, batches in enumerate(hosts):
        for k in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([b[k] for b in batches]), stream[k][h::2])


def test_resume_from_saved_state_reproduces_the_next_batches():
    source = IdentitySource(corrupt={5})
    config = small_ade20k_config(batch_size=3)
    original = iter(pipeline.train_loader(config, source=source, num_workers=0))
    take(original, 2)
    state = json.loads(json.dumps(pipeline.iterator_state(original)))  # as a checkpoint stores it
    expected = take(original, 4)
    resumed = pipeline.restore_iterator(
        pipeline.train_loader(config, source=source, num_workers=0), state
    )
    assert_same_batches(take(resumed, 4), expected)
    assert resumed.skipped == original.skipped
    with pipeline.restore_iterator(
        pipeline.train_loader(config, source=source, num_workers=2), state
    ) as it:
        assert_same_batches(take(it, 2), expected[:2])  # the worker count may change on resume
    with pytest.raises(ValueError, match="seed: saved 0, now 7"):
        pipeline.restore_iterator(
            pipeline.train_loader(config, source=source, num_workers=0, seed=7), state
        )


def test_a_corrupt_sample_is_skipped_counted_and_logged(caplog):
    source = IdentitySource(corrupt={3})
    before = pipeline.skipped_count()
    it = iter(
        pipeline.train_loader(small_ade20k_config(batch_size=7), source=source, num_workers=0)
    )
    with caplog.at_level(logging.WARNING, logger="mcibi_jax.data.pipeline"):
        batch = next(it)  # positions 0..7 = the first epoch, one of them unreadable
    assert sorted(identities(batch)) == [0, 1, 2, 4, 5, 6, 7]
    assert it.skipped == 1 and pipeline.skipped_count() == before + 1
    assert pipeline.skipped_files()["/data/bad/3.jpg"] >= 1
    assert "/data/bad/3.jpg" in caplog.text and "truncated" in caplog.text
    assert it.get_state()["position"] == 8


def test_global_batch_must_divide_over_hosts():
    with pytest.raises(ValueError, match=r"batch_size=5 .* not divisible by the 2 hosts"):
        pipeline.train_loader(
            small_ade20k_config(batch_size=5),
            source=IdentitySource(),
            num_workers=0,
            shard_options=ShardOptions(shard_index=1, shard_count=2),
        )


def test_eval_items_are_whole_samples_sharded_without_dropping():
    source = IdentitySource(sizes=SIZES[:5], corrupt={2})
    config = small_ade20k_config()
    items = []
    for h in range(2):
        loader = pipeline.eval_loader(
            config,
            source=source,
            num_workers=0,
            shard_options=ShardOptions(shard_index=h, shard_count=2),
        )
        assert len(loader) == 3
        items.append(list(loader))
        assert len(items[-1]) == 3
    assert [i["index"] for i in items[0]] == [0, 2, 4] and [i["index"] for i in items[1]] == [
        1,
        3,
        0,
    ]
    assert [bool(i["valid"][0]) for i in items[1]] == [
        True,
        True,
        False,
    ]  # padding: a repeated sample
    assert not items[0][1]["valid"][0]  # the corrupt one, as a placeholder
    valid = [i for host in items for i in host if i["valid"][0]]
    assert sorted(i["index"] for i in valid) == [0, 1, 3, 4]
    for item in valid:
        h, w = SIZES[item["index"]]
        assert item["label"].shape == (1, h, w) and item["label"].dtype == np.int32
        assert (item["label"] == item["index"]).all()
        assert item["image"].shape == (1, *resized_shape((h, w), (64, 32), True), 3)
        assert item["image"].dtype == np.float32 and item["id"] == f"img{item['index']}"
    with_workers = list(
        pipeline.eval_loader(
            config,
            source=source,
            num_workers=2,
            shard_options=ShardOptions(shard_index=0, shard_count=2),
        )
    )
    for a, b in zip(with_workers, items[0]):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["index"] == b["index"] and a["valid"] == b["valid"]


def test_ade20k_layout_with_an_unreadable_jpeg(tmp_path, caplog):
    ids = write_ade20k(tmp_path)
    base = tmp_path / "ADEChallengeData2016"
    bad = base / "images" / "training" / "ADE_train_00000003.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    label_file = base / "annotations" / "training" / "ADE_train_00000003.png"
    Image.fromarray(np.ones((6, 6), np.uint8), mode="L").save(label_file)
    config = small_ade20k_config(batch_size=2, root=tmp_path)
    loader = pipeline.train_loader(config, num_workers=0)  # build_source(config.dataset, "train")
    assert len(loader.source) == 3
    it = iter(loader)
    with caplog.at_level(logging.WARNING, logger="mcibi_jax.data.pipeline"):
        batches = take(it, 3)  # 6 samples from 3 epochs of 3, of which 2 usable each
    assert all(
        b["image"].shape == (2, PIPELINE_CROP, PIPELINE_CROP, 3)
        and b["label"].shape == (2, PIPELINE_CROP, PIPELINE_CROP)
        for b in batches
    )
    labels = np.concatenate([b["label"] for b in batches])
    assert labels.max() < 150 and labels[labels != IGNORE_LABEL].min() >= 0
    assert it.skipped == 3 and str(bad) in caplog.text
    items = list(pipeline.eval_loader(config, num_workers=0))  # config.dataset.eval_set = "val"
    assert [i["id"] for i in items] == ids["val"] and items[0]["label"].shape == (1, 9, 6)


def test_global_batch_shards_the_batch_axis(tmp_path):
    script = textwrap.dedent("""
        import jax, numpy as np
        from mcibi_jax.sharding import global_batch
        mesh = jax.make_mesh((2,), ("data",))
        batch = {"image": np.arange(4 * 3 * 2 * 3, dtype=np.float32).reshape(4, 3, 2, 3),
                 "label": np.arange(4 * 3 * 2, dtype=np.int32).reshape(4, 3, 2)}
        out = global_batch(batch, mesh)
        for k, v in out.items():
            assert v.shape == batch[k].shape and v.dtype == batch[k].dtype, (k, v.shape)
            assert v.sharding.spec == jax.sharding.PartitionSpec("data")
            assert [s.data.shape[0] for s in v.addressable_shards] == [2, 2]
            np.testing.assert_array_equal(np.asarray(v), batch[k])
        try:
            global_batch({"label": np.zeros((3, 2), np.int32)}, mesh)
        except ValueError as e:
            assert "multiple of 2" in str(e), e
        else:
            raise AssertionError("no error for 3 rows over 2 devices")
        print("ok")
    """)
    result = run_python(script, devices=2, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_a_source_with_nothing_usable_stops_with_an_error():
    it = iter(
        pipeline.train_loader(
            small_ade20k_config(batch_size=2),
            source=IdentitySource(SIZES[:2], corrupt={0, 1}),
            num_workers=0,
        )
    )
    with pytest.raises(RuntimeError, match="3 samples in a row could not be used"):
        next(it)
