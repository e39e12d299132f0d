"""Training the small byte-level MoE language models that moecc ships (moecc/trained/).

corpus.py builds the text (Python standard library sources and their English
docstrings), recipes.py fixes the model configurations and hyperparameters, train.py
runs the seeded training loop and writes the model folder with its card. Nothing here
runs at import time; CI runs a few steps only (tests/test_training.py).
"""
