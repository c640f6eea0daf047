"""Fig. 5 (section 5): the MNIST speed-up from a similarity-enforcing criterion."""
