"""Webhook notifications (`webhook_config`), as SimpleTuner's: Discord and raw JSON targets.

`webhook_config` is a JSON file or inline JSON: one object or a list of them, each with
`webhook_type` ("discord" or "raw"), `webhook_url` (raw: `callback_url` is accepted too), and
optionally `message_prefix` (default: the tracker run name or project name) and `log_level`
(critical, error, warning, info (default) or debug: events above it are not sent).

Events: training start, validation images, checkpoint saved, error (its message), finish, and for raw
targets progress every `webhook_reporting_interval` steps. Discord gets `content` as JSON, or with images as
multipart form data, the images attached (at most 10 per message); raw targets get JSON (`message_type`, `message`, and
the event's fields; validation images as base64 PNG). Progress goes out at the first logging step
after each multiple of `webhook_reporting_interval`. Sending happens on a background thread with a
bounded retry; a dead endpoint costs a warning. URLs are secrets: no message names them.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.errors import ConfigError
from simpletuner.log import get_logger
from simpletuner.publish.background import BackgroundWorker, Retry
from simpletuner.train.events import NoEvents

if TYPE_CHECKING:
    from simpletuner.train.setup import Run

logger = get_logger(__name__)
LEVELS = {"critical": 0, "error": 1, "warning": 2, "info": 3, "debug": 4}
KINDS = ("discord", "raw")
DISCORD_ATTACHMENTS = 10
TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class WebhookTarget:
    kind: str  # discord | raw
    url: str
    message_prefix: str | None = None
    log_level: str = "info"

    def __repr__(self) -> str:  # the URL is a secret
        return f"WebhookTarget(kind={self.kind!r}, url=<hidden>, log_level={self.log_level!r})"

    def hears(self, level: str) -> bool:
        return LEVELS[level] <= LEVELS[self.log_level]


def parse_webhook_config(value: str) -> list[WebhookTarget]:
    """The targets of a `webhook_config` value (a JSON file's path or inline JSON); ConfigError if malformed."""
    text = value.strip()
    if text.startswith(("{", "[")):
        source = "webhook_config (inline JSON)"
    else:
        source = f"webhook_config {value!r}"
        try:
            text = Path(value).expanduser().read_text()
        except OSError as error:
            raise ConfigError(f"{source}: cannot be read ({error.strerror or error})") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}: not valid JSON ({error.msg} at line {error.lineno})") from error
    entries = data if isinstance(data, list) else [data]
    if not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError(f"{source}: must be a JSON object (or a list of objects) with webhook_type and webhook_url")
    return [_target(entry, source) for entry in entries]


def _target(entry: dict[str, Any], source: str) -> WebhookTarget:
    kind = entry.get("webhook_type")
    if kind not in KINDS:
        raise ConfigError(f"{source}: webhook_type is {kind!r}; accepted: {', '.join(KINDS)}")
    url = entry.get("webhook_url") or (entry.get("callback_url") if kind == "raw" else None)
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        key = "webhook_url (or callback_url)" if kind == "raw" else "webhook_url"
        raise ConfigError(f"{source}: {kind} webhook needs {key}, an http:// or https:// URL")
    level = str(entry.get("log_level") or "info").lower()
    if level not in LEVELS:
        raise ConfigError(f"{source}: log_level {level!r} is not one of {', '.join(LEVELS)}")
    prefix = entry.get("message_prefix")
    return WebhookTarget(kind, url, str(prefix) if prefix is not None else None, level)


def _describe(error: Exception) -> str:
    """A failure without its URL: the HTTP status, or the kind of connection error."""
    response = getattr(error, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return f"HTTP {response.status_code}"
    return type(error).__name__


class WebhookNotifier(NoEvents):
    """Sends training events to webhook targets from a background thread."""

    def __init__(self, targets: list[WebhookTarget], project: str, reporting_interval: int | None = None,
                 retry: Retry = Retry(tries=3, backoff=1.0), timeout: float = TIMEOUT_SECONDS) -> None:
        self.targets = targets
        self.project = project
        self.reporting_interval = reporting_interval
        self.timeout = timeout
        self.worker = BackgroundWorker("webhooks", retry, _describe)
        self.total_steps: int | None = None
        self._reported = 0  # intervals reported so far

    # ---- events
    def on_start(self, run: Run, step: int) -> None:
        self.total_steps = run.total_steps
        verb = f"resumed at step {step}" if step else "started"
        self._send("info", "training_start", f"Training {verb}: {run.total_steps} steps of "
                   f"{run.cfg.model_family} {run.cfg.model_type}.", {"step": step, "total_steps": run.total_steps})

    def on_progress(self, step: int, metrics: dict[str, float]) -> None:
        if not self.reporting_interval or step // self.reporting_interval <= self._reported:
            return
        self._reported = step // self.reporting_interval
        fields = {"step": step, "total_steps": self.total_steps, **metrics}
        self._send("info", "training_progress", f"Step {step} of {self.total_steps}: loss {metrics.get('loss', 0):.4f}",
                   fields, kinds=("raw",))

    def on_validation(self, step: int, images: list[Path]) -> None:
        if images:
            self._send("info", "validation", f"Validation images at step {step}.", {"step": step}, images)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._send("info", "checkpoint", f"Checkpoint saved at step {step}: {path.name}.",
                   {"step": step, "checkpoint": path.name})

    def on_error(self, message: str) -> None:
        self._send("error", "error", f"Training failed: {message}", {})

    def on_finish(self, step: int, outputs: list[Path]) -> None:
        self._send("info", "training_finish", f"Training finished after {step} steps: "
                   f"{', '.join(p.name for p in outputs)}.", {"step": step, "outputs": [p.name for p in outputs]})

    def close(self) -> None:
        self.worker.close()

    # ---- sending
    def _send(self, level: str, message_type: str, message: str, fields: dict[str, Any],
              images: list[Path] = (), kinds: tuple[str, ...] = KINDS) -> None:
        for number, target in enumerate(self.targets, start=1):
            if target.kind in kinds and target.hears(level):
                label = f"webhook {number} ({target.kind}) {message_type}"
                self.worker.submit(label, lambda t=target: self._post(t, message_type, message, fields, list(images)))

    def _post(self, target: WebhookTarget, message_type: str, message: str, fields: dict[str, Any],
              images: list[Path]) -> None:
        import requests

        prefix = target.message_prefix if target.message_prefix is not None else self.project
        if target.kind == "discord":
            content = f"`({prefix})` {message}" if prefix else message
            chunks = [images[i:i + DISCORD_ATTACHMENTS] for i in range(0, len(images), DISCORD_ATTACHMENTS)] or [[]]
            for chunk in chunks:
                files = {f"file{i}": (path.name, path.read_bytes(), "image/png") for i, path in enumerate(chunk)}
                if files:  # multipart: the message, then the images
                    response = requests.post(target.url, data={"content": content}, files=files, timeout=self.timeout)
                else:
                    response = requests.post(target.url, json={"content": content}, timeout=self.timeout)
                response.raise_for_status()
            return
        payload = {"message_type": message_type, "message": message, "message_prefix": prefix,
                   "timestamp": int(time.time()), **fields}
        if images:
            payload["images"] = [base64.b64encode(path.read_bytes()).decode() for path in images]
        requests.post(target.url, json=payload, timeout=self.timeout).raise_for_status()
