"""netsim_paper: the reproduction of Charpiat, Girard, Felardos & Tarabalka, "Input Similarity
from the Neural Network Perspective" (NeurIPS 2019), built on the `netsim` library.

Grouped by experiment, each with its protocol, data and the paper's digitised values:

- `sinusoid`: Fig. 4, neighbour counts on the sinusoid task (and the tour's toy model);
- `mnist`: Fig. 5, the MNIST speed-up from enforcing similarity;
- `registration`: Figs. 1-2 (self-denoising of misaligned cadasters) and Figs. 6-7 (what the
  registration network finds similar), on synthetic aerial scenes.

Beside them, the repository's tooling: `config` (smoke / paper profiles), `cache`,
`runtime`, `plotting`, `stats`, `runner` (papermill) and `report` (README tables).
"""
