"""DiffusionGemma's reference sampler as pure functions over one canvas.

Per denoising step (``cur_step`` counts the steps *remaining*, N..1): logits / temperature (linear
schedule t_max -> t_min), a multinomial "denoiser canvas", entropy-bound acceptance of the
lowest-entropy tokens, uniform renoising of the rest, adaptive stopping (argmax canvas stable and
mean entropy below a threshold). The vocabulary-sized work (LM head, softmax, sampling, entropy,
self-conditioning soft embeddings) is done in row chunks so no ``[canvas, vocab]`` tensor of the
whole canvas, let alone of a batch, is ever held. The random stream of a request's generator is
consumed in the reference's order: randint (initial canvas), then per step multinomial over the
canvas rows followed by randint (renoising).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgserve.engine.denoising import EntropyBound
from dgserve.engine.sampling_filters import ACCEPTANCE_ENTROPY, RowFilters, filtered_logits, top_logprobs
from dgserve.engine.sampling_noise import sample_with_noise
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.generation_config import SamplingParams

# Rows of logits per chunk are chosen so one chunk's vocabulary-sized temporaries (logits, probs,
# entropy terms, the multinomial's exponential draws) stay around this many fp32 elements.
CHUNK_ELEMENTS = 1 << 22
ENTROPY_BOUND = EntropyBound()


def default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def temperature(cur_step: int, params: SamplingParams) -> float:
    """Linear schedule: t_max at the first step (cur_step = N), approaching t_min at the last.

    Computed as the reference computes it, in fp32 tensor arithmetic (``cur_step`` an int32 tensor), not
    in Python doubles: the two roundings differ by one ulp at some steps (N = 16: steps 2, 3 and 12), which
    shifts every logit by an ulp and, over a large vocabulary, changes which token has the lowest entropy.
    The returned float is exactly that fp32 value."""
    step = torch.tensor(cur_step, dtype=torch.int32)
    return float(params.t_min + ((params.t_max - params.t_min) * (step / params.max_denoising_steps)))


def random_canvas(length: int, vocab: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=gen, device=gen.device).to(device)


@dataclass
class StepOutput:
    canvas: torch.Tensor  # [C] next canvas (accepted tokens kept, the rest renoised)
    argmax: torch.Tensor  # [C] argmax of this step's logits (the committed canvas if the loop stops here)
    entropy: torch.Tensor  # [C] fp32 per-token entropy of the temperature-scaled logits
    soft: torch.Tensor  # [C, H] self-conditioning input for the next step
    accepted: torch.Tensor  # [C] bool
    sample: torch.Tensor | None = None  # [C] the denoiser's sample (kept where accepted)
    logprobs: VocabPass | None = None  # with logprobs: the step's log-probabilities (VocabPass fields)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of Categorical(logits=...) exactly as torch.distributions computes it."""
    norm = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(norm, dim=-1)
    return -(norm.clamp(min=torch.finfo(norm.dtype).min) * probs).sum(-1)


@dataclass
class VocabPass:
    sample: torch.Tensor  # [C] the denoiser's sample
    argmax: torch.Tensor  # [C] argmax of the sampling distribution
    entropy: torch.Tensor  # [C] the entropy acceptance and stopping read (sampling_filters.ACCEPTANCE_ENTROPY)
    soft: torch.Tensor  # [C, H] self-conditioning input for the next step
    # with logprobs: the sample's log-probability under the sampling distribution, and its top alternatives
    logprob: torch.Tensor | None = None  # [C]
    argmax_logprob: torch.Tensor | None = None  # [C] the argmax's log-probability
    top_ids: torch.Tensor | None = None  # [C, TOP_LOGPROBS]
    top_logprobs: torch.Tensor | None = None  # [C, TOP_LOGPROBS]


def vocab_pass(model: DiffusionGemma, hidden: torch.Tensor, temp: float, gen: torch.Generator,
               chunk_rows: int, noise: torch.Tensor | None = None, greedy: bool = False,
               filters: RowFilters | None = None, logprobs: bool = False) -> VocabPass:
    """LM head + sampling + entropy + soft embeddings for one canvas, ``chunk_rows`` rows at a time.

    ``noise``: the ``[C, V]`` Exp(1) draws ``torch.multinomial`` would take from ``gen`` for this canvas,
    drawn ahead of time (``dgserve.engine.sampling_noise``); None: multinomial draws them now.
    ``greedy``: the sample is the argmax and nothing is drawn from ``gen``.
    ``filters``: the request's sampling filters (None: none, the reference's arithmetic unchanged); the sample and
    the argmax come from the filtered distribution, the soft embeddings from the unfiltered one.
    """
    samples, argmaxes, entropies, softs, lps, alps, tids, tlps = [], [], [], [], [], [], [], []
    for i in range(0, hidden.shape[0], chunk_rows):
        logits = model.logits(hidden[i:i + chunk_rows])
        processed = logits / temp  # [c, V] fp32
        sampled = processed
        if filters is not None:
            sampled = filtered_logits(logits, temp, filters.rows(i, i + chunk_rows))
        del logits
        probs = torch.softmax(sampled, dim=-1, dtype=torch.float32)
        sample_probs = probs if probs.device == gen.device else probs.to(gen.device)
        if greedy:
            sample = sampled.argmax(dim=-1)
        elif noise is not None:
            sample = sample_with_noise(sample_probs, noise[i:i + chunk_rows])
        else:
            sample = torch.multinomial(sample_probs, 1, generator=gen).squeeze(-1)
        sample = sample.to(hidden.device)
        samples.append(sample)
        argmax = sampled.argmax(dim=-1)
        argmaxes.append(argmax)
        entropies.append(token_entropy(sampled if ACCEPTANCE_ENTROPY == "filtered" else processed))
        if logprobs:
            logp = torch.log_softmax(sampled, dim=-1)
            lps.append(logp.gather(1, sample[:, None]).squeeze(1))
            alps.append(logp.gather(1, argmax[:, None]).squeeze(1))
            ids, values = top_logprobs(logp)
            tids.append(ids)
            tlps.append(values)
            del logp
        if filters is not None:
            probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
        if model.dtype != torch.float32:
            # the reference feeds the logits, cast to the embedding dtype, to the next step's softmax
            probs = torch.softmax(processed.to(model.dtype), dim=-1, dtype=torch.float32)
        softs.append(model.soft_embeddings(probs))
        del processed, probs, sample_probs, sampled, argmax
    out = VocabPass(torch.cat(samples), torch.cat(argmaxes), torch.cat(entropies), torch.cat(softs))
    if logprobs:
        out.logprob, out.argmax_logprob = torch.cat(lps), torch.cat(alps)
        out.top_ids, out.top_logprobs = torch.cat(tids), torch.cat(tlps)
    return out


def accept_and_renoise(canvas: torch.Tensor, sample: torch.Tensor, entropy: torch.Tensor, entropy_bound: float,
                       vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy-bound acceptance: take the k lowest-entropy tokens with sum(H) - max(H) <= bound;
    renoise every other position with a uniform random token. Returns (next canvas, accepted mask)."""
    accepted = ENTROPY_BOUND.accept(entropy, entropy_bound)
    kept = torch.where(accepted, sample, canvas)
    noise = random_canvas(canvas.shape[0], vocab, gen, canvas.device)
    return torch.where(accepted, kept, noise), accepted


def denoise_step(model: DiffusionGemma, hidden: torch.Tensor, canvas: torch.Tensor, cur_step: int,
                 params: SamplingParams, gen: torch.Generator, chunk_rows: int | None = None,
                 noise: torch.Tensor | None = None, filters: RowFilters | None = None,
                 logprobs: bool = False) -> StepOutput:
    chunk_rows = chunk_rows or default_chunk_rows(model.config.text.vocab_size)
    if filters is None and params.filtered:  # the request's filters (the engine passes min_tokens' suppression too)
        filters = RowFilters.for_canvas(params, hidden.shape[0], 0, (), hidden.device)
    vp = vocab_pass(model, hidden, temperature(cur_step, params), gen, chunk_rows, noise, params.greedy, filters,
                    logprobs)
    new_canvas, accepted = accept_and_renoise(canvas, vp.sample, vp.entropy, params.entropy_bound,
                                              model.config.text.vocab_size, gen)
    return StepOutput(canvas=new_canvas, argmax=vp.argmax, entropy=vp.entropy, soft=vp.soft, accepted=accepted,
                      sample=vp.sample, logprobs=vp if logprobs else None)


class StabilityTracker:
    """Adaptive stopping for one canvas (the algorithm's ``stable_run`` / ``stop`` on the host's side of the
    exact path): the argmax canvas equals each of the last ``stability_threshold`` argmax canvases and the
    mean entropy is below ``confidence_threshold``."""

    def __init__(self, params: SamplingParams) -> None:
        enabled = params.stability_threshold is not None and params.confidence_threshold is not None
        self.threshold = torch.tensor(params.stability_threshold if enabled else -1)
        self.confidence = torch.tensor(params.confidence_threshold if enabled else 0.0)
        self.run = torch.tensor(0)
        self.previous: torch.Tensor | None = None

    def update(self, argmax: torch.Tensor, entropy: torch.Tensor) -> bool:
        if self.threshold < 0:
            return False
        if self.previous is not None:
            self.run = ENTROPY_BOUND.stable_run(argmax.cpu(), self.previous, self.run, torch.tensor(True))
        self.previous = argmax.cpu()
        return bool(ENTROPY_BOUND.stop(self.run, entropy.cpu(), self.threshold, self.confidence))


def first_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> int | None:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return i
    return None
