"""Model loading, the built-in digits default, image folders and target selection."""

import os

import pytest
import torch

from advfast import data
from advfast.io import datasets, models, selection
from fixtures import Constant, write_images


@pytest.fixture(scope="session")
def digits_model():
    return models.load("digits")


def test_digits_split_is_fixed_and_in_range():
    x_train, y_train = data.digits("train")
    x_test, y_test = data.digits("test")
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_test.min() >= 0 and x_test.max() <= 1 and x_test.max() > 0.9
    assert torch.equal(data.digits("test")[0], x_test)
    assert set(y_test.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        data.digits("validation")


def test_digits_model_is_95_percent_accurate_on_the_test_split(digits_model):
    images, labels = data.digits("test")
    with torch.no_grad():
        accuracy = (digits_model(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95


def test_digits_model_is_cached_and_reloads_to_the_same_outputs(digits_model):
    path = os.path.join(models.cache_dir(), models.DIGITS_FILE)
    assert os.path.isfile(path)
    again = models.load("digits", weights=path)
    x, _ = data.digits("test")
    torch.testing.assert_close(again(x[:8]), digits_model(x[:8]))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_torchvision_model_from_local_weights(tmp_path, suffix):
    model = models.load("resnet18", num_classes=7)
    path = str(tmp_path / f"weights{suffix}")
    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)
    loaded = models.load("resnet18", weights=path, num_classes=7)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training


# ImageNet's per-channel statistics, as torchvision documents them for its weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def test_torchvision_model_normalises_its_input_before_the_network():
    """The loaded model takes images in [0, 1]: its output is the bare network's on
    (x - mean) / std with ImageNet's statistics, not on x."""
    model = models.load("resnet18", num_classes=5)
    bare = model.model
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = bare((x - mean) / std)
        unnormalised = bare(x)
        got = model(x)
    assert not torch.allclose(expected, unnormalised, atol=1e-3)  # so the check can tell
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,weights,match", [("resnet9000", None, "unknown model"),
                                                ("resnet18", "NOT_A_WEIGHT", "weights name")])
def test_unknown_model_or_weights_name_is_refused(name, weights, match):
    with pytest.raises(ValueError, match=match):
        models.load(name, weights=weights)


def test_class_subfolders_are_labelled_in_sorted_order(tmp_path):
    write_images(tmp_path / "b_class", 2)
    write_images(tmp_path / "a_class", 3)
    ds = datasets.ImageFiles(str(tmp_path), transform=datasets.imagenet_eval_transform(8))
    assert len(ds) == 5
    assert [ds[i].label for i in range(5)] == [0, 0, 0, 1, 1]  # classes in sorted order
    assert ds[0].image.shape == (3, 8, 8) and 0 <= ds[0].image.min() <= ds[0].image.max() <= 1


def test_flat_folder_with_labels_csv_and_corrupt_image(tmp_path):
    paths = write_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = ["filename,label"] + [f"{os.path.basename(p)},{i + 4}" for i, p in enumerate(paths)]
    (tmp_path / "labels.csv").write_text("\n".join(rows + ["broken.png,1"]) + "\n")
    ds = datasets.ImageFiles(str(tmp_path), transform=datasets.imagenet_eval_transform(8))
    assert [ds[i].label for i in range(4)] == [4, 5, 6, 1]
    assert ds[3].image is None and "unreadable" in ds[3].reason  # reported, not raised
    source = selection.source_for(Constant(), str(tmp_path), image_size=8)
    chosen = selection.select(Constant(), source, None, batch_size=2)
    assert [r["index"] for r in chosen.work] == [1] and chosen.work[0]["label"] == 5
    assert [r["path"] for r in chosen.skipped] == [str(tmp_path / "broken.png")]


def test_missing_folder_a_file_and_bad_labels_csv_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.ImageFiles(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        datasets.ImageFiles(str(tmp_path / "file"))
    (tmp_path / "labels.csv").write_text("filename,label\na.png,cat\n")
    with pytest.raises(ValueError, match="filename,label"):
        datasets.ImageFiles(str(tmp_path))
    (tmp_path / "labels.csv").write_text("a.png,1\nb.png,2\na.png,3\n")
    with pytest.raises(ValueError, match="listed twice"):
        datasets.ImageFiles(str(tmp_path))


def test_labels_csv_with_bom_and_out_of_range_labels(tmp_path):
    paths = write_images(tmp_path, 2)
    names = [os.path.basename(p) for p in paths]
    (tmp_path / "labels.csv").write_bytes(f"\ufeff{names[0]},1\n{names[1]},2\n".encode())
    ds = datasets.ImageFiles(str(tmp_path), transform=datasets.imagenet_eval_transform(8))
    assert ds[0].image is not None and ds[0].label == 1  # the BOM is not part of the name
    with pytest.raises(ValueError, match="label 2, outside the model's classes"):
        datasets.ImageFiles(str(tmp_path), num_classes=2)


def test_bad_files_are_skipped_with_their_name(tmp_path):
    from PIL import Image

    write_images(tmp_path / "a", 1)
    Image.new("L", (20000, 20000)).save(tmp_path / "a" / "bomb.png")  # 400 MP: a bomb
    odd = os.fsencode(str(tmp_path / "a")) + b"/caf\xe9.png"
    with open(odd, "wb") as f:
        f.write((tmp_path / "a" / "img0.png").read_bytes())
    ds = datasets.ImageFiles(str(tmp_path), transform=datasets.imagenet_eval_transform(8))
    by_reason = {os.path.basename(ds[i].path): ds[i].reason for i in range(len(ds))}
    assert "DecompressionBomb" in by_reason["bomb.png"]
    assert by_reason["caf\\xe9.png"] == "file name is not valid UTF-8"
    assert by_reason["img0.png"] == ""


def test_grey_model_reads_colour_files_as_grey(tmp_path):
    write_images(tmp_path / "cls", 2)
    source = selection.source_for(Constant(channels=1), str(tmp_path), image_size=8)
    assert source[0].image.shape == (1, 8, 8)


def test_prepare_keeps_index_order_and_n_and_only_correct_predictions(digits_model):
    source = selection.DigitsSource("test")
    chosen, skipped = selection.prepare(digits_model, source, 50, seed=0, batch_size=16)
    idx = chosen.index
    assert len(idx) == 50 and torch.all(idx[1:] > idx[:-1]) and not skipped
    images, labels = data.digits("all")
    assert torch.equal(labels[idx], chosen.labels) and torch.equal(images[idx], chosen.images)
    with torch.no_grad():
        assert torch.equal(digits_model(chosen.images).argmax(1), chosen.labels)


def test_random_target_is_seeded_keyed_by_index_and_never_the_label():
    labels = torch.randint(0, 10, (1000,)).tolist()
    t1 = [selection.random_target(i, y, 10, seed=3) for i, y in enumerate(labels)]
    assert t1 == [selection.random_target(i, y, 10, seed=3) for i, y in enumerate(labels)]
    assert t1 != [selection.random_target(i, y, 10, seed=4) for i, y in enumerate(labels)]
    assert all(t != y and 0 <= t <= 9 for t, y in zip(t1, labels))
    assert len(set(t1)) == 10


def test_digits_source_uses_the_held_out_split_in_index_order(digits_model):
    source = selection.DigitsSource("test")
    indices = [source.index_of(k) for k in range(len(source))]
    assert len(indices) == 360 and indices == sorted(indices)
    assert set(indices) == set(datasets.digits_split_indices("test").tolist())
    assert not set(indices) & set(datasets.digits_split_indices("train").tolist())
    images, labels = data.digits("all")
    sample = source[7]
    assert torch.equal(sample.image, images[sample.index]) and sample.label == labels[sample.index]
    chosen = selection.select(digits_model, source, 20, seed=1)
    for row in chosen.work:
        assert row["target"] == selection.random_target(row["index"], row["label"], 10, 1)
