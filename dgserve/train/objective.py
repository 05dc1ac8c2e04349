"""The uniform-state renoising objective, the one the entropy-bound sampler is built for.

For each row: draw a noise level ``t ~ U(0, 1]``, replace each canvas position independently with
probability ``t`` by a uniform random token (it may coincide with the clean one), and train the
decoder - with the clean prompt prefix encoded causally as K/V - to predict the *clean* canvas with
cross-entropy at **every** canvas position. All positions, not only the corrupted ones, because at
inference the model cannot tell which tokens are noise: the sampler keeps accepted tokens, renoises
the rest uniformly, and finally commits the argmax of every position, so the model must both
denoise corrupted tokens and confirm (or correct) the ones that look clean.

Self-conditioning: on half of the batches a first decoder pass (no gradient, zero self-conditioning
input, as at the sampler's first step) gives logits; their soft embeddings
``softmax(logits / T) @ E x sqrt(H)`` - what ``engine.sampler.vocab_pass`` feeds the next step - are
the second pass's self-conditioning input, detached. ``T`` is the sampler's temperature at the point
of its linear schedule matching the noise level, ``t_min + (t_max - t_min) * t``: early, noisy steps
run hot, late ones cool, as in the sampler.

Other choices: the canvas target after the text's stop token (``<eos>``, or ``<end_of_turn>`` for chat
answers) is ``<pad>``, trained like any other position (the sampler cuts at the stop token, so what
follows only has to be confidently boring); the prompt prefix is clean (no noise) and at most
``max_prefix`` tokens; gradients reach the encoder only through the K/V the canvas reads - there is no
separate autoregressive loss on the prefix (DiffusionGemma's encoder is never asked for next-token
predictions at inference, only for K/V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.train.data import Batch
from dgserve.train.forward import denoise, encode_prefix, lm_logits, soft_embeddings


@dataclass
class NoiseDraw:
    t: torch.Tensor  # [B] noise level in (0, 1]
    noisy: torch.Tensor  # [B, C] corrupted canvas

    def to(self, device: torch.device) -> NoiseDraw:
        return NoiseDraw(self.t.to(device), self.noisy.to(device))


def corrupt(canvas: torch.Tensor, vocab: int, gen: torch.Generator, t: torch.Tensor | None = None) -> NoiseDraw:
    b, c = canvas.shape
    if t is None:
        t = 1.0 - torch.rand(b, generator=gen)  # (0, 1]
    hit = torch.rand(b, c, generator=gen) < t[:, None]
    noise = torch.randint(0, vocab, (b, c), generator=gen)
    return NoiseDraw(t=t, noisy=torch.where(hit, noise, canvas))


def denoising_loss(model: DiffusionGemma, batch: Batch, draw: NoiseDraw, self_condition: bool,
                   t_min: float = 0.4, t_max: float = 0.8) -> torch.Tensor:
    """Mean cross-entropy of the clean canvas over all canvas positions of the batch."""
    prefix = encode_prefix(model, batch.prefix, batch.lengths)
    soft = None
    if self_condition:
        with torch.no_grad():
            first = lm_logits(model, denoise(model, draw.noisy, prefix.detach(), None))  # [B, C, V]
            temp = (t_min + (t_max - t_min) * draw.t)[:, None, None]
            soft = soft_embeddings(model, torch.softmax(first / temp, dim=-1, dtype=torch.float32))
    logits = lm_logits(model, denoise(model, draw.noisy, prefix, soft))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.canvas.reshape(-1))
