import gymnasium as gym
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from textgym import models


def test_tiny_is_small_tied_and_speaks_its_corpus(tiny):
    model, tok = tiny
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not model.training and tok.padding_side == "left" and tok.pad_token is not None
    # Pretrained on the corpus: much better than uniform (log 512 = 6.2 nats) on a corpus-like sentence.
    ids = tok("The children played in the park after school.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.5


def test_tiny_build_is_deterministic(tmp_path):
    models.build_tiny(tmp_path / "a", steps=3)
    models.build_tiny(tmp_path / "b", steps=3)
    a, _ = models.load(tmp_path / "a")
    b, _ = models.load(tmp_path / "b")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_load_local_directory_and_dropout_disabled(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    _, tok = models.load(models.TINY)
    tok.save_pretrained(tmp_path)
    model, tok2 = models.load(str(tmp_path))
    assert isinstance(model, GPT2LMHeadModel) and tok2.padding_side == "left"
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()  # as a trainer would: outputs must still be deterministic
    ids = torch.arange(10)[None]
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    env = gym.make("textgym/TextGen-v0", model=str(tmp_path), prompts=["hello"], max_new_tokens=2)
    assert env.action_space.n == 512


def test_unknown_model_names_what_was_tried():
    with pytest.raises(ValueError) as err:
        models.load("nobody/nothing-here")
    msg = str(err.value)
    assert "'nobody/nothing-here'" in msg and "textgym/tiny" in msg and "textgym/smollm2-135m" in msg
    assert "not a local directory" in msg


def test_wheel_asset_lookup_prefers_an_installed_package(tmp_path, monkeypatch):
    from textgym import assets

    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "weights.bin").write_text("x")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert assets.wheel_path("fake-pkg", "fakepkg", "weights.bin") == pkg / "weights.bin"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    from textgym.assets import atomic_dir

    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("written")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("ok")
    assert (tmp_path / "out" / "f").read_text() == "ok"
