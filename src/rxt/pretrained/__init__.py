"""Pretrained decoders from elsewhere, as rxt models.

gguf     ``rxt import gguf FILE --out DIR``: a llama-layout GGUF file as a StatelessLM directory
parity   the imported model's logits against transformers' own GGUF loading of the same file
"""
