"""Upload to the Hugging Face Hub (`push_to_hub`, `hub_model_id`, `push_checkpoints_to_hub`,
`model_card_private`) through huggingface_hub's `create_repo` and `upload_folder`.

The repository is created when training starts; every checkpoint's weight files (with
`push_checkpoints_to_hub`) go to `checkpoints/step-N/`, and the final model with its model card
and card images to the repository's root (a full run's pipeline folder becomes the root, so
`DiffusionPipeline.from_pretrained(hub_model_id)` loads it). Uploads run on a background thread,
retried with backoff; one that still fails is reported and the local files stay where they are.
The token comes from HF_TOKEN or huggingface_hub's login and is never logged or written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.errors import ConfigError, UserError
from simpletuner.log import get_logger
from simpletuner.publish.background import BackgroundWorker, Retry
from simpletuner.publish.card import CARD_FILE, IMAGES_FOLDER
from simpletuner.train.events import NoEvents

if TYPE_CHECKING:
    from simpletuner.train.setup import Run

logger = get_logger(__name__)
CHECKPOINT_FILES = ("*.safetensors", "*adapter_config.json")  # weights only: no optimiser, RNG or config


def hub_option_problem(cfg: Any) -> str | None:
    """What is wrong with cfg's Hub options (push_to_hub without a valid hub_model_id), or None."""
    if not cfg.push_to_hub:
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not cfg.hub_model_id:
        return ("push_to_hub is set but hub_model_id is not: set hub_model_id to the repository to upload to, "
                "e.g. your-name/my-lora")
    try:
        validate_repo_id(cfg.hub_model_id)
    except HFValidationError as error:
        return f"hub_model_id {cfg.hub_model_id!r} is not a Hub repository id ({error})"
    if "/" not in cfg.hub_model_id:
        return f"hub_model_id {cfg.hub_model_id!r}: name the owner too, as owner/name"
    return None


def check_hub_options(cfg: Any) -> str | None:
    """The Hub token when cfg pushes to the Hub (None when it does not); ConfigError/UserError for bad input."""
    if not cfg.push_to_hub:
        return None
    from huggingface_hub import get_token

    if problem := hub_option_problem(cfg):
        raise ConfigError(problem)
    token = get_token()
    if not token:
        raise UserError("push_to_hub: no Hugging Face token found; set HF_TOKEN or log in with `hf auth login` "
                        "before training")
    return token


class HubUploader(NoEvents):
    """Creates the repository at the start and uploads checkpoints and the final model in the background."""

    def __init__(self, repo_id: str, token: str, *, private: bool = False, checkpoints: bool = False,
                 endpoint: str | None = None, retry: Retry = Retry(tries=4, backoff=5.0)) -> None:
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.private = private
        self.checkpoints = checkpoints
        self.api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
        self.worker = BackgroundWorker("hub upload", retry)
        self.output_dir: Path | None = None
        self.full = False
        self._staging: list[tempfile.TemporaryDirectory] = []

    @property
    def failures(self) -> list[str]:
        return self.worker.failures

    def on_start(self, run: Run, step: int) -> None:
        self.output_dir = Path(run.cfg.output_dir)
        self.full = run.trained.kind not in ("lora", "lycoris")
        self.worker.submit(f"creating Hub repository {self.repo_id}", self._create_repo)

    def on_checkpoint(self, step: int, path: Path) -> None:
        if not self.checkpoints:
            return
        staged = self._stage(path)  # a copy: rotation may delete the checkpoint before the upload reads it
        self.worker.submit(f"uploading {path.name} to {self.repo_id}", lambda: self.api.upload_folder(
            repo_id=self.repo_id, folder_path=staged, path_in_repo=f"checkpoints/{path.name}",
            allow_patterns=list(CHECKPOINT_FILES), commit_message=f"Checkpoint {path.name}"))

    def on_finish(self, step: int, outputs: list[Path]) -> None:
        assert self.output_dir is not None, "on_start comes first"
        root = self.output_dir
        patterns = [CARD_FILE, f"{IMAGES_FOLDER}/*"]
        for output in outputs:
            if output.is_dir() and self.full:
                self.worker.submit(f"uploading the pipeline to {self.repo_id}", lambda o=output: self.api.upload_folder(
                    repo_id=self.repo_id, folder_path=o, commit_message=f"Model after {step} steps"))
            elif output.is_dir():
                patterns.append(f"{output.relative_to(root).as_posix()}/*")
            else:
                patterns.append(output.relative_to(root).as_posix())
        self.worker.submit(f"uploading the final model to {self.repo_id}", lambda: self.api.upload_folder(
            repo_id=self.repo_id, folder_path=root, allow_patterns=patterns,
            commit_message=f"Model card and weights after {step} steps"))

    def close(self) -> None:
        if self.worker.pending():
            logger.warning("waiting for %d Hub upload(s) to %s to finish", self.worker.pending(), self.repo_id)
        self.worker.close()
        for staged in self._staging:
            staged.cleanup()
        if self.failures:
            logger.error("Hub upload to %s: %d upload(s) failed; the local files are kept in output_dir:\n  %s",
                         self.repo_id, len(self.failures), "\n  ".join(self.failures))
        elif self.output_dir is not None:
            logger.info("Hub uploads to %s finished", self.repo_id)

    def _create_repo(self) -> None:
        url = self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
        logger.info("Hub repository %s ready (%s)", self.repo_id, "private" if self.private else "public")
        return url

    def _stage(self, checkpoint: Path) -> Path:
        staging = tempfile.TemporaryDirectory(prefix=".hub-", dir=self.output_dir)
        self._staging.append(staging)
        target = Path(staging.name)
        for source in checkpoint.rglob("*"):
            relative = source.relative_to(checkpoint)
            if source.is_file() and (source.suffix == ".safetensors" or source.name == "adapter_config.json"):
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / relative)
        return target
