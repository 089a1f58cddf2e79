"""The SmolLM2 tier's expert recipes, on the tiny test zoo's base (fast; no SmolLM2 needed):
--full fine-tunes every weight into its own cache folder, the default only the MLPs."""

import torch
import transformers

from fastdume.data import load_tokenizer
from fastdume.eval.smollm2 import SmolConfig, experts


def _state(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_full_experts_change_every_weight_and_mlp_experts_only_mlps(test_zoo, tmp_path):
    tok = load_tokenizer()
    base = _state(test_zoo.base)
    kw = dict(domains=("code",), steps=2, seq_len=32, batch_size=2, lr=1e-2)
    mlp = experts(SmolConfig(**kw), tmp_path, test_zoo.base, tok)["code"]
    full = experts(SmolConfig(full=True, **kw), tmp_path, test_zoo.base, tok)["code"]
    assert mlp.parent.name == "s2-lr0.01-L32-B2-seed0"
    assert full.parent.name == "full-" + mlp.parent.name  # its own cache folder
    for name, state in (("mlp", _state(mlp)), ("full", _state(full))):
        for key, value in base.items():
            changed = not torch.equal(state[key], value)
            if ".mlp." in key:
                assert changed, (name, key)
            else:
                assert changed == (name == "full"), (name, key)
