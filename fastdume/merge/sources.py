"""Reading and checking the dense models that upcycle merges.

A source is an HF model directory, read lazily tensor by tensor from its safetensors file(s)
(never unpickled), or an in-memory PreTrainedModel. Everything needed to refuse a bad set of
experts (family, config fields, tokenizer vocabulary, tensor names and shapes) is checked from
headers and configs alone, before any tensor is merged.
"""

import contextlib
import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open

from fastdume.models.modeling import FAMILIES

# config fields that do not change the network (bookkeeping, generation defaults, dtype)
IGNORED_CONFIG_FIELDS = frozenset(
    {
        "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype",
        "use_cache", "output_attentions", "output_hidden_states", "return_dict", "id2label",
        "label2id", "problem_type", "pad_token_id", "bos_token_id", "eos_token_id",
    }
)  # fmt: skip
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_MISSING = "<missing>"


class DirSource:
    """An HF directory: config.json plus model.safetensors or a sharded safetensors index."""

    def __init__(self, path, stack, label):
        self.path = Path(path)
        self.label = f"{label} ({self.path})"
        self.path_parts = self.path.resolve().parts
        if not self.path.is_dir():
            raise ValueError(f"{self.label}: not a directory")
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{self.label}: no config.json")
        try:
            self.config = transformers.AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.label}: cannot read config.json ({err})") from err
        self._handles, self._file_of = {}, {}
        for file in self._weight_files():
            handle = self._open(file, stack)
            for key in handle.keys():
                self._file_of[key] = file
        self.shapes = {k: tuple(self._slice(k).get_shape()) for k in self._file_of}
        embed = "model.embed_tokens.weight"
        self.dtype = _DTYPES.get(self._slice(embed).get_dtype()) if embed in self._file_of else None

    def _weight_files(self):
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({self.path / f for f in weight_map.values()})
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        pickled = sorted(p.name for p in self.path.glob("*.bin"))
        why = f"only pickle files {pickled}, which are never loaded" if pickled else "no weights"
        raise ValueError(f"{self.label}: needs model.safetensors (or a sharded index); found {why}")

    def _open(self, file, stack):
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{self.label}: {file.name} is not a readable safetensors file ({err})"
            ) from err
        self._handles[file] = handle
        return handle

    def _slice(self, key):
        return self._handles[self._file_of[key]].get_slice(key)

    def get(self, key):
        return self._handles[self._file_of[key]].get_tensor(key)

    def vocab(self):
        file = self.path / "tokenizer.json"
        if not file.is_file():
            return None
        import tokenizers

        return tokenizers.Tokenizer.from_file(str(file)).get_vocab(with_added_tokens=True)


class ModelSource:
    """A PreTrainedModel already in memory (its tensors are the caller's, not copies)."""

    def __init__(self, model, label):
        self.label = f"{label} ({type(model).__name__})"
        self.path_parts = None
        self.config = model.config
        self._state = model.state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}
        embed = self._state.get("model.embed_tokens.weight")
        self.dtype = None if embed is None else embed.dtype

    def get(self, key):
        return self._state[key].detach()

    def vocab(self):
        return None


@contextlib.contextmanager
def open_sources(experts, base_dir=None):
    """Yield (sources, base_source or None); file handles close when the block ends."""
    with contextlib.ExitStack() as stack:
        sources = [_open_one(x, stack, f"experts[{i}]") for i, x in enumerate(experts)]
        base = None if base_dir is None else DirSource(base_dir, stack, "shared base")
        yield sources, base


def _open_one(expert, stack, label):
    if isinstance(expert, transformers.PreTrainedModel):
        return ModelSource(expert, label)
    if isinstance(expert, (str, Path)):
        return DirSource(expert, stack, label)
    raise ValueError(
        f"{label} must be a model directory or a PreTrainedModel, got {type(expert).__name__}"
    )


def _comparable(config):
    return {k: v for k, v in config.to_dict().items() if k not in IGNORED_CONFIG_FIELDS}


def check_configs(sources, base=None):
    """The common dense config, or ValueError naming the first family or field that differs."""
    first, others = sources[0], [*sources[1:], *([base] if base else [])]
    family = first.config.model_type
    if family not in FAMILIES:
        raise ValueError(
            f"{first.label} is a {family!r} model; upcycle supports {sorted(FAMILIES)}"
        )
    reference = _comparable(first.config)
    for other in others:
        if other.config.model_type != family:
            raise ValueError(
                f"experts must be one family: {first.label} is {family!r} but {other.label} "
                f"is {other.config.model_type!r}"
            )
        fields = _comparable(other.config)
        for key in sorted(reference.keys() | fields.keys()):
            mine, theirs = reference.get(key, _MISSING), fields.get(key, _MISSING)
            if mine != theirs:
                raise ValueError(
                    f"config field {key!r} differs: {first.label} has {mine!r}, "
                    f"{other.label} has {theirs!r}"
                )
    config = first.config
    if getattr(config, "mlp_bias", False) or config.hidden_act != "silu":
        raise ValueError(
            f"{first.label}: DUME experts are SwiGLU MLPs without bias; got mlp_bias="
            f"{getattr(config, 'mlp_bias', False)}, hidden_act={config.hidden_act!r}"
        )
    return config


def check_vocabularies(sources, base=None):
    """Tokenizers shipped in the directories must agree token for token."""
    with_vocab = [(s, s.vocab()) for s in [*sources, *([base] if base else [])]]
    with_vocab = [(s, v) for s, v in with_vocab if v is not None]
    if len(with_vocab) < 2:
        return
    (first, reference), rest = with_vocab[0], with_vocab[1:]
    for other, vocab in rest:
        if vocab == reference:
            continue
        for token in sorted(reference.keys() | vocab.keys()):
            if reference.get(token) != vocab.get(token):
                raise ValueError(
                    f"tokenizer vocabularies differ: token {token!r} has id "
                    f"{reference.get(token)} in {first.label} but {vocab.get(token)} in "
                    f"{other.label}"
                )


def check_tensors(sources, base, layout):
    """Every tensor of `layout` (name -> shape) is present with that shape in every source."""
    for source in [*sources, *([base] if base else [])]:
        for key, shape in layout.items():
            if source is base and ".mlp." in key:
                continue  # the base's MLP is not used
            if key not in source.shapes:
                raise ValueError(f"{source.label} is missing tensor {key!r}")
            if source.shapes[key] != shape:
                raise ValueError(
                    f"tensor {key!r} has shape {list(source.shapes[key])} in {source.label}, "
                    f"expected {list(shape)}"
                )
