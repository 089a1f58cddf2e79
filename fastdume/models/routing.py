"""How a DUME model decides which expert each token uses: the options, the router features and
the per-forward routing state.

Options (all saved in DumeConfig):
- routed: "mlp" (the paper: each layer's MLP is an expert, every other tensor shared) or
  "model" (every tensor of every expert kept; a token runs through its expert's embedding row,
  norms, attention, MLPs and LM head).
- features: what a router reads at each position t.
    "token":             the router input itself (routed="mlp": the MoE input, as in the paper;
                         routed="model": the block input RMS-normalised, because the residual
                         stream has no norm of its own and its scale grows with depth);
    "context":           the causal running mean, over the sequence's real tokens up to t (padding
                         excluded), of the RMS-normalised router input;
    "context:<h>":       the same mean with exponential decay, half-life h >= 1 real tokens, for
                         sequences that change domain;
    "vocab", "vocab:<h>": the tokens themselves (depth="single" only): the router is a table of
                         each domain's smoothed unigram log-probabilities [E, V] (naive Bayes,
                         closed form from per-domain token counts, fastdume.router.solve), and
                         its logits at t are the (decayed) mean of the rows of the tokens so far,
                         i.e. each domain's mean log-likelihood of the sequence so far.
- depth: "layer" (each router decides its layer alone), "cumulative" (layer l decides on the
  logits summed over the routers 0..l), "single" (one router at the embeddings decides every
  layer; it reads the embedding output for routed="mlp" and, for routed="model", a fixed
  token table: the mean of the experts' embeddings taken at upcycle time; the vocabulary router
  reads the token ids).

Router inputs per option ("router layers", the RouterStats layers):
- routed="mlp", depth layer/cumulative: router l reads layer l's MoE input (L routers);
- routed="model", depth layer/cumulative: router 0 reads the fixed token table (it picks the
  embedding row, so it cannot read an expert's embedding), router l >= 1 the block input;
- depth="single": one router, as above.
Forcing expert e (statistics) sends every decision to e, so with routed="model" each router's
input is exactly dense expert e's hidden state: add/remove stays exact.

The running mean is kept in fp64 as (sum, count) per sequence and carried across generation
steps beside the KV cache (`cache.dume_context`), so the prefix is never recomputed.
"""

import math

import torch
import torch.nn.functional as F

ROUTED = ("mlp", "model")
DEPTHS = ("layer", "cumulative", "single")
FEATURE_KINDS = ("token", "context", "context:<half-life>", "vocab", "vocab:<half-life>")
PAPER = ("token", "layer")  # the paper's features and depth (routed="mlp" default)
# The measured defaults (docs/EVAL.md, "Routing the whole model").
DEFAULTS = {"mlp": ("token", "layer"), "model": ("vocab:16", "single")}
RMS_EPS = 1e-6
_CHUNK = 256  # decayed mean: fp64 weights 2^(chunk / half-life) stay finite for half-life >= 1


def parse_features(features):
    """-> half-life in real tokens: None for "token", inf for "context" / "vocab", h for
    "context:<h>" / "vocab:<h>"."""
    if features == "token":
        return None
    kind, colon, value = features.partition(":") if isinstance(features, str) else ("", "", "")
    if kind in ("context", "vocab"):
        if not colon:
            return math.inf
        try:
            half_life = float(value)
        except ValueError:
            half_life = math.nan
        if math.isfinite(half_life) and half_life >= 1:
            return half_life
    raise ValueError(
        f"features must be 'token', 'context', 'context:<half-life>', 'vocab' or "
        f"'vocab:<half-life>' with a half-life >= 1 token, got {features!r}"
    )


def is_vocab(features):
    """True for the vocabulary router ("vocab" / "vocab:<h>"): counts, not hidden states."""
    return features.partition(":")[0] == "vocab"


def check_options(routed, features=None, depth=None):
    """Validate and fill in the routing options -> (routed, features, depth), canonical strings.

    None takes the measured default of that `routed` (DEFAULTS)."""
    if routed not in ROUTED:
        raise ValueError(f"routed must be one of {ROUTED}, got {routed!r}")
    features = DEFAULTS[routed][0] if features is None else features
    depth = DEFAULTS[routed][1] if depth is None else depth
    half_life = parse_features(features)
    if half_life is not None and math.isfinite(half_life):
        features = f"{features.partition(':')[0]}:{half_life:g}"
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {DEPTHS}, got {depth!r}")
    if is_vocab(features) and depth != "single":
        raise ValueError(
            f"features={features!r} reads the input tokens, so its one router decides every "
            f"layer: depth must be 'single', got {depth!r}"
        )
    return routed, features, depth


def options_of(config):
    """The routing options of a DumeConfig as a dict (what statistics files record)."""
    return {
        "routed": config.routed,
        "features": config.router_features,
        "depth": config.router_depth,
    }


PAPER_OPTIONS = {"routed": "mlp", "features": PAPER[0], "depth": PAPER[1]}


def is_paper(config):
    """True for the paper's configuration: MLP experts, token features, a router per layer."""
    return (config.routed, config.router_features, config.router_depth) == ("mlp", *PAPER)


def rms_normalize(x, eps=RMS_EPS):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def running_mean(u, mask, state=None, half_life=math.inf):
    """Causal (decayed) mean of u over the real tokens so far.

    u [B, S, H], mask [B, S] bool (False = padding: neither counted nor decayed over), state the
    (sum [B, H], count [B]) fp64 carried from earlier positions or None.
    -> (mean [B, S, H] fp32, zero where no real token has been seen yet; new state).
    With half-life h the sum and count decay by 2^(-1/h) per real token.
    """
    m = mask.to(torch.float64).unsqueeze(-1)
    x = u.to(torch.float64) * m
    B, S, H = u.shape
    if state is None:
        total = x.new_zeros(B, H)
        count = x.new_zeros(B)
    else:
        total, count = state
    if math.isinf(half_life):
        sums = x.cumsum(1) + total[:, None]
        counts = m.cumsum(1) + count[:, None, None]
    else:
        sums, counts = _decayed(x, m, total, count, 0.5 ** (1.0 / half_life))
    mean = torch.where(counts > 0, sums / counts.clamp_min(1e-300), torch.zeros_like(sums))
    return mean.float(), (sums[:, -1], counts[:, -1, 0])


def _decayed(x, m, total, count, decay):
    """S_t = decay^m_t S_(t-1) + m_t x_t (and C likewise), in chunks: inside a chunk with r real
    tokens so far, S = decay^r (carry + cumsum(decay^-r_s m_s x_s))."""
    sums, counts = [], []
    for start in range(0, x.shape[1], _CHUNK):
        xs, ms = x[:, start : start + _CHUNK], m[:, start : start + _CHUNK]
        r = ms.cumsum(1)
        up, down = decay ** (-r), decay**r
        s = down * (total[:, None] + (xs * up).cumsum(1))
        c = down * (count[:, None, None] + (ms * up).cumsum(1))
        sums.append(s)
        counts.append(c)
        total, count = s[:, -1], c[:, -1, 0]
    return torch.cat(sums, 1), torch.cat(counts, 1)


def select(logits, top_k):
    """The routing contract of fastdume.ops.moe.route on given fp32 logits: top-k (ties to the
    lower index, NaN as -inf), softmax over the k winners -> (weights [T, k] fp32, ids [T, k])."""
    logits = torch.nan_to_num(logits, nan=float("-inf"))
    scores, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    scores, ids = scores[:, :top_k], ids[:, :top_k]
    weights = torch.softmax(scores, dim=-1)
    dead = torch.isneginf(scores[:, :1]).expand_as(weights)
    return torch.where(dead, torch.full_like(weights, 1.0 / top_k), weights), ids


class RoutingState:
    """What the routed modules of one model share during a forward: the padding mask, the
    running-mean state, the summed logits (cumulative) and the current decision.

    Not a module (it holds no weights); `routers` are the model's router modules in router
    order. force: None or an expert index every decision goes to. recorder: None or
    callable(index, features [B, S, H] fp32, mask [B, S] bool) seeing every router's features;
    on_decision: None or callable(index, top-1 experts [B, S]) seeing every decision (for
    routed="mlp" with depth "single" the one decision serves every layer).
    """

    def __init__(self, config, routers):
        self.routers = list(routers)
        self.routed = config.routed
        self.half_life = parse_features(config.router_features)
        self.cumulative = config.router_depth == "cumulative"
        self.top_k = config.top_k
        self.temperature = float(config.router_temperature)
        self.force = None
        self.recorder = None
        self.on_decision = None
        self.end()

    def begin(self, mask, context=None):
        """Start a forward over tokens with real-token mask [B, S]; context: the running-mean
        state of the earlier positions ({router index: (sum, count)}) or None."""
        self.mask, self.previous, self.context = mask, context or {}, {}
        self.logits, self.decision, self.ids = None, None, None

    def end(self):
        self.begin(None)

    def features(self, index, x):
        """Router `index`'s features of its input x [B, S, H] -> [B, S, H] fp32."""
        if self.half_life is None:
            f = x.float() if self.routed == "mlp" else rms_normalize(x)
        else:
            f, self.context[index] = running_mean(
                rms_normalize(x), self.mask, self.previous.get(index), self.half_life
            )
        if self.recorder is not None:
            self.recorder(index, f, self.mask)
        return f

    def decide(self, index, x):
        """Route on router `index` -> (weights [B*S, k] fp32, ids [B*S, k]); also sets
        self.decision and self.ids ([B, S], the top-1 expert)."""
        f = self.features(index, x)
        router = self.routers[index]
        logits = F.linear(f.reshape(-1, f.shape[-1]), router.weight.float(), router.bias.float())
        return self._choose(index, logits, x.shape[:-1])

    def decide_tokens(self, ids):
        """The vocabulary router (features "vocab"), on input ids [B, S]: its logits are the
        (decayed) running mean of its weight columns of the tokens so far, plus the bias, i.e.
        its weights applied to the running mean of the tokens' one-hot vectors, without ever
        forming a [B, S, V] tensor. The recorder sees nothing: its statistics are token counts."""
        router = self.routers[0]
        rows = F.embedding(ids, router.weight.float().t())  # [B, S, E]
        mean, self.context[0] = running_mean(rows, self.mask, self.previous.get(0), self.half_life)
        logits = mean.reshape(-1, mean.shape[-1]) + router.bias.float()
        return self._choose(0, logits, ids.shape)

    def _choose(self, index, logits, shape):
        if self.cumulative:
            logits = logits if self.logits is None else logits + self.logits
            self.logits = logits
        if self.force is None:
            weights, ids = select(logits / self.temperature, self.top_k)
        else:
            ids = torch.full(
                (logits.shape[0], 1), self.force, dtype=torch.long, device=logits.device
            )
            weights = torch.ones(ids.shape, dtype=torch.float32, device=logits.device)
        self.decision = (weights, ids)
        self.ids = ids[:, 0].reshape(shape)
        if self.on_decision is not None:
            self.on_decision(index, self.ids)
        return self.decision
