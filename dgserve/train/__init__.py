"""Training for small DiffusionGemma-architecture models (the shipped ``tiny`` checkpoint).

``forward``: a differentiable forward reusing the model's modules; ``objective``: uniform-state
renoising with self-conditioning; ``data``: corpora, tokenizer, synthetic task, batches; ``trainer``:
the resumable loop and the Hugging Face export; ``evaluate``: held-out loss, task accuracy, speed.
"""
