"""Fig. 4 (section 4.3): neighbour counts of networks fitting sinusoids of growing frequency."""
