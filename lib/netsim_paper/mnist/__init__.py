"""Fig. 5 (section 5): the MNIST speed-up from a similarity-enforcing criterion.

`data` (MNIST, downloaded and checksummed), `speedup` (the paired-run protocol and its training),
`summary` (the curves' numbers), `paper` (Fig. 5's digitised values) and `config` (the smoke /
paper settings of notebook 03).
"""
