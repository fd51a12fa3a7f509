"""Hub upload against a local Hub stand-in (HF_ENDPOINT on 127.0.0.1): failures are retried, then
reported, and never lose local files; bad Hub options stop `train` with exit 2 before any step."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from hub_fake import FakeHub
from train_helpers import write_run

from simpletuner.cli import main
from simpletuner.publish.background import Retry
from simpletuner.publish.hub import HubUploader


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def _output(tmp_path: Path) -> tuple[Path, SimpleNamespace]:
    output = tmp_path / "output"
    (output / "images").mkdir(parents=True)
    (output / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    (output / "images" / "a.png").write_bytes(b"\x89PNG fake")
    (output / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (output / "optimizer.pt").write_bytes(b"not uploaded")
    run = SimpleNamespace(cfg=SimpleNamespace(output_dir=str(output)), trained=SimpleNamespace(kind="lora"))
    return output, run


class _Logs(logging.Handler):
    """Collects what the `simpletuner` loggers say at INFO and above (they may not propagate to the root)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> _Logs:
        logger = logging.getLogger("simpletuner")
        self.previous = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("simpletuner")
        logger.removeHandler(self)
        logger.setLevel(self.previous)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def test_a_server_error_is_retried_then_reported_and_the_local_files_stay(tmp_path, hub) -> None:
    output, run = _output(tmp_path)
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    hub.fail["/api/repos/create"] = 500
    uploader = HubUploader("me/lora", "hf_secret", endpoint=hub.url, retry=Retry(tries=3, backoff=0.01))
    with _Logs() as logs:
        uploader.on_start(run, 0)
        uploader.on_finish(4, [output / "pytorch_lora_weights.safetensors"])
        uploader.close()
    creates = [r for r in hub.requests if r.path == "/api/repos/create"]
    assert len(creates) == 3, "the repository creation was not retried"
    assert len(uploader.failures) == 2
    assert "creating Hub repository me/lora failed after 3 tries" in uploader.failures[0]
    assert "uploading the final model to me/lora failed after 3 tries" in uploader.failures[1]
    assert "2 upload(s) failed; the local files are kept" in logs.text and "hf_secret" not in logs.text
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
    assert hub.repos == {}


def test_a_transient_error_is_retried_until_the_upload_succeeds(tmp_path, hub) -> None:
    output, run = _output(tmp_path)
    answer = hub.recorder.answer
    calls = {"commit": 0}

    def flaky(request):
        if "/commit/" in request.path and calls["commit"] == 0:
            calls["commit"] += 1
            return 400, "application/json", b'{"error": "try again"}'  # 400: huggingface_hub does not retry it
        return answer(request)

    hub.recorder.answer = flaky
    uploader = HubUploader("me/lora", "hf_secret", endpoint=hub.url, retry=Retry(tries=3, backoff=0.01))
    uploader.on_start(run, 0)
    uploader.on_finish(4, [output / "pytorch_lora_weights.safetensors"])
    uploader.close()
    assert uploader.failures == []
    assert set(hub.repos["me/lora"]["files"]) == {"README.md", "images/a.png", "pytorch_lora_weights.safetensors"}
    assert hub.repos["me/lora"]["private"] is False


@pytest.mark.parametrize("options, phrase", [
    ({"push_to_hub": True}, "push_to_hub is set but hub_model_id is not"),
    ({"push_to_hub": True, "hub_model_id": "me/bad--name.."},
     "hub_model_id 'me/bad--name..' is not a Hub repository id"),
    ({"push_to_hub": True, "hub_model_id": "lonely"}, "hub_model_id 'lonely': name the owner too"),
])
def test_bad_hub_options_stop_before_training(tmp_path, tiny_model, capsys, options, phrase) -> None:
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", **options)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err
    assert not (tmp_path / "output" / "checkpoints").exists()
    assert main(["config", "check", str(config)]) == 2
    assert phrase in capsys.readouterr().err


def test_a_missing_token_stops_before_any_step(tmp_path, tiny_model, capsys, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login there
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", push_to_hub=True, hub_model_id="me/lora")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "push_to_hub: no Hugging Face token found; set HF_TOKEN" in err and "Traceback" not in err
    assert not (tmp_path / "output" / "metrics.jsonl").exists()
