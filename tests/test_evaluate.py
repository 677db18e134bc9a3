"""Evaluation measures: CLIP score and accuracy against transformers, KID against a plain formula."""

import numpy as np
import torch

from ablate_jax import evaluate
from ablate_jax.models import load_clip


def test_clip_score_and_accuracy_match_transformers(tmp_path):
    from tiny_models import save_tiny_clip
    from transformers import CLIPTokenizer

    ref = save_tiny_clip(tmp_path)
    clip = load_clip(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    texts = [evaluate.concept_text(c) for c in ("grumpy cat", "cat")]

    ours = evaluate.clip_scores(evaluate.image_embeddings(clip, images), evaluate.text_embeddings(clip, texts))

    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = torch.from_numpy(tok(texts, padding="max_length", max_length=77, return_tensors="np").input_ids).long()
    mean, std = np.array(clip.image_mean, np.float32), np.array(clip.image_std, np.float32)
    pixels = torch.from_numpy(((images / 255.0 - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.no_grad():
        t = ref.get_text_features(input_ids=ids)
        i = ref.get_image_features(pixel_values=pixels)
    t, i = (getattr(x, "pooler_output", x) for x in (t, i))
    t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
    theirs = 2.5 * torch.clamp(i @ t.T, min=0).numpy()

    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    emb_i, emb_t = evaluate.image_embeddings(clip, images), evaluate.text_embeddings(clip, texts)
    assert evaluate.clip_accuracy(emb_i, emb_t[0], emb_t[1]) == float(np.mean(theirs[:, 0] > theirs[:, 1]))


def _kid_plain(x, y):
    """The unbiased MMD^2 with kernel (x.y/d + 1)^3, written out with loops over pairs."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_the_plain_formula():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.5
    # One subset holding every row: exactly the formula.
    assert np.isclose(evaluate.kid(x, y, subsets=1, subset_size=12), _kid_plain(x, y), rtol=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 16)), rng.standard_normal((300, 16))
    c = rng.standard_normal((300, 16)) * 1.5 + 0.5
    same, different = evaluate.kid(a, b), evaluate.kid(a, c)
    assert abs(same) < 0.01 and different > 0.1, (same, different)
