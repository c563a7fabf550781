"""Upload a saved adapter to the Hugging Face Hub (``huggingface_hub``'s ``create_repo`` then
``upload_folder``), as transformers' ``push_to_hub`` does for a model with an adapter."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from .errors import HotswapError


def push_adapter_folder(
    write: Callable[[Path], object],
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> str:
    """Write an adapter into a temporary directory with ``write(directory)`` and upload it.

    Args:
        write: writes the adapter's files into the directory it is given.
        repo_id: ``"user/name"``; created (model repo) if it does not exist.
        endpoint: the Hub's URL (default: ``huggingface_hub``'s, i.e. ``HF_ENDPOINT``).
        The rest: as ``huggingface_hub.HfApi.upload_folder``.

    Returns:
        The commit's URL (the pull request's when ``create_pr``).

    Raises:
        HotswapError: ``repo_id`` is not a string; the Hub's own errors pass through.
    """
    if not isinstance(repo_id, str) or not repo_id:
        raise HotswapError(f"push_to_hub needs a repo id like 'user/name', got {repo_id!r}")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="hotswap-push-") as directory:
        write(Path(directory))
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=directory,
            commit_message=commit_message or "Upload adapter with hotswap_rt",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    return str(info.pr_url or info.commit_url)
