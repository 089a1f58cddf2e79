"""Launch configurations of the grouped MoE GEMMs, kept as data (one JSON file per device name).

`<device name>.json` (spaces and dashes as "_") maps "E=..,H=..,I=..,dtype=.." to token buckets;
`default.json` covers every other shape and device. A bucket is the first whose max_tokens >= T.
A config: {"BLOCK_M": .., "gemm1": {BLOCK_N, BLOCK_K, num_warps, num_stages}, "gemm2": {...}},
plus optional design keys (kernels/moe_grouped.py and moe_routing.py say what each does); a
config without them means the plain design, as before they existed:
  "FUSED_ROUTING": false   true = routing and alignment in one single-program launch
  "gemm1"/"gemm2": "SWAP_AB": false   true = compute W x^T (wgmma-sized tiles when BLOCK_M < 64)
  "gemm2": "SPLIT_K": 1    > 1 = the down projection split over I, fixed-order fp32 reduction
`validate` returns the config with every default filled in; the kernels get only full configs.
Files written by benches/tune_moe.py also record each bucket's tuned T and time ("tuned_at",
"us"); loading ignores them.
Within one bucket the result for a token does not depend on the rest of the batch; across buckets
the tile shapes (and so the fp32 summation order) may differ.

Autotuning (CUDA only, off by default): FASTDUME_MOE_AUTOTUNE=1 times every shipped config (and
its design variants, `candidates`) on the first call of each (device, shape, power-of-two token
bucket, fused_moe or moe_experts) and keeps the fastest in
$FASTDUME_CACHE/moe_autotune.json (default ~/.cache/fastdume), reused by later processes.
"""

import functools
import json
import os
import re
from importlib import resources
from pathlib import Path

import torch

from fastdume._atomic import write_json

REQUIRED = ("BLOCK_M", "gemm1", "gemm2")
GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
# Design options and the values that mean "the plain design" (configs written before them).
DEFAULTS = {"FUSED_ROUTING": False}
GEMM_DEFAULTS = {"gemm1": {"SWAP_AB": False}, "gemm2": {"SWAP_AB": False, "SPLIT_K": 1}}


def file_name(device_name):
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def shape_key(num_experts, hidden, inter, dtype):
    return f"E={num_experts},H={hidden},I={inter},dtype={str(dtype).removeprefix('torch.')}"


@functools.cache
def load_file(name):
    """Parsed config file shipped in this package, or None when there is none for `name`."""
    path = resources.files(__package__) / name
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def validate(config, where):
    """The config with every design default filled in (a new dict); raises on a missing,
    unknown or ill-typed key, naming `where`."""
    missing = [k for k in REQUIRED if k not in config]
    for gemm in ("gemm1", "gemm2"):
        missing += [f"{gemm}.{k}" for k in GEMM_KEYS if k not in config.get(gemm, {})]
    if missing:
        raise ValueError(f"MoE config {where} lacks {missing}")
    full = {**DEFAULTS, **config}
    unknown = sorted(set(full) - set(REQUIRED) - set(DEFAULTS))
    for gemm, defaults in GEMM_DEFAULTS.items():
        full[gemm] = {**defaults, **config[gemm]}
        unknown += [f"{gemm}.{k}" for k in set(full[gemm]) - set(GEMM_KEYS) - set(defaults)]
    if unknown:
        raise ValueError(f"MoE config {where} has unknown keys {sorted(unknown)}")
    bools = [full["FUSED_ROUTING"], full["gemm1"]["SWAP_AB"], full["gemm2"]["SWAP_AB"]]
    split = full["gemm2"]["SPLIT_K"]
    if not all(isinstance(b, bool) for b in bools):
        raise ValueError(f"MoE config {where}: FUSED_ROUTING and SWAP_AB must be true or false")
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"MoE config {where}: gemm2.SPLIT_K must be an int >= 1, got {split!r}")
    return full


def pick(buckets, num_tokens):
    for bucket in buckets:
        if bucket["max_tokens"] is None or num_tokens <= bucket["max_tokens"]:
            return bucket["config"]
    return buckets[-1]["config"]


def get_config(num_experts, hidden, inter, dtype, device_name, num_tokens):
    """The launch config for this shape on the named device: its tuned entry, else the default."""
    if device_name:
        tuned = load_file(file_name(device_name))
        key = shape_key(num_experts, hidden, inter, dtype)
        if tuned is not None and key in tuned["shapes"]:
            return validate(pick(tuned["shapes"][key]["buckets"], num_tokens), key)
    return validate(pick(load_file("default.json")["buckets"], num_tokens), "default")


def device_name(device):
    """torch.cuda's name for a CUDA device, None otherwise."""
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return None


def interpreter_config():
    """Small tiles for the Triton interpreter on a CPU: it runs one numpy op per tile op."""
    gemm = {"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    return validate({"BLOCK_M": 16, "gemm1": dict(gemm), "gemm2": dict(gemm)}, "interpreter")


def all_shipped():
    """(file name, key, bucket index, config) for every config shipped, for the AOT test."""
    out = []
    for path in sorted(resources.files(__package__).iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".json"):
            continue
        data = load_file(path.name)
        entries = {"default": data} if "buckets" in data else data["shapes"]
        for key, entry in entries.items():
            for i, bucket in enumerate(entry["buckets"]):
                out.append((path.name, key, i, validate(bucket["config"], key)))
    return out


def autotune_enabled():
    return os.environ.get("FASTDUME_MOE_AUTOTUNE") == "1"


def autotune_path():
    root = os.environ.get("FASTDUME_CACHE") or Path.home() / ".cache" / "fastdume"
    return Path(root) / "moe_autotune.json"


def token_bucket(num_tokens):
    return 1 << max(num_tokens - 1, 0).bit_length()


def design_variants(config):
    """`config` and, for small-token tiles (BLOCK_M < 64), the same tiles with each design option:
    swap-AB in both GEMMs, a 4-way split-K down projection, fused routing. For the autotuner; the
    offline tuner (benches/tune_moe.py) searches these options with their own tile grids."""
    config = validate(config, "variant")
    if config["BLOCK_M"] >= 64:
        return [config]
    swap = {g: {**config[g], "SWAP_AB": True} for g in ("gemm1", "gemm2")}
    split = {"gemm2": {**config["gemm2"], "SPLIT_K": 4}}
    return [config, {**config, **swap}, {**config, **split}, {**config, "FUSED_ROUTING": True}]


def candidates(routed=True):
    """Distinct shipped configs and their design variants: the autotuner's search space.
    routed=False (the ids come from the caller): FUSED_ROUTING has nothing to fuse, left out."""
    seen = {}
    for *_, shipped in all_shipped():
        for config in design_variants(shipped):
            if routed or not config["FUSED_ROUTING"]:
                seen.setdefault(json.dumps(config, sort_keys=True), config)
    return list(seen.values())


def _read_cache(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tuned_config(key, configs, measure, path=None):
    """The config with the smallest measure(config) for `key`, cached on disk under `key`."""
    path = Path(path or autotune_path())
    cached = _read_cache(path).get(key)
    if cached is not None:
        return validate(cached, key)
    best = min(configs, key=measure)
    data = _read_cache(path)  # re-read: another process may have added keys meanwhile
    data[key] = best
    write_json(path, data, indent=1)
    return best
