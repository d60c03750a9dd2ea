"""Prompt encoding: A1111 prompts to conditioning, checked against diffusers' own encode_prompt."""
from __future__ import annotations

import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from engines import registry, tiny
from engines.bundle import ModelBundle
from engines.prompts import Conditioning, EmbeddingError, PromptEncoder
from engines.weights import PickleRefused

CPU = torch.device("cpu")
TOKENS = 77


# Encoding does not change a model, so one of each serves the module; the textual-inversion tests, which
# add token rows to the text encoders, build their own text-only bundles (text_model below)
@pytest.fixture(scope="module")
def model():
    return registry.load("tiny", CPU, torch.float32)


@pytest.fixture(scope="module")
def xl_model():
    return registry.load("tiny-xl", CPU, torch.float32)


def text_model(xl: bool = False) -> ModelBundle:
    """A fresh copy of the tiny model's text encoders and tokenizers (the same fixed-seed weights as
    `model` / `xl_model`), which is all the prompt encoder uses."""
    return ModelBundle(name="tiny-text", unet=None, autoencoder=None, scheduler=None,
                       text_encoder=tiny.build_text_encoder(), tokenizer=tiny.build_tokenizer(),
                       text_encoder_2=tiny.build_text_encoder_2() if xl else None,
                       tokenizer_2=tiny.build_tokenizer() if xl else None)


@pytest.fixture
def encoder(model):
    return PromptEncoder(model, CPU, torch.float32)


def diffusers_encode(model, prompt: str) -> torch.Tensor:
    pipe = StableDiffusionPipeline(
        vae=model.autoencoder.module, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        unet=model.unet, scheduler=model.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    return pipe.encode_prompt(prompt, CPU, 1, False)[0]


def diffusers_encode_xl(model, prompt: str, clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = StableDiffusionXLPipeline(
        vae=model.autoencoder.module, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=model.scheduler)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=CPU, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False, clip_skip=clip_skip)
    return embeds, pooled


def chunk(c: Conditioning, i: int) -> torch.Tensor:
    return c.embeddings[:, i * TOKENS:(i + 1) * TOKENS]


# ----------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("prompt", ["a red fox in the snow, watercolor", ""])
def test_unweighted_prompt_equals_diffusers_encoding(model, encoder, prompt):
    c = encoder.encode(prompt)
    assert c.pooled is None
    assert c.embeddings.shape == (1, TOKENS, 32)
    assert torch.equal(c.embeddings, diffusers_encode(model, prompt))


def diffusers_clip_skip_1(model, prompt: str) -> torch.Tensor:
    """What StableDiffusionPipeline.encode_prompt(clip_skip=1) computes: the penultimate layer through
    the final layer norm. Written out because diffusers 0.42 reaches the norm through `.text_model`,
    which transformers 5 removed, so the pipeline's own call raises AttributeError here."""
    ids = model.tokenizer(prompt, padding="max_length", max_length=TOKENS, truncation=True,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        return model.text_encoder.final_layer_norm(hidden)


def test_clip_skip_2_equals_diffusers_clip_skip_1(model, encoder):
    prompt = "a red fox in the snow"
    skipped = encoder.encode(prompt, clip_skip=2)
    assert torch.equal(skipped.embeddings, diffusers_clip_skip_1(model, prompt))
    assert not torch.equal(skipped.embeddings, encoder.encode(prompt).embeddings)


def test_clip_skip_below_1_is_an_error(encoder):
    with pytest.raises(ValueError, match="clip_skip"):
        encoder.encode("a fox", clip_skip=0)


def test_sdxl_conditioning_equals_diffusers_encoding(xl_model):
    encoder = PromptEncoder(xl_model, CPU, torch.float32)
    for clip_skip in (1, 2):
        c = encoder.encode("a red fox in the snow, watercolor", clip_skip=clip_skip)
        embeds, pooled = diffusers_encode_xl(xl_model, "a red fox in the snow, watercolor",
                                             clip_skip=clip_skip - 1 or None)
        assert c.embeddings.shape == (1, TOKENS, 64) and c.pooled.shape == (1, 32)
        assert torch.equal(c.embeddings, embeds)
        torch.testing.assert_close(c.pooled, pooled, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- emphasis
def test_weight_scales_only_the_weighted_tokens_and_restores_the_mean(encoder):
    plain = encoder.encode("a cat b").embeddings[0]
    weighted = encoder.encode("a (cat:1.5) b").embeddings[0]
    # "a cat b" with the tiny byte tokenizer: BOS, a, c, a, t, b, EOS; "cat" is tokens 2..4
    scale = (weighted[0] / plain[0]).mean()  # the mean restoration, the same for every token
    expected_weights = torch.ones(TOKENS)
    expected_weights[2:5] = 1.5
    torch.testing.assert_close(weighted, plain * expected_weights[:, None] * scale)
    assert scale.item() != pytest.approx(1.0)
    torch.testing.assert_close(weighted.mean(), plain.mean())


def test_sdxl_weights_restore_each_encoders_mean(xl_model):
    encoder = PromptEncoder(xl_model, CPU, torch.float32)
    plain = encoder.encode("a cat b").embeddings
    weighted = encoder.encode("a (cat:1.5) b").embeddings
    assert not torch.allclose(plain, weighted)
    for half in (slice(0, 32), slice(32, 64)):
        torch.testing.assert_close(weighted[..., half].mean(), plain[..., half].mean())
    torch.testing.assert_close(encoder.encode("a (cat:1.5) b").pooled, encoder.encode("a cat b").pooled)


def test_lora_tags_do_not_reach_the_text_encoder(encoder):
    assert torch.equal(encoder.encode("a <lora:foo:0.5>cat").embeddings, encoder.encode("a cat").embeddings)


def test_ignored_tags_are_logged(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="engines.prompts"):
        encoder.encode("a <hypernet:h:1> cat")
    assert "<hypernet:h:1>" in caplog.text


# ------------------------------------------------------------------------------------------ chunks
def test_long_prompt_is_not_truncated_but_chunked(model, encoder):
    prompt = "x" * 150  # the tiny tokenizer has one token per character
    c = encoder.encode(prompt)
    assert c.embeddings.shape == (1, 2 * TOKENS, 32)
    # the first chunk is the first 75 tokens, exactly what a truncating encoder sees
    torch.testing.assert_close(chunk(c, 0), diffusers_encode(model, prompt), rtol=0, atol=1e-6)


def test_break_starts_a_new_chunk(encoder):
    c = encoder.encode("a fox BREAK snowy hill")
    assert c.embeddings.shape[1] == 2 * TOKENS
    torch.testing.assert_close(chunk(c, 0), encoder.encode("a fox").embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunk(c, 1), encoder.encode("snowy hill").embeddings, rtol=0, atol=1e-6)


def test_leading_break_gives_an_empty_chunk(encoder):
    c = encoder.encode("BREAK a fox")
    torch.testing.assert_close(chunk(c, 0), encoder.encode("").embeddings, rtol=0, atol=1e-6)


def test_full_chunk_breaks_after_a_recent_comma(encoder):
    # 70 x's and a comma are 71 tokens; the 10 y's do not fit in 75, and the comma is within the last 20
    # tokens, so the chunk ends at the comma and the y's start the next one whole
    c = encoder.encode("x" * 70 + ", " + "y" * 10)
    assert c.embeddings.shape[1] == 2 * TOKENS
    torch.testing.assert_close(chunk(c, 0), encoder.encode("x" * 70 + ",").embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunk(c, 1), encoder.encode("y" * 10).embeddings, rtol=0, atol=1e-6)


def test_pad_to_match_appends_empty_chunks_to_the_shorter(encoder):
    long, short = encoder.encode("x" * 200), encoder.encode("a fox")
    assert long.embeddings.shape[1] == 3 * TOKENS
    a, b = encoder.pad_to_match(short, long)
    assert b is long
    assert a.embeddings.shape == long.embeddings.shape
    assert torch.equal(chunk(a, 0), short.embeddings)
    empty = encoder.encode("").embeddings
    assert torch.equal(chunk(a, 1), empty) and torch.equal(chunk(a, 2), empty)
    b2, a2 = encoder.pad_to_match(long, short)
    assert b2 is long and torch.equal(a2.embeddings, a.embeddings)


def test_pad_to_match_keeps_pooled_and_equal_lengths(xl_model):
    encoder = PromptEncoder(xl_model, CPU, torch.float32)
    long, short = encoder.encode("a BREAK b"), encoder.encode("c")
    _, padded = encoder.pad_to_match(long, short)
    assert padded.pooled is short.pooled
    assert padded.embeddings.shape == (1, 2 * TOKENS, 64)
    assert encoder.pad_to_match(short, short) == (short, short)


# ------------------------------------------------------------------------------------------- cache
def test_cache_returns_the_same_object_until_cleared(encoder):
    first = encoder.encode("a fox")
    assert encoder.encode("a fox") is first
    assert encoder.encode("a fox", clip_skip=2) is not first
    encoder.clear()
    again = encoder.encode("a fox")
    assert again is not first and torch.equal(again.embeddings, first.embeddings)


def test_cache_forgets_the_least_recently_used(model):
    encoder = PromptEncoder(model, CPU, torch.float32, cache_size=2)
    a = encoder.encode("a")
    encoder.encode("b")
    assert encoder.encode("a") is a  # a is now the most recent
    encoder.encode("c")  # evicts b
    assert encoder.encode("a") is a
    b = encoder.encode("b")
    assert encoder.encode("b") is b


# ------------------------------------------------------------------------------- textual inversion
def token_rows(text_encoder, tokenizer, text: str) -> torch.Tensor:
    """The token-embedding rows of `text`: an embedding made of them must encode as the text itself."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text_encoder.get_input_embeddings().weight[ids].detach().clone()


def test_a1111_safetensors_embedding_stands_for_its_vectors(encoder, tmp_path):
    plain, model = encoder, text_model()  # plain: the same weights without the embedding
    path = tmp_path / "catlike.safetensors"
    save_file({"emb_params": token_rows(model.text_encoder, model.tokenizer, "cat")}, str(path))
    encoder = PromptEncoder(model, CPU, torch.float32, embeddings={"catlike": path})
    # three vectors equal to the tokens c, a, t</w>: the prompt encodes exactly as if it said "cat"
    torch.testing.assert_close(encoder.encode("a catlike, b").embeddings, plain.encode("a cat, b").embeddings)
    torch.testing.assert_close(encoder.encode("a (CatLike:1.4)").embeddings, plain.encode("a (cat:1.4)").embeddings)
    assert not torch.allclose(encoder.encode("a catlike").embeddings, plain.encode("a catlike").embeddings)
    # only whole words are embedding names
    torch.testing.assert_close(encoder.encode("catlikes").embeddings, plain.encode("catlikes").embeddings)


def test_diffusers_embedding_format(encoder, tmp_path):
    plain, model = encoder, text_model()  # plain: the same weights without the embedding
    path = tmp_path / "doglike.safetensors"
    save_file({"<doglike>": token_rows(model.text_encoder, model.tokenizer, "dog")}, str(path))
    encoder = PromptEncoder(model, CPU, torch.float32, embeddings={"doglike": path})
    torch.testing.assert_close(encoder.encode("a doglike").embeddings, plain.encode("a dog").embeddings)


def test_pickle_embedding_is_refused_unless_allowed(encoder, tmp_path):
    plain, model = encoder, text_model()  # plain: the same weights without the embedding
    path = tmp_path / "old.pt"
    torch.save({"string_to_param": {"*": token_rows(model.text_encoder, model.tokenizer, "owl")}, "name": "old"},
               path)
    with pytest.raises(PickleRefused):
        PromptEncoder(model, CPU, torch.float32, embeddings={"old": path}).encode("an old")
    allowed = PromptEncoder(model, CPU, torch.float32, embeddings={"old": path}, allow_pickle=True)
    torch.testing.assert_close(allowed.encode("an old").embeddings, plain.encode("an owl").embeddings)


def test_embedding_of_another_width_is_an_embedding_error(tmp_path):
    model = text_model()
    path = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(path))
    encoder = PromptEncoder(model, CPU, torch.float32, embeddings={"wide": path})
    with pytest.raises(EmbeddingError, match=r"wide\.safetensors.*768.*expects 32"):
        encoder.encode("a wide shot")


def test_sdxl_embedding_on_a_one_encoder_model_is_an_embedding_error(tmp_path):
    model = text_model()
    path = tmp_path / "xlemb.safetensors"
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, str(path))
    with pytest.raises(EmbeddingError, match="SDXL"):
        PromptEncoder(model, CPU, torch.float32, embeddings={"xlemb": path}).encode("xlemb")


def test_sdxl_embedding_has_vectors_for_both_encoders(xl_model, tmp_path):
    plain, model = PromptEncoder(xl_model, CPU, torch.float32), text_model(xl=True)
    path = tmp_path / "catlike.safetensors"
    save_file({"clip_l": token_rows(model.text_encoder, model.tokenizer, "cat"),
               "clip_g": token_rows(model.text_encoder_2, model.tokenizer_2, "cat")}, str(path))
    encoder = PromptEncoder(model, CPU, torch.float32, embeddings={"catlike": path})
    with_embedding, with_words = encoder.encode("a catlike"), plain.encode("a cat")
    torch.testing.assert_close(with_embedding.embeddings, with_words.embeddings)
    torch.testing.assert_close(with_embedding.pooled, with_words.pooled)
