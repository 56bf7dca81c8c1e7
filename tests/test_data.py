"""Input pipelines: the batch contract, determinism, process sharding and exact resume."""
import io
import json
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lcm_jax.data import DATASETS, digits, make_pipeline
from lcm_jax.data.pipeline import ArrayPipeline
from lcm_jax.data.webdataset import expand_braces, list_shards


def config(**fields):
    return ml_collections.ConfigDict(fields)


def take(pipeline, n):
    return [next(pipeline) for _ in range(n)]


def assert_same_batches(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def assert_resume_exact(make, n_batches, save_points):
    """Batches after restoring a state saved after k batches == the batches that followed it."""
    reference = make()
    states, batches = [], []
    for _ in range(n_batches):
        states.append(json.loads(json.dumps(reference.get_state())))  # must survive JSON
        batches.append(next(reference))
    for k in save_points:
        resumed = make()
        resumed.set_state(states[k])
        assert_same_batches(take(resumed, n_batches - k), batches[k:])
    return states, batches


def encode(array, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def solid(value, height=12, width=12):
    """A uniform image: its value identifies it after resizing and cropping."""
    return np.full((height, width, 3), value, np.uint8)


def pixel_ids(batch):
    """The uniform value of each image in a batch, back in [0, 255]."""
    return np.round((batch["image"][:, 0, 0, 0] + 1.0) * 127.5).astype(int)


# ---------------------------------------------------------------- digits + ArrayPipeline

def test_digits_batches_have_the_contract():
    pipeline = make_pipeline(config(name="digits", image_size=16, channels=3),
                             global_batch_size=32, seed=0)
    batch = next(pipeline)
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() < -0.9 and batch["image"].max() > 0.9  # real strokes on background
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))
    assert len(set(batch["label"])) > 3
    assert list(batch["caption"]) == [digits.caption(label) for label in batch["label"]]
    assert pipeline.num_skipped == 0


def test_digits_is_deterministic_for_a_seed():
    make = lambda seed: make_pipeline(config(name="digits"), global_batch_size=16, seed=seed)
    assert_same_batches(take(make(0), 3), take(make(0), 3))
    assert not np.array_equal(next(make(0))["label"], next(make(1))["label"])


def test_digits_splits_are_disjoint():
    train, train_labels = digits.load("train", 8, 1)
    test, _ = digits.load("test", 8, 1)
    assert (len(train), len(test)) == (1497, 300)
    assert len(set(train_labels)) == 10
    train_keys = {image.tobytes() for image in train}
    assert not train_keys & {image.tobytes() for image in test}


def small_array_pipeline(process_index=0, process_count=1, seed=3):
    arrays = {"x": np.arange(10, dtype=np.int32), "y": np.arange(10, dtype=np.float32) * 2}
    add_noise = lambda batch, rng: {**batch, "y": batch["y"] + rng.normal(size=batch["y"].shape)}
    return ArrayPipeline(arrays, global_batch_size=4, seed=seed, process_index=process_index,
                         process_count=process_count, transform=add_noise)


def test_array_pipeline_resume_is_exact():
    # 2 batches per epoch: batches 3..5 cross an epoch boundary.
    states, batches = assert_resume_exact(small_array_pipeline, 5, save_points=[2])
    assert states[2] == {"step": 2}
    epoch_0 = np.concatenate([b["x"] for b in batches[:2]])
    assert len(set(epoch_0)) == 8  # no repeats within an epoch


def test_array_pipeline_shards_each_global_batch_over_processes():
    whole = take(small_array_pipeline(), 4)
    parts = [take(small_array_pipeline(p, 2), 4) for p in range(2)]
    for step in range(4):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][step]["x"], parts[1][step]["x"]]), whole[step]["x"])


# ---------------------------------------------------------------- folder

@pytest.fixture
def image_folder(tmp_path):
    """8 images: 4 captioned by metadata.jsonl (2 in a subfolder), 2 by sidecar .txt, 1 with no
    caption, 1 corrupt. Image i is uniform with value 20 * (i + 1)."""
    (tmp_path / "sub").mkdir()
    names = ["a.png", "b.jpg", "sub/c.png", "sub/d.webp", "e.png", "f.png", "g.png"]
    for i, name in enumerate(names):
        # Non-square sizes exercise the shorter-side resize; JPEG keeps a flat grey exactly.
        fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]
        (tmp_path / name).write_bytes(encode(solid(20 * (i + 1), 12 + 4 * i, 12), fmt))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    lines = [{"file_name": "a.png", "text": "cap a"}, {"file_name": "b.jpg", "text": "cap b"},
             {"file_name": "c.png", "text": "cap c"}, {"file_name": "d.webp", "text": "cap d"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines[:2]))
    (tmp_path / "sub" / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines[2:]))
    (tmp_path / "e.txt").write_text("cap e\n")
    (tmp_path / "f.txt").write_text("cap f")
    return tmp_path


EXPECTED_FOLDER_CAPTIONS = {20: "cap a", 40: "cap b", 60: "cap c", 80: "cap d", 100: "cap e",
                            120: "cap f", 140: ""}


def test_folder_reads_metadata_and_sidecar_captions_and_skips_corrupt(image_folder):
    pipeline = make_pipeline(config(name="folder", path=str(image_folder), image_size=8),
                             global_batch_size=7, seed=0)
    assert pipeline.num_skipped == 1
    batch = next(pipeline)  # one batch is the whole (7-image) epoch
    assert batch["image"].shape == (7, 8, 8, 3) and batch["image"].dtype == np.float32
    assert "label" not in batch
    found = dict(zip(pixel_ids(batch), batch["caption"]))
    assert found == EXPECTED_FOLDER_CAPTIONS


def test_folder_caption_key_and_its_typo(tmp_path):
    (tmp_path / "x.png").write_bytes(encode(solid(50)))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "prompt": "hi"}))
    batch = next(make_pipeline(config(name="folder", path=str(tmp_path), image_size=8,
                                      caption_key="prompt"), global_batch_size=1, seed=0))
    assert list(batch["caption"]) == ["hi"]
    with pytest.raises(ValueError, match="config.data.caption_key='text'.*prompt"):
        make_pipeline(config(name="folder", path=str(tmp_path), image_size=8),
                      global_batch_size=1, seed=0)


def test_folder_missing_path_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="config.data.path=.*does not exist"):
        make_pipeline(config(name="folder", path=str(tmp_path / "nope"), image_size=8),
                      global_batch_size=1, seed=0)


def test_folder_random_crop_and_flip_are_deterministic_and_resume(tmp_path):
    gradient = np.broadcast_to(np.arange(24, dtype=np.uint8)[None, :, None] * 10, (16, 24, 3))
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(encode(np.ascontiguousarray(gradient + i)))
    make = lambda: make_pipeline(config(name="folder", path=str(tmp_path), image_size=16,
                                        random_crop=True, random_flip=True),
                                 global_batch_size=2, seed=0)
    _, batches = assert_resume_exact(make, 6, save_points=[1, 3])
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (12, 16, 16, 3)
    # Crops start at different columns and some are mirrored (values fall from left to right).
    assert len({round(float(im[0, 0, 0]), 4) for im in images}) > 2
    assert any(im[0, 0, 0] > im[0, -1, 0] for im in images)
    assert any(im[0, 0, 0] < im[0, -1, 0] for im in images)
    eval_batch = next(make_pipeline(config(name="folder", path=str(tmp_path), image_size=16,
                                           random_crop=True, random_flip=True),
                                    global_batch_size=2, seed=0, split="test"))
    centre_rows = [(10 * np.arange(4, 20) + i) / 127.5 - 1.0 for i in range(4)]  # columns 4..19
    for image in eval_batch["image"]:
        assert any(np.allclose(image[0, :, 0], row) for row in centre_rows)


# ---------------------------------------------------------------- tfds

@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A 40-example captioned, labelled image dataset built locally (nothing is downloaded).

    Example i: uniform image with value 5 * i + 10, label i % 4, caption "image i"; example 7
    holds undecodable bytes.
    """
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyCaptionedImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=4),
                "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40)}

        def _generate_examples(self, n):
            for i in range(n):
                image = io.BytesIO(b"garbage") if i == 7 else solid(5 * i + 10, 10 + i % 3, 12)
                yield i, {"image": image, "label": i % 4, "caption": f"image {i}"}

    data_dir = tmp_path_factory.mktemp("tfds")
    TinyCaptionedImages(data_dir=str(data_dir)).download_and_prepare()
    return config(name="tfds", tfds_name="tiny_captioned_images", data_dir=str(data_dir),
                  image_size=8, label_key="label", caption_key="caption", shuffle_buffer=16)


def test_tfds_batches_match_their_labels_and_captions(tiny_tfds):
    pipeline = make_pipeline(tiny_tfds, global_batch_size=13, seed=0)
    batches = take(pipeline, 3)  # the 39 decodable examples of the first epoch
    next(pipeline)  # 52 decodable examples need all of epoch 0 (and its corrupt example 7)
    assert 1 <= pipeline.num_skipped <= 2
    assert pipeline.get_state()["examples"] == 52 + pipeline.num_skipped
    batch = batches[0]
    assert batch["image"].shape == (13, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    indices = [int(c.split()[1]) for b in batches for c in b["caption"]]
    assert sorted(indices) == [i for i in range(40) if i != 7]
    for b in batches:
        ids = [int(c.split()[1]) for c in b["caption"]]
        np.testing.assert_array_equal(b["label"], [i % 4 for i in ids])
        np.testing.assert_array_equal(pixel_ids(b), [5 * i + 10 for i in ids])


def test_tfds_is_deterministic_and_resumes_exactly(tiny_tfds):
    make = lambda: make_pipeline(tiny_tfds, global_batch_size=6, seed=1)
    states, _ = assert_resume_exact(make, 9, save_points=[2, 7])  # 54 examples: crosses an epoch
    assert states[7]["examples"] >= 42
    other_seed = next(make_pipeline(tiny_tfds, global_batch_size=6, seed=2))
    assert list(other_seed["caption"]) != list(next(make())["caption"])


def test_tfds_processes_read_disjoint_halves(tiny_tfds):
    halves = [{c for b in take(make_pipeline(tiny_tfds, global_batch_size=8, seed=0,
                                              process_index=p, process_count=2), 2)
               for c in b["caption"]} for p in range(2)]
    assert all(len(h) == 8 for h in halves) and not halves[0] & halves[1]


# ---------------------------------------------------------------- webdataset

def write_tar(path, samples):
    """samples: [(key, {extension: bytes})] -> an img2dataset-style shard."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_shards(folder, n_shards=3, per_shard=7, bad=((0, 3), (2, 6))):
    """Sample (s, j) has value 10 * (7 * s + j) + 5 and caption "s-j" (in .txt for odd j, in
    .json always); the `bad` ones hold corrupt image bytes. Returns the decodable captions."""
    formats = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            ext = ("png", "jpg", "webp")[j % 3]
            image = b"\xff\xd8 corrupt" if (s, j) in bad else encode(
                solid(10 * (per_shard * s + j) + 5), formats[ext])
            files = {ext: image, "json": json.dumps({"caption": f"{s}-{j}"}).encode()}
            if j % 2:
                files["txt"] = f"{s}-{j}".encode()
            samples.append((f"{s:05d}{j:04d}", files))
        write_tar(folder / f"{s:05d}.tar", samples)
    return {f"{s}-{j}" for s in range(n_shards) for j in range(per_shard)} - {
        f"{s}-{j}" for s, j in bad}


def test_shard_patterns(tmp_path):
    write_shards(tmp_path)
    assert expand_braces("x{8..10}{a,b}") == ["x8a", "x8b", "x9a", "x9b", "x10a", "x10b"]
    by_brace = list_shards(f"{tmp_path}/{{00000..00002}}.tar")
    assert by_brace == list_shards(f"{tmp_path}/*.tar") and len(by_brace) == 3
    with pytest.raises(ValueError, match="config.data.path=.*matches no .tar shards"):
        list_shards(f"{tmp_path}/*.tgz")


def test_webdataset_epoch_covers_every_decodable_sample_once(tmp_path):
    captions = write_shards(tmp_path)
    pipeline = make_pipeline(config(name="webdataset", path=f"{tmp_path}/*.tar", image_size=8,
                                    shuffle_buffer=5), global_batch_size=1, seed=0)
    batches = take(pipeline, len(captions))
    seen = [str(b["caption"][0]) for b in batches]
    assert sorted(seen) == sorted(captions)
    for b in batches:  # each image is the one its caption names
        s, j = map(int, b["caption"][0].split("-"))
        assert pixel_ids(b)[0] == 10 * (7 * s + j) + 5
    assert seen != sorted(seen, key=lambda c: tuple(map(int, c.split("-"))))  # shuffled


def test_webdataset_skips_and_counts_corrupt_and_missing_images(tmp_path):
    good = lambda value: {"png": encode(solid(value)), "txt": str(value).encode()}
    write_tar(tmp_path / "00000.tar", [
        ("a", good(10)), ("b", {"jpg": b"\xff\xd8 corrupt", "txt": b"bad"}), ("c", good(30)),
        ("d", {"txt": b"caption without an image"}), ("e", good(50))])
    pipeline = make_pipeline(config(name="webdataset", path=str(tmp_path / "00000.tar"),
                                    image_size=8, shuffle_buffer=0), global_batch_size=3, seed=0)
    batch = next(pipeline)
    assert list(batch["caption"]) == ["10", "30", "50"] and pipeline.num_skipped == 2
    np.testing.assert_array_equal(pixel_ids(batch), [10, 30, 50])


def test_webdataset_resumes_exactly_across_shards_and_epochs(tmp_path):
    write_shards(tmp_path)
    data = config(name="webdataset", path=f"{tmp_path}/{{00000..00002}}.tar", image_size=8,
                  shuffle_buffer=5, random_flip=True, random_crop=True)
    make = lambda: make_pipeline(data, global_batch_size=4, seed=0)
    states, _ = assert_resume_exact(make, 12, save_points=range(12))  # 48 samples > one epoch
    cursors = {(s["epoch"], s["shard_cursor"]) for s in states}
    assert {(0, 0), (0, 1), (0, 2), (1, 0)} <= cursors  # saved inside every shard and epoch 1
    assert any(s["sample_offset"] not in (0, 5) for s in states)  # blocks that span two shards
    assert states[-1]["num_skipped"] >= 2


def test_webdataset_processes_read_disjoint_shards(tmp_path):
    write_shards(tmp_path, n_shards=4, per_shard=5, bad=())
    halves = [{c for b in take(make_pipeline(
        config(name="webdataset", path=f"{tmp_path}/*.tar", image_size=8, shuffle_buffer=3),
        global_batch_size=4, seed=0, process_index=p, process_count=2), 5) for c in b["caption"]}
        for p in range(2)]  # each process: 2 shards, 10 samples, 5 local batches of 2
    assert all(len(h) == 10 for h in halves) and not halves[0] & halves[1]


# ---------------------------------------------------------------- prefetch

def test_prefetch_gives_the_same_batches_and_exact_positions(tmp_path):
    """data.prefetch reads ahead in a thread but hands out, and resumes at, exactly the batches
    and positions of the plain pipeline (across shards, epochs and skipped samples)."""
    write_shards(tmp_path)
    fields = dict(name="webdataset", path=f"{tmp_path}/*.tar", image_size=8, shuffle_buffer=5,
                  random_flip=True)
    plain = make_pipeline(config(**fields), global_batch_size=4, seed=0)
    ahead = make_pipeline(config(**fields, prefetch=3), global_batch_size=4, seed=0)
    assert type(ahead).__name__ == "Prefetch"
    for _ in range(12):  # 48 samples: more than one epoch
        assert_same_batches([next(ahead)], [next(plain)])
        assert ahead.get_state() == plain.get_state()  # not the state of what was read ahead
        assert ahead.num_skipped == plain.num_skipped
    assert ahead.num_skipped >= 2
    ahead.close()  # rewinds what the thread read ahead: the next batch is still the plain one's
    assert_same_batches([next(ahead)], [next(plain)])
    ahead.close()
    assert_resume_exact(lambda: make_pipeline(config(**fields, prefetch=2), global_batch_size=4, seed=0),
                        9, save_points=(0, 4, 8))


def test_prefetch_raises_the_pipelines_errors_in_the_loop():
    from lcm_jax.data.prefetch import Prefetch

    class Failing:
        num_skipped, step = 0, 0

        def __next__(self):
            self.step += 1
            if self.step == 3:
                raise OSError("shard 7 is unreadable")
            return {"x": np.asarray([self.step])}

        def get_state(self):
            return {"step": self.step}

        def set_state(self, state):
            self.step = state["step"]

    pipeline = Prefetch(Failing(), depth=2)
    assert [int(next(pipeline)["x"][0]) for _ in range(2)] == [1, 2]
    with pytest.raises(OSError, match="shard 7"):
        next(pipeline)
    with pytest.raises(ValueError, match="config.data.prefetch"):
        Prefetch(Failing(), depth=-1)


# ---------------------------------------------------------------- registry

def test_unknown_dataset_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="config.data.name='imagenet'.*webdataset"):
        make_pipeline(config(name="imagenet", image_size=8), global_batch_size=4, seed=0)
    assert DATASETS == ("digits", "folder", "tfds", "webdataset")
