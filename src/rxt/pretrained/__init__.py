"""Pretrained decoders from elsewhere, as rxt models.

gguf     ``rxt import gguf FILE --out DIR``: a llama-layout GGUF file as a StatelessLM directory
parity   the imported model's logits against transformers' own GGUF loading of the same file
reactive ReactivePretrained: an imported decoder with memory cross-attention, memory path and STM;
         the new weights ship as an adapter that names its base by sha256
"""
