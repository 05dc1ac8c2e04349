"""The vision side against the reference on CPU fp32: transformers' Gemma 4 image processor (PIL backend) and
DiffusionGemma's vision tower + projector (``get_image_features``), with a random checkpoint written by
``save_pretrained``; and the vision weights' loading checks, including ``vision: off``.
"""

from __future__ import annotations

import json
import shutil

import hf_oracle
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dgserve.model.checkpoint import CheckpointError, load
from dgserve.model.image_processing import ImageProcessor
from dgserve.model.vision_checkpoint import VisionCheckpointError, parameter_bytes

SPEC = hf_oracle.VISION_SPECS["vision"]
# (width, height, mode): landscape, portrait, square, a wide strip whose height rounds to 0 patches (the
# reference's one-pooled-row case), a 1x1 image (upscaled), palette, greyscale and transparent images
IMAGES = [(64, 48, "RGB"), (20, 90, "RGBA"), (56, 56, "P"), (1000, 3, "L"), (1, 1, "RGB"), (333, 200, "LA")]


def _image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7 + height)
    # smooth structure plus noise, so resampling filters matter
    yy, xx = np.mgrid[0:height, 0:width]
    base = (np.sin(xx / 5.0 + seed)[..., None] * 60 + np.cos(yy / 7.0)[..., None] * 60 + 128)
    rgba = np.clip(base + rng.normal(0, 30, (height, width, 4)), 0, 255).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


def _processor(path) -> ImageProcessor:
    loaded = load(path)
    assert loaded.vision is not None
    return ImageProcessor(loaded.vision.spec.processor)


@pytest.mark.parametrize(("width", "height", "mode"), IMAGES)
def test_preprocessing_equals_reference_processor(vision_reference, width, height, mode):
    _, path = vision_reference
    image = _image(width, height, mode)
    ref = hf_oracle.reference_image_processor(SPEC)(images=[image], return_tensors="pt")
    ours = _processor(path)
    processed = ours.preprocess(image)
    pixel_values, positions = ours.batch([processed])
    assert processed.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0])
    assert pixel_values.dtype == ref["pixel_values"].dtype and positions.dtype == ref["image_position_ids"].dtype
    assert torch.equal(pixel_values, ref["pixel_values"])
    assert torch.equal(positions, ref["image_position_ids"])


def test_image_features_equal_reference(vision_reference):
    ref_model, path = vision_reference
    loaded = load(path)
    ours = ImageProcessor(loaded.vision.spec.processor)
    images = [_image(w, h, m) for w, h, m in IMAGES[:4]]
    ref_inputs = hf_oracle.reference_image_processor(SPEC)(images=images, return_tensors="pt")
    with torch.no_grad():
        expected = ref_model.model.encoder.get_image_features(
            ref_inputs["pixel_values"], ref_inputs["image_position_ids"]).pooler_output
    processed = [ours.preprocess(image) for image in images]
    features = loaded.vision.tower(*ours.batch(processed))
    assert features.shape == expected.shape == (sum(p.num_soft_tokens for p in processed), SPEC.text["hidden_size"])
    assert float(expected.abs().mean()) > 0.1  # the projector's output is not degenerate
    # same operations in the same order as the reference: equal, not just within 1e-5
    torch.testing.assert_close(features, expected, rtol=0, atol=0)

    # an image's features do not depend on the other images of its batch
    alone = torch.cat([loaded.vision.tower(*ours.batch([p])) for p in reversed(processed)])
    reordered = torch.cat(list(reversed(torch.split(features, [p.num_soft_tokens for p in processed]))))
    assert torch.equal(alone, reordered)


def test_content_hash_is_what_the_model_sees(vision_reference):
    _, path = vision_reference
    ours = _processor(path)
    a = _image(64, 48, "RGB", seed=1)
    b = _image(64, 48, "RGB", seed=2)
    assert ours.preprocess(a).content_hash == ours.preprocess(a.copy()).content_hash
    assert ours.preprocess(a).content_hash != ours.preprocess(b).content_hash
    # the same picture with an alpha channel that is fully opaque is the same input
    assert ours.preprocess(a).content_hash == ours.preprocess(a.convert("RGBA")).content_hash


def test_vision_off_loads_no_vision_weights(vision_reference):
    _, path = vision_reference
    on = load(path, vision="auto")
    off = load(path, vision="off")
    assert off.vision is None and on.vision is not None
    with safe_open(path / "model.safetensors", framework="pt") as f:
        names = f.keys()
        stored = {k: f.get_slice(k) for k in names if k.startswith(("model.encoder.vision_tower.",
                                                                     "model.encoder.embed_vision."))}
        vision_bytes = sum(int(np.prod(s.get_shape(), dtype=np.int64)) * 4 for s in stored.values())
    assert vision_bytes > 0
    assert parameter_bytes(on.vision) == vision_bytes

    def resident(loaded) -> int:
        tensors = list(loaded.model.state_dict().values())
        if loaded.vision is not None:
            tensors += list(loaded.vision.tower.state_dict().values())
        return sum(t.numel() * t.element_size() for t in tensors)

    assert resident(on) - resident(off) == vision_bytes
    for a, b in zip(on.model.state_dict().values(), off.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the text model is the same either way


def test_text_only_checkpoint_has_no_vision(reference_checkpoints, tmp_path):
    _, path = reference_checkpoints["gqa-kv1"]
    copy = tmp_path / "text-only"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["vision_config"]
    (copy / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(copy / "model.safetensors").items() if "vision" not in k}
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert load(copy).vision is None
    # a text-only export that kept its vision_config (dgserve's shipped tiny model is one) is text only too
    (copy / "config.json").write_text((path / "config.json").read_text())
    assert load(copy).vision is None
    assert load("tiny").vision is None


def _edited_copy(src, dst, *, drop: str | None = None, add: str | None = None, reshape: str | None = None,
                 config_edit=None):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    if drop is not None:
        del tensors[drop]
    if add is not None:
        tensors[add] = torch.zeros(3)
    if reshape is not None:
        tensors[reshape] = torch.zeros(*tensors[reshape].shape[:-1], tensors[reshape].shape[-1] + 1)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


Q_PROJ = "model.encoder.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"


@pytest.mark.parametrize(("edit", "message"), [
    (dict(drop=Q_PROJ), f"missing vision tensor {Q_PROJ}"),
    (dict(drop="model.encoder.vision_tower.std_scale"), "missing vision tensor model.encoder.vision_tower.std_scale"),
    (dict(add="model.encoder.vision_tower.encoder.layers.7.mlp.extra"), "unexpected vision tensor "
     "model.encoder.vision_tower.encoder.layers.7.mlp.extra"),
    (dict(reshape=Q_PROJ), f"tensor {Q_PROJ} has shape [32, 33], expected [32, 32]"),
    (dict(config_edit=lambda c: c["vision_config"].update(model_type="siglip_vision_model")),
     "vision_config.model_type is 'siglip_vision_model'"),
    (dict(config_edit=lambda c: c["vision_config"].update(head_dim=6)), "head_dim=6 must be a multiple of 4"),
    (dict(config_edit=lambda c: c["vision_config"].update(num_hidden_layers=3)),
     "missing vision tensor model.encoder.vision_tower.encoder.layers.2"),
])
def test_bad_vision_checkpoints_are_named(vision_reference, tmp_path, edit, message):
    _, path = vision_reference
    bad = _edited_copy(path, tmp_path / "bad", **edit)
    with pytest.raises(VisionCheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        load(bad)
    assert isinstance(info.value, CheckpointError)  # callers that handle checkpoint errors handle these
    load(bad, vision="off")  # the text model still loads without the vision tower


def test_processor_config_must_match_the_tower(vision_reference, tmp_path):
    _, path = vision_reference
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    raw = json.loads((bad / "preprocessor_config.json").read_text())
    (bad / "preprocessor_config.json").write_text(json.dumps({**raw, "patch_size": 8}))
    with pytest.raises(CheckpointError, match=r"patch_size=8 but the vision tower's config\.json says 4"):
        load(bad)
    (bad / "preprocessor_config.json").write_text(json.dumps({**raw, "max_soft_tokens": 100}))
    with pytest.raises(CheckpointError, match="max_soft_tokens must be one of"):
        load(bad)


def test_unknown_vision_mode_is_refused(vision_reference):
    _, path = vision_reference
    with pytest.raises(CheckpointError, match="vision='on': expected one of auto, off"):
        load(path, vision="on")  # type: ignore[arg-type]


def test_nested_processor_config_and_defaults(vision_reference, tmp_path):
    _, path = vision_reference
    nested = tmp_path / "nested"
    shutil.copytree(path, nested)
    raw = json.loads((nested / "preprocessor_config.json").read_text())
    (nested / "preprocessor_config.json").unlink()
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": {**raw, "max_soft_tokens": 140},
                                                              "processor_class": "Gemma4Processor"}))
    assert load(nested).vision.spec.processor.max_soft_tokens == 140
    (nested / "processor_config.json").unlink()
    spec = load(nested).vision.spec  # none shipped: the reference defaults at the tower's patch and pooling sizes
    processor = spec.processor
    assert (processor.max_soft_tokens, processor.patch_size, processor.pooling_kernel_size) == (280, 4, 2)
