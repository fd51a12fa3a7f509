"""`simpletuner demo`: what it says about its images, its loss curve, and re-running it into the same folder."""

import json
import re
from pathlib import Path

from PIL import Image

from simpletuner.cli import main


def test_demo_draws_a_loss_curve_says_its_images_are_noise_and_reruns_afresh(tmp_path, capsys):
    root = tmp_path / "demo"
    for _ in range(2):
        assert main(["demo", "--output", str(root), "--steps", "4"]) == 0
        out = capsys.readouterr().out
        assert "validation images look like noise" in out and "random weights" in out
        output = root / "output"
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2, 3, 4]  # the second run did not append to the first's
        assert len(list((output / "logs").rglob("events.out.tfevents.*"))) == 1
    assert "removing the previous run's" in out
    # the demo writes what `simpletuner train` writes: the UI LoRA file, the run page and the model card
    assert (output / "report.html").is_file() and (output / "README.md").is_file()
    assert f"LoRA for ComfyUI, A1111/Forge: {output / 'output.safetensors'}" in out
    assert (output / "output.safetensors").is_file()
    with Image.open(output / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size == (640, 360)
        colours = {colour for _, colour in plot.convert("RGB").getcolors(640 * 360)}
    assert (30, 90, 200) in colours  # the curve is drawn, not just the frame


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--output", str(tmp_path), "--steps", "1"]) == 2
    assert "not made by `simpletuner demo`" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_readme_links_only_to_files_in_the_repository():
    root = Path(__file__).parents[1]
    text = (root / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text) + re.findall(r"`(\.\./[^`]+)`", text)
    assert links, "the README links docs/OPTIONS.md at least"
    for link in links:
        if "://" not in link:
            assert (root / link).resolve().is_relative_to(root) and (root / link).exists(), link
