"""JSON command-line options laid over a configuration's defaults (`--trust`, `--oneshot`,
`--iterative`): only the dataclass's field names are accepted, so a typo fails by name before
any training starts."""

import json
from dataclasses import fields


def json_overrides(text, base, cls, option, exclude=()):
    """The JSON object `text` of `cls`'s fields (less `exclude`) laid over the dict `base`."""
    extra = json.loads(text)
    known = {f.name for f in fields(cls)} - set(exclude)
    if not isinstance(extra, dict) or set(extra) - known:
        raise ValueError(f"{option} must be a JSON object of {sorted(known)}, got {extra!r}")
    return {**base, **extra}
