"""Where a checkpoint lives: a local directory, a hub id (cache or download), or a bundled real model."""

import json
import os
import sys
from pathlib import Path

from weights.errors import UserError

# Only what the engine reads: no *.bin, no *.pth, no original/ or consolidated.safetensors
# (Mistral repos carry both): first these small files, then exactly the shards the index names.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
]


def resolve(model: str | None) -> Path:
    """Return a local directory holding config.json, tokenizer and safetensors for `model`."""
    from weights.bundled import BUNDLED, DEFAULT_MODEL, ensure_bundled

    if model is None:
        return ensure_bundled(DEFAULT_MODEL)
    p = Path(model).expanduser()
    if model.lower() in BUNDLED and not p.exists():  # bundled names in any case (SmolLM2-135M-Instruct)
        return ensure_bundled(model.lower())
    twin = next((k for k, v in BUNDLED.items() if v["hub"].lower() == model.lower()), None)
    # a hub id we carry a copy of: the hub (cache) first, else the copy
    if twin is not None and not p.exists():
        try:
            return _from_hub(model)
        except UserError as e:
            if "not in the local Hugging Face cache" not in str(e):
                raise
            print(
                f"[refreekv] {model} is not in the Hugging Face cache and the hub cannot be reached: "
                f"using the bundled copy {twin} ({BUNDLED[twin]['model']}, "
                "converted from quantised GGUF weights)",
                file=sys.stderr,
            )
            return ensure_bundled(twin)
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        if not p.is_dir():
            raise UserError(
                f"{model}: no such model directory "
                f"(and not a hub id like Qwen/Qwen2.5-7B or one of: {', '.join(BUNDLED)})"
            )
        return p
    return _from_hub(model)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
        index = path / "model.safetensors.index.json"
        try:
            shards = (
                sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
            )
        except (ValueError, KeyError, AttributeError, TypeError):
            shards = []  # the loader reports a malformed index
        return Path(snapshot_download(repo_id, allow_patterns=shards or ["model.safetensors"]))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise UserError(
            f"model {repo_id} is not in the local Hugging Face cache and {why}; on a connected machine "
            f"run `hf download {repo_id}` (and copy the cache to $HF_HOME), or pass a local directory"
        ) from None
    except GatedRepoError:
        raise UserError(
            f"model {repo_id} is gated: accept its licence on the hub and log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"model {repo_id} does not exist on the hub (or is private)") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"could not fetch {repo_id}: {str(e).splitlines()[0]}") from None
