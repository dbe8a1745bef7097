"""Adapters users bring beside a base checkpoint: LoRA / LoCon / LoHa / LoKr files and textual-
inversion embeddings, read without torch, applied merged or at run time (weights as data)."""
