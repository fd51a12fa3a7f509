"""One tiny LoRA run that publishes everything: the model card, the Hub upload (to a local Hub stand-in
through HF_ENDPOINT), Discord and raw webhooks (to a local recording server) and the run page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import pytest
from bad_inputs import broken_png
from http_recorder import Recorder
from hub_fake import FakeHub
from train_helpers import write_run

from simpletuner.cli import main

pytestmark = pytest.mark.slow
TOKEN = "hf_test_secret_token_123"
SECRET_PATH = "/webhooks/secret-path-xyz"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> dict:
    root = tmp_path_factory.mktemp("published")
    base = root / "base-model"
    shutil.copytree(tiny_model("sd1x"), base)
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# a base model\n")
    hub = FakeHub()
    hooks = Recorder(lambda request: (204, "text/plain", b""))
    webhooks = [{"webhook_type": "discord", "webhook_url": hooks.url + SECRET_PATH + "/discord",
                 "message_prefix": "tiny"},
                {"webhook_type": "raw", "callback_url": hooks.url + SECRET_PATH + "/raw"}]
    from simpletuner.demo.dataset import write_dataset

    dataset = write_dataset(root / "dataset", count=12)
    (dataset / "broken.png").write_bytes(b"not an image")  # the scan skips it, with its reason
    (dataset / "sub").mkdir()
    broken_png(dataset / "sub" / "corrupt.png")  # a valid header: the scan keeps it, decoding it fails
    (dataset / "sub" / "corrupt.txt").write_text("a grey picture\n")
    config = write_run(root, base, "sd1x", dataset=dataset, push_to_hub=True, hub_model_id="me/tiny-lora",
                       push_checkpoints_to_hub=True,
                       model_card_private=True, model_card_note="A test of the card.",
                       webhook_config=json.dumps(webhooks), webhook_reporting_interval=2,  # inline JSON
                       tracker_run_name="tiny-run", report_to="tensorboard")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("SIMPLETUNER_LOG_LEVEL", "DEBUG")  # the secrets must stay out of every level
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    ours = logging.getLogger("simpletuner")  # every logger of the package, at every level
    ours.addHandler(handler)
    try:
        assert main(["train", str(config)]) == 0
    finally:
        ours.removeHandler(handler)
        monkeypatch.undo()
        hub.close()
        hooks.close()
    return {"root": root, "output": root / "output", "hub": hub, "hooks": hooks, "logs": "\n".join(records)}


def test_the_hub_repo_is_created_private_and_gets_the_model_card_weights_and_checkpoints(published) -> None:
    from huggingface_hub import ModelCard

    hub = published["hub"]
    repo = hub.repos["me/tiny-lora"]
    assert repo["private"] is True
    files = repo["files"]
    assert {"README.md", "pytorch_lora_weights.safetensors", "checkpoints/step-000002/pytorch_lora_weights.safetensors",
            "checkpoints/step-000004/pytorch_lora_weights.safetensors"} <= set(files)
    assert not any(name.endswith((".pt", "meta.json", "config.json")) or name == "report.html" for name in files)
    output = published["output"]
    assert files["pytorch_lora_weights.safetensors"] == (output / "pytorch_lora_weights.safetensors").read_bytes()
    images = [name for name in files if name.startswith("images/")]
    assert images and all(files[name] == (output / name).read_bytes() for name in images)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "base-model" and card.data.license == "creativeml-openrail-m"
    widget = card.data.to_dict()["widget"]
    assert widget and all(entry["output"]["url"] in files for entry in widget)
    auth = {request.headers.get("authorization") for request in hub.requests}
    assert auth == {f"Bearer {TOKEN}"}


def test_the_model_card_says_what_was_trained_and_how_to_load_it_with_no_local_paths(published) -> None:
    from huggingface_hub import ModelCard

    output = published["output"]
    text = (output / "README.md").read_text()
    card = ModelCard(text)
    data = card.data.to_dict()
    assert {"lora", "sd1x", "not-for-all-audiences", "text-to-image"} <= set(data["tags"])
    assert data["widget"][0]["text"] == "a red circle on a blue background"
    assert all((output / entry["output"]["url"]).is_file() for entry in data["widget"])
    assert "A test of the card." in text and "This is a LoRA of `base-model` (sd1x)" in text
    assert "| Rank / alpha | 4 / 4 |" in text and "| Steps | 4 |" in text
    assert "| shapes | 12 | 24x40, 32x32, 40x24 |" in text
    assert "StableDiffusionPipeline.from_pretrained('base-model'" in text
    assert "pipeline.load_lora_weights('me/tiny-lora', weight_name='pytorch_lora_weights.safetensors')" in text
    assert "ComfyUI" in text and "A1111/Forge" in text
    assert str(published["root"]) not in text and "/tmp" not in text and TOKEN not in text


def test_the_token_and_webhook_urls_are_never_logged_or_written(published) -> None:
    logs = published["logs"]
    assert "Hub repository me/tiny-lora ready (private)" in logs and "webhooks" not in logs  # heard, no failure
    assert TOKEN not in logs and SECRET_PATH not in logs
    files = [path for path in published["output"].rglob("*") if path.is_file()]
    assert any(path.name == "config.json" for path in files) and any("tfevents" in path.name for path in files)
    for path in files:  # checkpoints' config.json, TensorBoard's record of the configuration, card, page
        data = path.read_bytes()
        assert TOKEN.encode() not in data and SECRET_PATH.encode() not in data, path


def test_discord_gets_messages_and_the_validation_images_as_multipart_attachments(published) -> None:
    discord = [r for r in published["hooks"].requests if r.path.endswith("/discord")]
    contents, attachments = [], []
    for request in discord:
        if request.headers["content-type"] == "application/json":
            contents.append(json.loads(request.body)["content"])
            attachments.append([])
            continue
        assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode() + request.body)
        parts = list(message.iter_parts())
        contents.append(next(p.get_content() for p in parts if p.get_param("name", header="content-disposition")
                             == "content"))
        attachments.append([p for p in parts if p.get_filename()])
    assert contents[0].startswith("`(tiny)` Training started")
    assert any("Checkpoint saved at step 2: step-000002" in c for c in contents) and "Training finished" in contents[-1]
    validation = [(c, parts) for c, parts in zip(contents, attachments) if parts]
    assert [c for c, _ in validation] == ["`(tiny)` Validation images at step 0.",
                                          "`(tiny)` Validation images at step 4."]
    image = validation[-1][1][0]
    assert image.get_content_type() == "image/png" and image.get_content()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.get_content() == (published["output"] / "validation/step-4/validation-32x32-0.png").read_bytes()


def test_raw_webhooks_get_json_events_and_progress_at_the_interval(published) -> None:
    raw = [json.loads(r.body) for r in published["hooks"].requests if r.path.endswith("/raw")]
    types = [item["message_type"] for item in raw]
    assert types[0] == "training_start" and types[-1] == "training_finish"
    assert [item["step"] for item in raw if item["message_type"] == "training_progress"] == [2, 4]
    progress = next(item for item in raw if item["message_type"] == "training_progress")
    assert {"loss", "lr", "samples_per_second", "data_wait_seconds"} <= set(progress)
    assert [item["step"] for item in raw if item["message_type"] == "checkpoint"] == [2, 4]
    assert raw[-1]["outputs"] == ["pytorch_lora_weights.safetensors", "tiny-run.safetensors"]  # diffusers, UIs


def test_the_run_page_renders_with_curves_images_and_datasets(published, tmp_path: Path) -> None:
    from html.parser import HTMLParser

    page = published["output"] / "report.html"
    text = page.read_text()

    class Collect(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.images: list[str] = []
            self.polylines = 0
            self.scripts = 0

        def handle_starttag(self, tag: str, attrs: list) -> None:
            attributes = dict(attrs)
            self.images += [attributes["src"]] if tag == "img" else []
            self.polylines += tag == "polyline"
            self.scripts += tag == "script"

    parser = Collect()
    parser.feed(text)
    assert parser.polylines == 2 and parser.scripts == 0
    assert sorted(parser.images) == ["validation/step-0/validation-32x32-0.png",
                                     "validation/step-4/validation-32x32-0.png"]
    assert all((published["output"] / src).is_file() for src in parser.images)
    assert "finished: step 4 of 4" in text and "32x32" in text and "samples per second" in text
    assert "a red circle on a blue background" in text  # the prompt heads its column
    assert re.search(r"broken\.png[^<]*: [^<]*(cannot|identify|decode)", text, re.I), "the skipped file is not shown"


def test_the_run_page_lists_every_skipped_file_with_its_stage_and_reason(published) -> None:
    """A table of output_dir/skipped.jsonl: dataset, file (relative to the dataset), stage, reason."""
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.rows: list[list[str]] = []
            self.inside = False

        def handle_starttag(self, tag: str, attrs: list) -> None:
            self.inside = self.inside or (tag == "table" and ("class", "skipped") in attrs)
            if self.inside and tag == "tr":
                self.rows.append([])
            if self.inside and tag in ("td", "th"):
                self.rows[-1].append("")

        def handle_endtag(self, tag: str) -> None:
            self.inside = self.inside and tag != "table"

        def handle_data(self, data: str) -> None:
            if self.inside and self.rows and self.rows[-1]:
                self.rows[-1][-1] += data

    listed = [json.loads(line) for line in (published["output"] / "skipped.jsonl").read_text().splitlines()]
    parser = Rows()
    parser.feed((published["output"] / "report.html").read_text())
    head, *rows = parser.rows
    assert head == ["dataset", "file", "stage", "reason"]
    by_file = {row[1]: row for row in rows}
    assert len(rows) == len(listed) == 2, rows
    assert by_file["broken.png"][:3] == ["shapes", "broken.png", "scan"]
    assert by_file["sub/corrupt.png"][:3] == ["shapes", "sub/corrupt.png", "cache"]
    assert re.search(r"cannot|identify|decode|broken|truncated|corrupt", by_file["broken.png"][3], re.I)
    assert re.search(r"decod|corrupt|invalid|error|truncated", by_file["sub/corrupt.png"][3], re.I), by_file
    root = str(published["root"])
    assert not any(root in cell for row in rows for cell in row), "a training machine path on the page"


def test_the_skipped_table_is_capped_with_a_count() -> None:
    from simpletuner.publish.report_page import SKIPPED_SHOWN, PageData, SkippedFile, render_page

    files = [SkippedFile("shapes", f"img-{i}.png", "cache", "decode failed") for i in range(SKIPPED_SHOWN + 5)]
    page = render_page(PageData("run", "finished", 1, 1, skipped=files))
    assert page.count("decode failed") == SKIPPED_SHOWN and f"img-{SKIPPED_SHOWN - 1}.png" in page
    assert f"img-{SKIPPED_SHOWN}.png" not in page and f"and 5 more, {SKIPPED_SHOWN + 5} in all" in page


def test_the_run_page_screenshot_in_headless_chromium_shows_the_images(published, tmp_path: Path) -> None:
    page = published["output"] / "report.html"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the screenshot check needs it")
    import numpy as np
    from PIL import Image

    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert pixels.std() > 10, "the screenshot is blank"
    # the validation images are the only saturated colours on the page besides the blue curves: find them
    validation = np.asarray(Image.open(page.parent / "validation/step-4/validation-32x32-0.png").convert("RGB"))
    colours = {tuple(int(c) // 32 for c in pixel) for pixel in validation.reshape(-1, 3)[::7]}
    shown = {tuple(int(c) // 32 for c in pixel) for pixel in pixels.reshape(-1, 3)[::3]}
    assert len(colours & shown) >= max(3, len(colours) // 4), "the screenshot does not show the validation images"
    shutil.copy(shot, page.parent.parent / "report-screenshot.png")


def test_the_cards_diffusers_code_loads_this_output(published, tmp_path: Path, monkeypatch) -> None:
    import re

    text = (published["output"] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    # the same code, pointed at the local copies, on the CPU, in float32, with 2 steps
    code = (code.replace("'base-model'", repr(str(published["root"] / "base-model")))
            .replace("'me/tiny-lora'", repr(str(published["output"]))).replace("torch.bfloat16", "torch.float32")
            .replace(".to('cuda')", ".to('cpu')")
            .replace("pipeline('a red circle on a blue background')",
                     "pipeline('a red circle on a blue background', num_inference_steps=2, height=32, width=32)"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "card", "exec"), namespace)
    assert (tmp_path / "output.png").is_file()
    assert namespace["pipeline"].get_active_adapters(), "the card's code loaded no LoRA"


@pytest.mark.parametrize("kind", ["full", "lycoris"])
def test_the_cards_code_loads_full_and_lycoris_outputs(tmp_path: Path, tiny_model, monkeypatch, kind: str) -> None:
    import re

    options: dict = {"model_type": "full", "learning_rate": 1e-4} if kind == "full" else {}
    if kind == "lycoris":
        lycoris = tmp_path / "lokr.json"
        lycoris.write_text(json.dumps({"algo": "lokr", "factor": 4, "linear_dim": 10000, "linear_alpha": 1}))
        options = {"lora_type": "lycoris", "lycoris_config": str(lycoris), "init_lokr_norm": 1e-3}
    model = tiny_model("sd1x")
    config = write_run(tmp_path, model, "sd1x", max_train_steps=2, checkpointing_steps=10, validation_steps=2,
                       **options)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    text = (output / "README.md").read_text()
    assert (f"- {kind}" in text) and ("ComfyUI" not in text)
    assert (output / "report.html").is_file() and "finished: step 2 of 2" in (output / "report.html").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = (code.replace("'path/to/output", repr(str(output))[:-1]).replace(f"from_pretrained('{model.name}'",
                                                                           f"from_pretrained({str(model)!r}")
            .replace("torch.bfloat16", "torch.float32").replace(".to('cuda')", ".to('cpu')")
            .replace("pipeline('a red circle on a blue background')",
                     "pipeline('a red circle on a blue background', num_inference_steps=2, height=32, width=32)"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "card", "exec"), {})
    assert (tmp_path / "output.png").is_file()


def test_a_resumed_run_keeps_its_earlier_validation_images_in_the_card_and_page(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    first = write_run(tmp_path, model, "sd1x", max_train_steps=2, checkpointing_steps=2, validation_steps=2)
    assert main(["train", str(first)]) == 0
    longer = write_run(tmp_path, model, "sd1x", dataset=tmp_path / "dataset", max_train_steps=4,
                       checkpointing_steps=2, validation_steps=2, resume_from_checkpoint="latest")
    assert main(["train", str(longer)]) == 0
    output = tmp_path / "output"
    page = (output / "report.html").read_text()
    for step in (0, 2, 4):
        assert f'src="validation/step-{step}/validation-32x32-0.png"' in page
    card = (output / "README.md").read_text()
    assert "images/step-4-validation-32x32-0.png" in card and "images/step-0-validation-32x32-0.png" in card
