"""Training code for the tiny model: the training forward equals the inference forward, optimisation
lowers the loss, runs are deterministic and resume exactly, and the export loads."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dgserve.model.checkpoint import init_random_, load
from dgserve.model.config import TINY_RANDOM, ModelConfig, TextConfig
from dgserve.model.diffusion_gemma import DiffusionGemma
from dgserve.model.kv import ContiguousKV, Segment
from dgserve.model.tokenizer_build import TINY_CORPUS
from dgserve.train.data import END_OF_TURN, EOS, TrainingData, build_tokenizer, sort_answer, sort_prompt
from dgserve.train.forward import denoise, enable_training, encode_prefix, lm_logits, soft_embeddings
from dgserve.train.objective import corrupt, denoising_loss
from dgserve.train.trainer import TrainConfig, Trainer, export

# A very small model so optimisation tests take seconds: sliding + full layers, 4 experts top-2.
SMALL = ModelConfig(
    text=TextConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, global_head_dim=16, num_global_key_value_heads=1,
        layer_types=("sliding_attention", "full_attention"), num_experts=4, top_k_experts=2,
        moe_intermediate_size=16, eos_token_id=(EOS, END_OF_TURN)),
    canvas_length=16, image_token_id=5,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 OpenMP threads spin badly when the machine's 2 cores are shared; these tests are small anyway
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _random_model(cfg: ModelConfig, seed: int = 0) -> DiffusionGemma:
    model = DiffusionGemma(cfg)
    init_random_(model, seed, std=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms and scales away from 1 so they matter
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def data(tok_dir) -> TrainingData:
    """A tokenizer and corpus built from text in the repository (no corpus packages needed)."""
    paragraphs = [p.replace("\n", " ") for p in TINY_CORPUS.split("\n\n")]
    chapters = [[s.strip() + "." for s in p.split(". ") if s.strip()] for p in paragraphs]
    conversations = [["Hello", "Hi, how are you?", "Fine, thanks.", "Good to hear."],
                     ["What is the capital of France?", "The capital of France is Paris."]]
    tok = build_tokenizer(chapters, conversations, 512, tok_dir)
    return TrainingData(tok, chapters * 50, conversations, canvas=SMALL.canvas_length, max_prefix=32)


def test_training_forward_equals_inference_forward():
    cfg = TINY_RANDOM  # 4 layers, sliding window 16, GQA sliding layers, K=V full layers, 8 experts top-2
    model = _random_model(cfg)
    t = cfg.text
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 40, 17, 1])  # shorter and longer than the sliding window, and BOS alone
    p, c = int(lengths.max()), cfg.canvas_length
    prefix = torch.randint(3, t.vocab_size, (len(lengths), p), generator=gen)
    canvas = torch.randint(0, t.vocab_size, (len(lengths), c), generator=gen)
    prev_logits = torch.randn(len(lengths), c, t.vocab_size, generator=gen) * 3

    enable_training(model)
    kv = encode_prefix(model, prefix, lengths)
    soft = soft_embeddings(model, torch.softmax(prev_logits, -1))
    train_sc = lm_logits(model, denoise(model, canvas, kv, soft))
    train_first = lm_logits(model, denoise(model, canvas, kv, None))
    assert train_sc.requires_grad
    model.eval()
    for b, n in enumerate(lengths.tolist()):
        cache = ContiguousKV(t.num_hidden_layers, [t.is_sliding(i) for i in range(t.num_hidden_layers)],
                             t.sliding_window)
        model(prefix[b, p - n:], [Segment("encode", 0, n, 0)], cache)
        cache.trim()
        seg = [Segment("denoise", 0, c, n)]
        ref_sc = model.logits(model(canvas[b], seg, cache, model.soft_embeddings(torch.softmax(prev_logits[b], -1))))
        ref_first = model.logits(model(canvas[b], seg, cache, None))
        torch.testing.assert_close(train_sc[b].detach(), ref_sc, rtol=0, atol=1e-5)
        torch.testing.assert_close(train_first[b].detach(), ref_first, rtol=0, atol=1e-5)


def test_gradients_reach_every_parameter(data):
    model = enable_training(_random_model(SMALL))
    batch = data.sample(random.Random(0), 8)[0]
    loss = denoising_loss(model, batch, corrupt(batch.canvas, 512, torch.Generator().manual_seed(0)), True)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def _cfg(**kw) -> TrainConfig:
    base = dict(model=SMALL, batch_size=8, steps=6, lr=3e-3, warmup_steps=2, max_prefix=32, checkpoint_every=3)
    return TrainConfig(**{**base, **kw})


def _heldout(trainer: Trainer, data: TrainingData) -> float:
    rng = random.Random(7)
    batches = data.sample(rng, 32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return sum(float(denoising_loss(trainer.model, b, corrupt(b.canvas, 512, gen), False)) for b in batches)


def test_a_few_steps_reduce_the_loss(tmp_path, data):
    trainer = Trainer(_cfg(steps=40), tmp_path, data)
    before = _heldout(trainer, data)
    trainer.run(progress=False)
    after = _heldout(trainer, data)
    assert after < before - 1.0, (before, after)


def test_deterministic_and_resume_is_exact(tmp_path, data):
    straight = Trainer(_cfg(), tmp_path / "a", data)
    straight.run(progress=False)
    again = Trainer(_cfg(), tmp_path / "b", data)
    again.run(until=3, progress=False)  # checkpoint at step 3, then "crash"
    resumed = Trainer(_cfg(), tmp_path / "b", data)
    assert resumed.step == 3
    resumed.run(progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.history[-1]["loss"] == resumed.history[-1]["loss"]
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(_cfg(lr=1e-3), tmp_path / "b", data)


def test_sort_rows_have_the_expected_layout(data):
    ex = data.sort_example(random.Random(3), heldout=True, chat=False)
    prefix, canvas = data.row(ex, random.Random(0))
    text = data.tok.decode(prefix)
    digits = [int(d) for d in text.split("sort ")[1].split("\n")[0].split()]
    assert text == sort_prompt(digits)
    answer = data.tok.encode(sort_answer(digits), add_bos=False)
    assert canvas[:len(answer) + 1] == [*answer, EOS]
    assert set(canvas[len(answer) + 1:]) <= {0}


def test_export_is_a_loadable_hf_checkpoint(tmp_path, data, tok_dir):
    trainer = Trainer(_cfg(steps=1), tmp_path / "work", data)
    trainer.run(progress=False)
    out = export(trainer.model, tok_dir, tmp_path / "ckpt", extra={"note": "test"})
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "diffusion_gemma" and "text_config" in raw and "vision_config" in raw
    loaded = load(out)
    assert loaded.config == SMALL
    assert loaded.generation.eos_token_ids == (EOS, END_OF_TURN)
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 512
    ref = trainer.model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.model.state_dict().items())
