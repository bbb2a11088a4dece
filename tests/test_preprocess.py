"""Tokenizer and image preprocessing parity: open_clip's reference tokenizer, HF CLIPTokenizer, CLIPImageProcessor."""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jax_refine import preprocess


def _open_clip_tokenizer_module():
    """open_clip's tokenizer.py loaded as a file (importing the package needs torchvision, absent here)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch not installed")
    path = Path(spec.origin).parent / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_ref", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def _captions(n: int = 300) -> list[str]:
    """Varied captions: plain, punctuation, case, digits, accents, CJK, emoji, whitespace, long, empty."""
    rng = random.Random(0)
    words = ["a", "dog", "Cat", "sitting", "on", "the", "red", "SOFA", "near", "two", "people", "in", "Paris",
             "café", "naïve", "北京", "東京タワー", "🐶", "🍕", "don't", "it's", "we'll", "3.14", "42", "x-ray",
             "e-mail", "#tag", "@user", "C++", "(left)", "[right]", "«quoted»", "straße", "Ελληνικά", "русский",
             "a/b", "100%", "$5", "...", "!!", "?", ";", "über", "Zoë", "İstanbul"]
    out = ["", " ", "A dog.", "a photo of a cat.", "  lots   of\tspace\nand newlines  ", "ALL CAPS CAPTION",
           "a " * 120, "word" * 60, "Long " + "and longer " * 50 + "caption.", "🐶🐶🐶", "数字123abc"]
    while len(out) < n:
        k = rng.randint(1, 25)
        sep = rng.choice([" ", " ", " ", "  ", ", "])
        out.append(sep.join(rng.choice(words) for _ in range(k)) + rng.choice(["", ".", "!", " ?"]))
    return out


def _reference_ids(module, texts):
    ids = module.SimpleTokenizer(module.default_bpe())(texts, context_length=77).numpy()
    return ids


def test_tokenizer_matches_open_clip_reference():
    ref = _open_clip_tokenizer_module()
    texts = _captions()
    ours = preprocess.tokenize(texts)
    assert ours["input_ids"].shape == (len(texts), 77) and ours["input_ids"].dtype == np.int32
    expected = _reference_ids(ref, texts)
    for text, ids, mask, want in zip(texts, ours["input_ids"], ours["attention_mask"], expected):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        # open_clip pads with 0, HF with <|endoftext|>: compare the real tokens and the padding separately.
        np.testing.assert_array_equal(ids[:n], want[:n], err_msg=repr(text))
        assert not want[n:].any() and (ids[n:] == 49407).all()
    truncated = [i for i, t in enumerate(texts) if ours["attention_mask"][i].sum() == 77]
    assert len(truncated) >= 3 and (ours["input_ids"][truncated, -1] == 49407).all()


def test_tokenizer_differs_from_open_clip_only_by_its_ftfy_html_cleaning():
    """OpenAI's tokenizer runs ftfy.fix_text + html.unescape first; HF's CLIPTokenizer (ours) does not."""
    ref = _open_clip_tokenizer_module()
    special = ["He said “hello” &amp; left", "ﬁne ﬂowers", "ＡＢＣ full width", "mojibake Ã©tÃ©", "tab&#9;entity"]
    ours = preprocess.tokenize(special)["input_ids"]
    expected = _reference_ids(ref, special)
    assert all((o != e).any() for o, e in zip(ours, expected))  # they do differ on these
    cleaned = preprocess.tokenize([ref.basic_clean(t) for t in special])["input_ids"]
    for c, e in zip(cleaned, expected):
        n = int((c != 49407).sum()) + 1
        np.testing.assert_array_equal(c[:n], e[:n])


def test_tokenizer_matches_hf_from_pretrained_and_truncates_like_hf(tmp_path):
    from transformers import CLIPTokenizer

    shutil.copy(preprocess.TOKENIZER_DIR / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(preprocess.TOKENIZER_DIR / "merges.txt", tmp_path / "merges.txt")
    hf = CLIPTokenizer.from_pretrained(str(tmp_path))
    texts = _captions(120)
    ours = preprocess.tokenize(texts, max_length=32)
    for text, ids, mask in zip(texts, ours["input_ids"], ours["attention_mask"]):
        raw = hf(text)["input_ids"]  # no padding, no truncation
        want = raw if len(raw) <= 32 else raw[:31] + [hf.eos_token_id]
        assert ids[: len(want)].tolist() == want and mask.sum() == len(want), text


def test_get_tokenizer_prefers_checkpoint_files(tmp_path):
    vocab = json.loads((preprocess.TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    vocab["dog</w>"], vocab["cat</w>"] = vocab["cat</w>"], vocab["dog</w>"]  # a checkpoint with its own vocab
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(preprocess.TOKENIZER_DIR / "merges.txt", tmp_path / "merges.txt")
    default = preprocess.tokenize("dog", preprocess.get_tokenizer())["input_ids"][0, 1]
    own = preprocess.tokenize("dog", preprocess.get_tokenizer(tmp_path))["input_ids"][0, 1]
    assert default == vocab["cat</w>"] and own == vocab["dog</w>"]
    assert preprocess.get_tokenizer(tmp_path / "missing") is preprocess.get_tokenizer()


def _hf_pixels(image, size=224):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def test_preprocess_image_matches_clip_image_processor_on_real_photos(cifar10_dir):
    paths = sorted((cifar10_dir / "test").glob("*/000[0-2].jpg"))
    assert len(paths) == 30
    for p in paths:
        with Image.open(p) as img:
            ours = preprocess.preprocess_image(img)
            assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
            assert np.abs(ours - _hf_pixels(img)).max() <= 1e-3


@pytest.mark.parametrize("size_hw,mode", [((480, 640), "RGB"), ((517, 333), "RGB"), ((200, 300), "L"),
                                          ((260, 250), "RGBA"), ((224, 300), "RGB"), ((101, 99), "RGB")])
def test_preprocess_image_matches_on_large_non_square_images(cifar10_dir, size_hw, mode):
    with Image.open(cifar10_dir / "train" / "horse" / "0007.jpg") as small:
        photo = small.convert(mode).resize(size_hw[::-1], Image.Resampling.BILINEAR)
    for size in (224, 64):
        ours = preprocess.preprocess_image(photo, size)
        assert ours.shape == (size, size, 3)
        assert np.abs(ours - _hf_pixels(photo, size)).max() <= 1e-3
    arr = np.asarray(photo.convert("RGB"))
    np.testing.assert_array_equal(preprocess.preprocess_image(arr), preprocess.preprocess_image(photo.convert("RGB")))


def test_preprocess_image_rejects_bad_arrays():
    with pytest.raises(ValueError, match="uint8"):
        preprocess.preprocess_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H,W"):
        preprocess.preprocess_image(np.zeros((8, 8, 5), np.uint8))


# ------------------------------------------------------------------ the model's preprocessing (families)
@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    from hf_fixtures import write_tiny_siglip

    return write_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"))


def test_clip_defaults_are_the_clip_image_processor_constants(tiny_hf_clip_dir):
    from jax_refine.models import registry

    prep = registry.preprocessing(registry.load(tiny_hf_clip_dir))
    assert (prep.image_size, prep.resize, prep.text_length, prep.padding, prep.tokenizer) == (32, "crop", 77,
                                                                                                "longest", "clip")
    assert np.array_equal(np.float32(prep.mean), preprocess.CLIP_MEAN)  # OpenAI's constants, float32-exact
    assert np.array_equal(np.float32(prep.std), preprocess.CLIP_STD)
    with pytest.raises(ValueError, match="Preprocessing.resize='letterbox'"):
        preprocess.Preprocessing(resize="letterbox")
    with pytest.raises(ValueError, match="tokenizer='siglip'.*load_tokenizer"):  # would tokenize with CLIP's BPE
        preprocess.Preprocessing(tokenizer="siglip")


def test_siglip_pipelines_feed_siglip_processor_pixels_and_padded_ids(tiny_siglip, coco_mini_dir):
    """The retrieval pipeline with a SigLIP model's preprocessing, on real non-square COCO photos: images equal
    transformers' SiglipImageProcessor, ids its SiglipTokenizer's max-length padding, and the all-ones mask
    gives the features transformers' SiglipModel gives WITHOUT a mask (SigLIP attends to its pads)."""
    import torch
    from transformers import SiglipImageProcessorPil, SiglipModel, SiglipTokenizer

    from jax_refine.data import load_retrieval, sources
    from jax_refine.models import registry

    model = registry.load(tiny_siglip)
    prep = registry.preprocessing(model, tokenizer_source=tiny_siglip)
    assert (prep.image_size, prep.resize, prep.mean, prep.std, prep.text_length, prep.padding) == (
        32, "squash", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 16, "max_length")
    ann = coco_mini_dir / "annotations" / "captions_val2017.json"
    rset = load_retrieval(f"coco_json:{ann}:{coco_mini_dir / 'val2017'}", batch_size=4, prep=prep, max_examples=4)
    batch = next(iter(rset.image_batches()))
    paths = [r["path"] for r in sources.read_captions(ann, coco_mini_dir / "val2017")]  # image_index -> photo
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    assert batch["mask"].all()
    for row, index in zip(batch["image"], batch["image_index"]):
        with Image.open(paths[index]) as im:
            assert im.size[0] != im.size[1]
            want = processor(images=im.convert("RGB"), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert np.abs(row - want).max() <= 1e-5
    ref = SiglipTokenizer.from_pretrained(str(tiny_siglip))(rset.captions, padding="max_length", truncation=True,
                                                             max_length=16)
    np.testing.assert_array_equal(rset.texts["input_ids"], np.asarray(ref["input_ids"]))
    assert (rset.texts["attention_mask"] == 1).all()
    ids = rset.texts["input_ids"][:6]
    ours = np.asarray(model.encode_text(ids, rset.texts["attention_mask"][:6]))
    with torch.no_grad():
        theirs = SiglipModel.from_pretrained(str(tiny_siglip)).eval().get_text_features(
            input_ids=torch.tensor(ids, dtype=torch.long)).pooler_output.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
