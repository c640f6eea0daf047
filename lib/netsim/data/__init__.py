"""Data sets of the experiments: the sinusoid toy problem, MNIST, synthetic aerial scenes."""
