"""Hugging Face `transformers` models trained here on real data that ships offline (notebook 07,
`bench/hf_index.py`): a ViT on MNIST and a small GPT-2 language model on the Python documentation
of the standard library, with a byte-level BPE tokenizer trained here (`tokenizers`). No hub is used."""
