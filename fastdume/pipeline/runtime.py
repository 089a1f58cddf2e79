"""The stage process: forward/backward over micro-batches, replica and tie reductions,
global clipping, AdamW, hooks, checkpoints, and the final merge on rank 0.

Ranks: rank = stage * replicas + replica. Process groups (created identically on every rank):
per stage the replicas (gradient averaging), per replica the stages (global norm), and per
replica the first and last stage (tied embeddings).
"""

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastdume._atomic import replace_directory, save_safetensors
from fastdume._dist import process_group_backend
from fastdume.pipeline import checkpoint
from fastdume.pipeline.data import IGNORE, build_source, check_tokenizer
from fastdume.pipeline.hooks import StageContext, load_hooks
from fastdume.pipeline.optim import clip_coefficient, make_optimizer
from fastdume.pipeline.partition import StageModule, build_stage, is_tied
from fastdume.pipeline.schedule import schedule
from fastdume.pipeline.transport import ACT, GRAD, Channel, PeerError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PipelineConfig:
    model: str
    data: str
    out: str
    stages: int = 2
    replicas: int = 1
    micro_batches: int = 4
    steps: int = 10
    schedule: str = "1f1b"
    compress: str = "none"
    block: int = 256
    micro_batch_size: int = 2
    seq_len: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 2
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    resume: bool = False
    hooks: str | None = None
    hook_kwargs: dict = field(default_factory=dict)
    timeout: float = 60.0
    seed: int = 0
    threads: int = 1
    dtype: str = "float32"
    device: str = "cpu"  # "cuda": each stage on a GPU (LOCAL_RANK), NCCL for its reductions
    tokenizer: str | None = None  # tokenizer directory (default: the model's; see data.py)
    save_model: bool = True

    def check(self):
        for name in ("stages", "replicas", "micro_batches", "micro_batch_size", "seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        schedule(self.schedule, self.micro_batches, 0, self.stages)  # validates the name
        check_tokenizer(self.data, self.model, self.tokenizer)
        return self


class Stage:
    """Everything one stage process owns."""

    def __init__(self, cfg, rank, world):
        self.cfg, self.rank = cfg, rank
        S, R = cfg.stages, cfg.replicas
        if world != S * R:
            raise ValueError(f"world size must be stages x replicas = {S * R}, got {world}")
        self.stage, self.replica = divmod(rank, R)
        self.first, self.last = self.stage == 0, self.stage == S - 1
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()

        import fastdume.models  # noqa: F401  (registers DUME with transformers)

        dtype = DTYPES[cfg.dtype]
        full = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
        full.train()
        self.tied = is_tied(full) and S > 1
        self.device = _stage_device(cfg, rank)
        self.module = build_stage(full, self.stage, S).to(self.device)
        self.config = self.module.config
        self.full = full if rank == 0 else None  # rank 0 merges the final model into it
        self.params = dict(self.module.named_parameters())
        self.dtype = dtype
        self._groups(S, R)
        self.opt, self.sched = make_optimizer(
            list(self.params.values()),
            cfg.lr,
            cfg.weight_decay,
            cfg.warmup,
            cfg.steps,
            cfg.min_lr_ratio,
        )
        # on a GPU the channel stages transfers through pinned memory and copy streams
        self.channel = Channel(
            self.stage,
            lambda s: s * R + self.replica,
            cfg.compress,
            cfg.block,
            cfg.timeout,
            device=self.device,
        )
        self.ctx = StageContext(
            self.stage, S, self.replica, R, self.module.layer_range, self.params, {}, self.opt
        )
        self.hooks = load_hooks(cfg.hooks, self.stage, self.replica, S, R, **cfg.hook_kwargs)
        global_batch = R * cfg.micro_batches * cfg.micro_batch_size
        self.source = build_source(
            cfg.data,
            cfg.model,
            self.config.vocab_size,
            cfg.seq_len,
            needed=global_batch * max(1, cfg.steps),
            seed=cfg.seed,
            tokenizer_dir=cfg.tokenizer,
        )
        self.order = schedule(cfg.schedule, cfg.micro_batches, self.stage, S)

    def _groups(self, S, R):
        # new_group is collective over the world: every rank creates every group, in order.
        self.stage_group = self.pipe_group = self.tie_group = None
        for s in range(S):
            g = dist.new_group([s * R + r for r in range(R)])
            if s == self.stage:
                self.stage_group = g
        for r in range(R):
            g = dist.new_group([s * R + r for s in range(S)])
            if r == self.replica:
                self.pipe_group = g
        if self.tied:
            for r in range(R):
                g = dist.new_group([r, (S - 1) * R + r])
                if r == self.replica and (self.first or self.last):
                    self.tie_group = g

    # ---- one step ----

    def _micro(self, ids, labels, mb):
        b = self.cfg.micro_batch_size
        i = (self.replica * self.cfg.micro_batches + mb) * b
        return ids[i : i + b], labels[i : i + b]

    def _forward(self, step, mb, ids, labels, count, saved):
        x_ids, x_labels = self._micro(ids, labels, mb)
        if self.first:
            x = x_ids.to(self.device)
        else:
            shape = (self.cfg.micro_batch_size, self.cfg.seq_len, self.config.hidden_size)
            x = self.channel.recv(self.stage - 1, ACT, mb, step, shape, self.dtype, self.device)
            x.requires_grad_(True)
        out = self.module(x)
        if self.last:
            logits = out[:, :-1].flatten(0, 1).float()
            loss = F.cross_entropy(
                logits,
                x_labels[:, 1:].flatten().to(self.device),
                ignore_index=IGNORE,
                reduction="sum",
            )
            saved[mb] = (x, loss / count)
            return float(loss.detach()) / count
        act = out.detach()
        for h in self.hooks:
            h.on_activations(self.ctx, mb, act)
        self.channel.send(act, self.stage + 1, ACT, mb, step)
        saved[mb] = (x, out)
        return 0.0

    def _backward(self, step, mb, saved):
        x, out = saved.pop(mb)
        if self.last:
            out.backward()
        else:
            shape = (self.cfg.micro_batch_size, self.cfg.seq_len, self.config.hidden_size)
            g = self.channel.recv(self.stage + 1, GRAD, mb, step, shape, self.dtype, self.device)
            for h in self.hooks:
                h.on_gradients(self.ctx, mb, g)
            out.backward(g)
        if not self.first:
            self.channel.send(x.grad, self.stage - 1, GRAD, mb, step)

    def _reduce_grads(self):
        grads = []
        for p in self.params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if self.cfg.replicas > 1:
            # the loss is already normalised by the global token count, so summing the
            # replicas' contributions gives the gradient of the global mean loss
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.stage_group)
            for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(f)
        if self.tie_group is not None:
            name = "model.embed_tokens.weight" if self.first else "lm_head.weight"
            dist.all_reduce(self.params[name].grad, group=self.tie_group)
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for n, p in self.params.items():
            if self.tied and self.last and n == "lm_head.weight":
                continue  # counted once, on the first stage
            sq += p.grad.double().pow(2).sum()
        dist.all_reduce(sq, group=self.pipe_group)
        norm = float(sq.sqrt())
        coef = clip_coefficient(norm, self.cfg.max_grad_norm)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm

    def train_step(self, step):
        cfg = self.cfg
        ids, labels = self.source.global_batch(
            step, cfg.replicas * cfg.micro_batches * cfg.micro_batch_size
        )
        count = max(1, int((labels[:, 1:] != IGNORE).sum()))
        self.ctx.step = step
        saved, loss = {}, 0.0
        for op, mb in self.order:
            if op == "F":
                loss += self._forward(step, mb, ids, labels, count, saved)
            else:
                self._backward(step, mb, saved)
        self.channel.flush()
        try:
            norm = self._reduce_grads()
        except RuntimeError as exc:  # gloo/NCCL: a peer died or timed out mid-collective
            raise PeerError(
                f"stage {self.stage}: gradient reduction at step {step} failed: {exc}"
            ) from exc
        self.ctx.grads = {n: p.grad for n, p in self.params.items()}
        for h in self.hooks:
            h.before_step(self.ctx, step)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            for h in self.hooks:
                h.after_step(self.ctx, step)
        self.opt.zero_grad(set_to_none=True)
        self.ctx.grads = {}
        if self.last:
            t = torch.tensor([loss], dtype=torch.float64)
            try:
                dist.all_reduce(t, group=self.stage_group)
            except RuntimeError as exc:
                raise PeerError(f"stage {self.stage}: loss reduction failed: {exc}") from exc
            loss = float(t)
        return loss, norm

    # ---- checkpoints and the final model ----

    def maybe_resume(self):
        if not self.cfg.resume:
            return 0
        root = Path(self.cfg.out) / "checkpoints"
        step = checkpoint.latest_complete(root, self.cfg.stages)
        if step is None:
            return 0
        checkpoint.load_stage(root, step, self.stage, self.params, self.opt)
        f = self.sched.lr_lambdas[0]
        for g, base in zip(self.opt.param_groups, self.sched.base_lrs, strict=True):
            g["lr"] = base * f(step)
        self.sched.last_epoch = step
        return step

    def maybe_checkpoint(self, done):
        k = self.cfg.checkpoint_every
        if k and done % k == 0 and self.replica == 0:
            root = Path(self.cfg.out) / "checkpoints"
            checkpoint.save_stage(root, done, self.stage, self.params, self.opt)

    def gather_and_save(self):
        """Replica 0 of every stage sends its parameters to rank 0, which writes one HF dir."""
        R, S = self.cfg.replicas, self.cfg.stages
        if self.replica != 0:
            return None
        if self.rank != 0:
            for i, (_, p) in enumerate(sorted(self.params.items())):
                dist.send(p.detach().cpu().contiguous(), 0, tag=i)
            return None
        for s in range(1, S):
            part = StageModule(self.full, s, S, _layer_range(self.full, s, S))
            for i, (name, p) in enumerate(sorted(part.named_parameters())):
                buf = torch.empty_like(p, device="cpu")
                w = dist.irecv(buf, s * R, tag=i)
                w.wait(timedelta(seconds=self.cfg.timeout))
                if not (self.tied and name == "lm_head.weight"):
                    with torch.no_grad():
                        p.copy_(buf)
        return _save_model(self.full.cpu(), self.cfg.model, Path(self.cfg.out) / "model")


def _stage_device(cfg, rank):
    if cfg.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device")
    local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _layer_range(model, s, S):
    from fastdume.pipeline.partition import split_layers

    return split_layers(len(model.model.layers), S)[s]


def _save_model(model, src_dir, dest):
    def fill(tmp):
        model.save_pretrained(tmp)
        for f in Path(src_dir).iterdir():
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in _TOKENIZER_FILES):
                shutil.copy2(f, tmp / f.name)

    return str(replace_directory(dest, fill))


_TOKENIZER_FILES = ("special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


def run_rank(cfg, rank, world):
    """Body of one stage process (the process group must already be initialised)."""
    torch.manual_seed(cfg.seed)
    stage = Stage(cfg, rank, world)
    start = stage.maybe_resume()
    losses, norms = {}, {}
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        loss, norm = stage.train_step(step)
        losses[step], norms[step] = loss, norm
        stage.maybe_checkpoint(step + 1)
    elapsed = time.perf_counter() - t0
    merged = stage.gather_and_save() if cfg.save_model else None
    _save_hook_messages(cfg, stage)
    return {
        "rank": rank,
        "stage": stage.stage,
        "replica": stage.replica,
        "layer_range": list(stage.module.layer_range),
        "start_step": start,
        "losses": losses if stage.last else {},
        "grad_norms": norms,
        "seconds": elapsed,
        "bytes_sent": stage.channel.bytes_sent,
        "metrics": stage.ctx.metrics,
        "hook_messages": len(stage.ctx.messages),
        "model_dir": merged,
    }


def _save_hook_messages(cfg, stage):
    if not stage.ctx.messages:
        return
    d = Path(cfg.out) / "hooks"
    tensors = {
        f"{step}/{tag}/{i}": t.contiguous() for i, (step, tag, t) in enumerate(stage.ctx.messages)
    }
    path = d / f"stage{stage.stage}_replica{stage.replica}.safetensors"
    save_safetensors(path, tensors)


def init_and_run(cfg, rank, world):
    # activations always travel through host memory (gloo); on GPUs the replica and tie
    # reductions of CUDA tensors go through NCCL where it can
    backend = process_group_backend(cfg.device != "cpu", world)
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=timedelta(seconds=cfg.timeout)
    )
    # no destroy_process_group: teardown is left to process exit, so a dead peer cannot
    # make a finished rank wait
    return run_rank(cfg, rank, world)


def config_dict(cfg):
    return asdict(cfg)
