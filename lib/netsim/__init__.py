"""netsim: input similarity from the neural network's perspective.

A reproduction and extension of Charpiat, Girard, Felardos & Tarabalka, "Input Similarity
from the Neural Network Perspective" (NeurIPS 2019). Two inputs are similar to a network
when a parameter step that moves the output at one moves the output at the other: the
kernels compare per-sample parameter gradients.

    >>> import torch, netsim
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    >>> x = torch.randn(100, 2)
    >>> k = netsim.similarity(net, x)            # (100, 100) k^C, ones on the diagonal
    >>> n_s = netsim.soft_density(net, x)       # (100,) soft neighbour counts, no 100x100 matrix

Data may be a tensor, a Dataset, a DataLoader or any iterable of batches (`netsim.data`), and
`params=` picks the parameters the kernels differentiate against (`netsim.params`).
"""

from importlib import metadata as _metadata

try:   # the installed distribution's version, recorded in index manifests
    __version__ = _metadata.version("netsim")
except _metadata.PackageNotFoundError:   # a source tree on sys.path, not installed
    __version__ = "0+unknown"

from . import data, engine, outputs, params
from .by_module import similarity_by_module
from .checks import NonFiniteError
from .density import counts_from_kernel, neighbour_counts, soft_density
from .grads import iter_jacobians, num_parameters, output_jvp, per_sample_grads, trainable_parameters
from .index import SimilarityIndex
from .kernel import ZeroGradientError, psd_power, similarity, similarity_from_jacobians
from .layerwise import without_inplace
from .store import CorruptIndexError

__all__ = [
    "CorruptIndexError",
    "NonFiniteError",
    "SimilarityIndex",
    "ZeroGradientError",
    "counts_from_kernel",
    "data",
    "engine",
    "iter_jacobians",
    "neighbour_counts",
    "num_parameters",
    "output_jvp",
    "outputs",
    "params",
    "per_sample_grads",
    "psd_power",
    "similarity",
    "similarity_by_module",
    "similarity_from_jacobians",
    "soft_density",
    "trainable_parameters",
    "without_inplace",
]
