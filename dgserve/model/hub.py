"""Hugging Face Hub model ids (``google/diffusiongemma-26B-A4B-it``) as checkpoint directories, as ``vllm serve``
resolves them: through ``huggingface_hub``'s local cache (``HF_HUB_CACHE``/``HF_HOME``), with ``HF_TOKEN`` for
gated or private repositories, a ``revision`` (branch, tag or commit) and ``HF_HUB_OFFLINE=1`` to use the cache
only. Only the files dgserve reads are fetched: top-level safetensors weights, config, generation config and
the tokenizer and chat-template files (no pickles, no other formats, no subfolders).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

METADATA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                  "preprocessor_config.json", "processor_config.json")  # the last two: image preprocessing
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")
SUBFOLDERS = ("*/*",)  # fnmatch's * also matches "/": this keeps every pattern to the repository's top level
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")


class HubError(ValueError):
    """A model id the Hub (or the offline cache) cannot give; the message says why and what to do."""


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a path on this machine: the Hub's namespaced model ids (bare names are presets)."""
    if not _REPO_ID.fullmatch(name) or ".." in name or "--" in name or Path(name).exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def snapshot(repo_id: str, revision: str | None = None, *, weights: bool = True) -> Path:
    """The local directory of ``repo_id`` at ``revision`` (default: the main branch), downloading what the cache
    lacks; ``weights=False`` fetches the metadata files only (what an ingress needs to tokenize)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    patterns = [*METADATA_FILES, *WEIGHT_FILES] if weights else list(METADATA_FILES)
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                 ignore_patterns=list(SUBFOLDERS))
    except GatedRepoError:
        raise HubError(f"{where}: a gated repository; accept its terms on huggingface.co and set HF_TOKEN to a token "
                       "of that account") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: no such model on the Hugging Face Hub, or it is private (set HF_TOKEN to a token "
                       "that can read it)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id}: no revision {revision!r} (give a branch, tag or commit of the repository)") \
            from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise HubError(f"{where}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                       "download it once with network access, or point HF_HUB_CACHE at a cache that has it") \
            from None
    except HfHubHTTPError as exc:
        raise HubError(f"{where}: the Hugging Face Hub answered {exc}") from None
    log.info("%s: using %s", where, path)
    return Path(path)
