"""Webhooks against a local recording server: config parsing, a dead endpoint, secrets kept out of logs."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from http_recorder import Recorder
from train_helpers import write_run

from simpletuner.cli import main
from simpletuner.errors import ConfigError
from simpletuner.publish.background import Retry
from simpletuner.publish.webhooks import WebhookNotifier, parse_webhook_config


def test_a_file_or_inline_json_with_one_target_or_a_list(tmp_path: Path) -> None:
    file = tmp_path / "hook.json"
    file.write_text(json.dumps({"webhook_type": "discord", "webhook_url": "https://discord.test/api/webhooks/1/x",
                                "message_prefix": "run", "log_level": "ERROR"}))
    [discord] = parse_webhook_config(str(file))
    assert (discord.kind, discord.message_prefix, discord.log_level) == ("discord", "run", "error")
    assert discord.hears("error") and not discord.hears("info") and "discord.test" not in repr(discord)
    targets = parse_webhook_config('[{"webhook_type": "raw", "callback_url": "http://127.0.0.1:9/a"},'
                                   ' {"webhook_type": "raw", "webhook_url": "http://127.0.0.1:9/b"}]')
    assert [t.url for t in targets] == ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]


@pytest.mark.parametrize("text, phrase", [
    ('{"webhook_type": "slack", "webhook_url": "https://x"}', "webhook_type is 'slack'; accepted: discord, raw"),
    ('{"webhook_type": "discord"}', "discord webhook needs webhook_url"),
    ('{"webhook_type": "raw", "callback_url": "ftp://x"}', "raw webhook needs webhook_url (or callback_url)"),
    ('{"webhook_type": "raw", "callback_url": "http://x", "log_level": "loud"}', "log_level 'loud' is not one of"),
    ('[1, 2]', "must be a JSON object (or a list of objects)"),
    ('{"webhook_type": ', "not valid JSON"),
])
def test_malformed_configs_are_refused_by_name(text: str, phrase: str) -> None:
    with pytest.raises(ConfigError, match="webhook_config") as error:
        parse_webhook_config(text)
    assert phrase in str(error.value)


def test_a_malformed_webhook_file_stops_train_with_exit_2(tmp_path, tiny_model, capsys) -> None:
    hooks = tmp_path / "hooks.json"
    hooks.write_text('{"webhook_type": "discord", "webhook_url": ')
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", webhook_config=str(hooks))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"webhook_config '{hooks}': not valid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "output" / "checkpoints").exists()
    assert main(["config", "check", str(config)]) == 2
    assert f"webhook_config '{hooks}': not valid JSON" in capsys.readouterr().err


def _dead_url() -> str:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/secret-hook-path"


def _run(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(total_steps=10, cfg=SimpleNamespace(model_family="sd1x", model_type="lora"))


def test_a_dead_endpoint_costs_a_bounded_retry_and_a_warning_without_its_url(tmp_path) -> None:
    alive = Recorder(lambda request: (500, "text/plain", b"down") if request.path.endswith("/down")
                     else (200, "text/plain", b"ok"))
    targets = parse_webhook_config(json.dumps([
        {"webhook_type": "raw", "callback_url": _dead_url()},
        {"webhook_type": "raw", "callback_url": alive.url + "/secret-hook-path/down"},
        {"webhook_type": "raw", "callback_url": alive.url + "/secret-hook-path/up"}]))
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("simpletuner")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        notifier = WebhookNotifier(targets, "proj", retry=Retry(tries=2, backoff=0.01), timeout=2)
        started = time.perf_counter()
        notifier.on_start(_run(tmp_path), 0)
        queued = time.perf_counter() - started
        notifier.on_error("CUDA out of memory")
        notifier.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    assert queued < 0.5, "sending blocked the caller"
    down = [r for r in alive.requests if r.path.endswith("/down")]
    up = [json.loads(r.body) for r in alive.requests if r.path.endswith("/up")]
    alive.close()
    assert len(down) == 4  # two events, two tries each
    assert [item["message_type"] for item in up] == ["training_start", "error"]
    assert up[1]["message"] == "Training failed: CUDA out of memory" and up[0]["message_prefix"] == "proj"
    assert len(notifier.worker.failures) == 4
    text = "\n".join(lines)
    assert "webhook 1 (raw) training_start failed after 2 tries: ConnectionError" in text
    assert "webhook 2 (raw) error failed after 2 tries: HTTP 500" in text
    assert "secret-hook-path" not in text and "127.0.0.1" not in text
