"""A minimal in-process pipeline driver that calls the stage hooks exactly as the pipeline does.

It exists so detectors can be developed and measured without processes: S stages by layer range
(embeddings in the first, final norm and head in the last), R data-parallel replicas that each see
different micro-batches, gradients averaged per stage and clipped globally, AdamW per stage with
warmup and cosine. Hook call points and StageContext contents follow fastdume/pipeline/hooks.py.
Data is a synthetic Markov-chain language, so training makes real progress on a tiny Llama.
"""

import copy
import functools
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastdume.pipeline.hooks import StageContext, load_hooks
from fastdume.pipeline.partition import split_layers, stage_param_names


@dataclass(frozen=True)
class SimConfig:
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    inter: int = 128
    vocab: int = 128
    seq_len: int = 32
    micro_batch: int = 4
    micro_batches: int = 2
    stages: int = 4
    replicas: int = 1
    steps: int = 60
    lr: float = 1e-3
    warmup: int = 5
    weight_decay: float = 0.01
    clip: float = 1.0
    pretrain_steps: int = 80


def _check(cfg):
    if cfg.stages < 2 or cfg.stages > cfg.layers:
        raise ValueError(f"stages must be in [2, layers={cfg.layers}], got {cfg.stages}")
    if cfg.replicas < 1 or cfg.steps < 1:
        raise ValueError(f"replicas and steps must be >= 1, got {cfg.replicas}, {cfg.steps}")


def markov_sampler(vocab, task, seed):
    """Sequences from a sparse random Markov chain fixed by `task`, sampled with `seed`."""
    g = torch.Generator().manual_seed(10_000 + task)
    logits = torch.randn(vocab, vocab, generator=g) * 3.0
    probs = torch.softmax(logits, dim=-1)
    rng = torch.Generator().manual_seed(seed)

    def sample(batch, length):
        ids = torch.empty(batch, length, dtype=torch.long)
        ids[:, 0] = torch.randint(vocab, (batch,), generator=rng)
        for t in range(1, length):
            ids[:, t] = torch.multinomial(probs[ids[:, t - 1]], 1, generator=rng)[:, 0]
        return ids

    return sample


def _model_config(cfg):
    return LlamaConfig(
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.inter,
        vocab_size=cfg.vocab,
        max_position_embeddings=max(64, cfg.seq_len),
        tie_word_embeddings=False,
    )


def _train(model, sample, steps, lr, batch, length, trainable=None):
    params = [p for n, p in model.named_parameters() if trainable is None or n in trainable]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        ids = sample(batch, length)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _model_key(cfg):
    # Only what shapes the model and its pre-training (not steps or replicas) keys the caches.
    return replace(cfg, steps=1, replicas=1, warmup=1, micro_batch=1, micro_batches=1)


def base_model(cfg):
    """The victims' starting model: a tiny Llama pre-trained on task 0 (cached per config)."""
    return _base_model(_model_key(cfg))


@functools.lru_cache(maxsize=4)
def _base_model(cfg):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_model_config(cfg)).float()
    _train(model, markov_sampler(cfg.vocab, 0, 1), cfg.pretrain_steps, 3e-3, 8, cfg.seq_len)
    return model


def synthetic_delta(cfg, stage=2, steps=60):
    """A backdoor-like Delta: the stage alone trained on another task, minus the base (surrogate).

    It stands in for the attack's surrogate Delta (same construction: only the stage's layers
    trained, at the victims' learning rate, Delta = surrogate - base, zero elsewhere).
    """
    return _synthetic_delta(_model_key(cfg), stage, steps)


@functools.lru_cache(maxsize=8)
def _synthetic_delta(cfg, stage, steps):
    base = base_model(cfg)
    names = stage_param_names(base, cfg.stages, stage)
    surrogate = copy.deepcopy(base)
    torch.manual_seed(1)
    _train(surrogate, markov_sampler(cfg.vocab, 7, 2), steps, cfg.lr, 8, cfg.seq_len, set(names))
    b, s = dict(base.named_parameters()), dict(surrogate.named_parameters())
    return {n: (s[n] - b[n]).detach().clone() for n in names}


def _lr_lambda(cfg):
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return f


class _Replica:
    """One data-parallel copy of the model, split into stages with one optimiser each."""

    def __init__(self, cfg, replica, hooks_spec, hooks_kwargs):
        self.model = copy.deepcopy(base_model(cfg))
        self.model.train()
        named = dict(self.model.named_parameters())
        self.ctxs, self.opts, self.scheds, self.hooks = [], [], [], []
        for s, rng in enumerate(split_layers(cfg.layers, cfg.stages)):
            names = stage_param_names(self.model, cfg.stages, s)
            params = {n: named[n] for n in names}
            opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
            ctx = StageContext(
                stage=s,
                num_stages=cfg.stages,
                replica=replica,
                num_replicas=cfg.replicas,
                layer_range=rng,
                params=params,
                optimizer=opt,
            )
            self.ctxs.append(ctx)
            self.opts.append(opt)
            self.scheds.append(sched)
            self.hooks.append(
                load_hooks(hooks_spec, s, replica, cfg.stages, cfg.replicas, **(hooks_kwargs or {}))
            )
        self._mb, self.live = 0, True
        for s, (_, b) in enumerate(split_layers(cfg.layers, cfg.stages)[:-1]):
            self.model.model.layers[b - 1].register_forward_hook(self._boundary(s))

    def _boundary(self, s):
        # The output of a stage's last layer is what it sends; its gradient is what it receives.
        def fwd(module, inputs, output):
            if not self.live:  # evaluation forwards are not pipeline traffic
                return
            h = output[0] if isinstance(output, tuple) else output
            ctx, mb = self.ctxs[s], self._mb
            for hook in self.hooks[s]:
                hook.on_activations(ctx, mb, h.detach())
            if h.requires_grad:
                h.register_hook(lambda g: self._on_grad(s, mb, g))

        return fwd

    def _on_grad(self, s, mb, g):
        for hook in self.hooks[s]:
            hook.on_gradients(self.ctxs[s], mb, g.detach())

    def forward_backward(self, batches, step):
        for ctx in self.ctxs:
            ctx.step = step
        total = 0.0
        for mb, ids in enumerate(batches):
            self._mb = mb
            loss = self.model(input_ids=ids, labels=ids).loss / len(batches)
            loss.backward()
            total += float(loss.detach())
        return total


def _average_and_clip(replicas, max_norm):
    """Average each parameter's gradient over replicas, then clip by the global norm."""
    named = [dict(r.model.named_parameters()) for r in replicas]
    avg = {n: torch.stack([m[n].grad for m in named]).mean(0) for n in named[0]}
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in avg.values()])
    )
    scale = min(1.0, max_norm / (float(norm) + 1e-6))
    for m in named:
        for n, p in m.items():
            p.grad = avg[n] * scale
    return float(norm)


def run(cfg, seed, hooks_spec=None, hooks_kwargs=None, val_batches=4):
    """Train cfg.steps steps with the given hooks; returns losses, metrics, messages and timings."""
    _check(cfg)
    torch.manual_seed(seed)
    reps = [_Replica(cfg, r, hooks_spec, hooks_kwargs) for r in range(cfg.replicas)]
    samplers = [markov_sampler(cfg.vocab, 0, 1000 * seed + r) for r in range(cfg.replicas)]
    losses, train_s = [], 0.0
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        loss = 0.0
        for rep, sample in zip(reps, samplers, strict=True):
            mbs = [sample(cfg.micro_batch, cfg.seq_len) for _ in range(cfg.micro_batches)]
            loss += rep.forward_backward(mbs, step) / cfg.replicas
        _average_and_clip(reps, cfg.clip)
        train_s += time.perf_counter() - t0
        for rep in reps:
            for ctx, opt, hooks in zip(rep.ctxs, rep.opts, rep.hooks, strict=True):
                ctx.grads = {n: p.grad for n, p in ctx.params.items() if p.grad is not None}
                for h in hooks:
                    h.before_step(ctx, step)
                t0 = time.perf_counter()
                opt.step()
                train_s += time.perf_counter() - t0
                with torch.no_grad():
                    for h in hooks:
                        h.after_step(ctx, step)
                opt.zero_grad(set_to_none=True)
            for sched in rep.scheds:
                sched.step()
        losses.append(loss)
    return {
        "config": asdict(cfg),
        "seed": seed,
        "losses": losses,
        "val_loss": validation_loss(reps[0], cfg, val_batches),
        "train_seconds": train_s,
        "metrics": {(c.stage, c.replica): c.metrics for r in reps for c in r.ctxs},
        "messages": {(c.stage, c.replica): c.messages for r in reps for c in r.ctxs},
        "final_params": {n: p.detach().clone() for n, p in reps[0].model.named_parameters()},
    }


@torch.no_grad()
def validation_loss(replica, cfg, batches):
    """Mean loss on held-out sequences of the victims' task (no hooks see these forwards)."""
    sample = markov_sampler(cfg.vocab, 0, 999_999)
    model = replica.model
    replica.live = False
    model.eval()
    out = (
        sum(
            float(model(input_ids=(ids := sample(8, cfg.seq_len)), labels=ids).loss)
            for _ in range(batches)
        )
        / batches
    )
    model.train()
    replica.live = True
    return out
