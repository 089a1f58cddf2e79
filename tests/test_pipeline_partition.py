"""Stages of every supported family, chained in one process, reproduce the full model's
logits and gradients (transformers' own forward is the reference)."""

import pytest
import torch

from fastdume.pipeline.partition import build_stage, split_layers


def test_split_layers_is_contiguous_and_balanced():
    assert split_layers(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_layers(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="num_stages must be in 1..4 \\(layers\\), got 5"):
        split_layers(4, 5)


def _family_model(family, tie):
    from fastdume.data.zoo import tiny_model

    extra = {}
    if family == "qwen3":
        extra = dict(
            layer_types=["full_attention", "sliding_attention"] * 2,
            sliding_window=3,
            use_sliding_window=True,
        )
    return tiny_model(family, seed=1, num_hidden_layers=4, tie_word_embeddings=tie, **extra)


@pytest.mark.parametrize(
    "family,tie", [("llama", True), ("mistral", False), ("qwen2", True), ("qwen3", False)]
)
def test_stages_reproduce_full_model(family, tie):
    model = _family_model(family, tie).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    ref = model(input_ids=ids).logits
    ref.float().pow(2).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    stages = [build_stage(model, s, 3) for s in range(3)]
    # forward stage by stage, keeping each stage's output for its backward
    h, outs, leaves = ids, [], []
    for st in stages:
        if not st.is_first:
            h = h.detach().requires_grad_(True)
            leaves.append(h)
        h = st(h)
        outs.append(h)
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-6)
    h.float().pow(2).mean().backward()
    for s in (1, 0):
        outs[s].backward(leaves[s].grad)
    grads = {n: p.grad for st in stages for n, p in st.named_parameters()}
    if tie:  # the runtime sums the two copies' gradients; so does the tied reference
        grads["model.embed_tokens.weight"] = grads["model.embed_tokens.weight"] + grads.pop(
            "lm_head.weight"
        )
    assert set(grads) == set(ref_grads)
    for n, want in ref_grads.items():
        torch.testing.assert_close(grads[n], want, rtol=1e-5, atol=1e-6, msg=n)


def test_stages_reproduce_dume_model():
    import fastdume
    from fastdume.data.zoo import tiny_model

    experts = [tiny_model("llama", seed=s, num_hidden_layers=4) for s in (1, 2)]
    model = fastdume.upcycle(experts, domains=["a", "b"]).eval()
    with torch.no_grad():
        for layer in model.dume_layers():
            layer.router.weight.normal_()  # route tokens to both experts
    ids = torch.randint(0, model.config.dense_config().vocab_size, (2, 9))
    ref = model(input_ids=ids).logits
    h = ids
    for s in range(2):
        h = build_stage(model, s, 2)(h)
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-6)
