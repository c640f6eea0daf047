"""Fig. 4 (section 4.3): neighbour counts of networks fitting sinusoids of growing frequency.

`data` (the task, its network, ensembles of runs), `stacked` (many networks trained as one),
`counts` (Fig. 4's estimators, slopes and kernel variants), `paper` (what the paper reports) and
`config` (the smoke / paper settings of notebooks 00 and 02).
"""
