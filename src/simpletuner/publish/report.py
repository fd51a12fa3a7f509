"""The run page: output_dir/report.html, rewritten at the start, at each validation, on an error and at
the end. Loss and learning-rate curves come from output_dir/metrics.jsonl (so a resumed run shows its
whole history); throughput and data-wait figures from the logging steps; images from the validation
folders; the dataset summary from the scan. The page stays on the training machine (it is never uploaded)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpletuner.atomic import written_atomically
from simpletuner.publish.card import existing_validation
from simpletuner.publish.report_page import DatasetSummary, PageData, SkippedFile, render_page
from simpletuner.train.events import NoEvents

if TYPE_CHECKING:
    from simpletuner.train.setup import Run

REPORT_FILE = "report.html"
_IMAGE_NAME = re.compile(r"^(?P<column>(?P<name>.+)-\d+x\d+)-(?P<i>\d+)\.png$")  # as validate.py names them


def dataset_summaries(run: Run) -> list[DatasetSummary]:
    """Images per bucket and skipped images (with reasons) of each dataset of the run."""
    summaries = []
    for name, data in run.data.datasets.items():
        assignment = data.assignment
        counts = assignment.bucket_counts().tolist()
        buckets = tuple((f"{w}x{h}", int(n)) for (w, h), n in zip(assignment.buckets, counts) if n)
        summaries.append(DatasetSummary(name, len(assignment), buckets, tuple(assignment.skipped.lines())))
    return summaries


def read_skipped(path: Path, roots: dict[str, str]) -> list[SkippedFile]:
    """The images listed in skipped.jsonl, each path relative to its dataset (`roots`: dataset id -> folder);
    an absolute path outside its dataset shows its name only. A torn line is left out."""
    if not path.is_file():
        return []
    files = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            dataset, shown = str(row["dataset"]), str(row["path"])
            files.append(SkippedFile(dataset, _relative(shown, roots.get(dataset)), str(row["stage"]),
                                     str(row["reason"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return files


def _relative(path: str, root: str | None) -> str:
    if not Path(path).is_absolute():
        return path
    if root and Path(path).is_relative_to(root):
        return Path(path).relative_to(root).as_posix()
    return Path(path).name


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a torn last line (a run killed mid-write) is left out."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunReport(NoEvents):
    """Keeps output_dir/report.html up to date."""

    def __init__(self) -> None:
        self.output_dir: Path | None = None
        self.page: PageData | None = None
        self.started = time.perf_counter()
        self.samples_per_second: list[float] = []
        self.data_wait = 0.0
        self.scan_report = ""
        self.prompts: dict[str, str] = {}  # validation prompt name -> prompt
        self.skipped_report: Path | None = None  # output_dir/skipped.jsonl, written by the run's data
        self.dataset_roots: dict[str, str] = {}  # dataset id -> its local folder

    def on_start(self, run: Run, step: int) -> None:
        cfg = run.cfg
        self.output_dir = Path(cfg.output_dir)
        self.started = time.perf_counter()
        self.scan_report = run.data.scan_report
        from simpletuner.train.setup import SKIPPED_REPORT  # the run (its module) is loaded by now

        self.skipped_report = self.output_dir / SKIPPED_REPORT
        self.dataset_roots = {d.id: d.instance_data_dir for d in run.settings.datasets if d.instance_data_dir}
        facts = [("model family", cfg.model_family), ("training", f"{cfg.model_type} ({run.trained.kind})"),
                 ("batch", f"{cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulation x "
                           f"{run.accelerator.num_processes} processes"),
                 ("learning rate", f"{cfg.learning_rate:g} ({cfg.lr_scheduler})"), ("optimizer", cfg.optimizer)]
        if run.trained.kind == "lora":
            facts.insert(2, ("rank / alpha", f"{cfg.lora_rank} / {cfg.lora_alpha or cfg.lora_rank}"))
        earlier = existing_validation(self.output_dir, step) if step else {}
        self.page = PageData(cfg.tracker_run_name or Path(cfg.output_dir).name, "training", step, run.total_steps,
                             facts, datasets=dataset_summaries(run))
        self.prompts = dict(run.validation.prompts) if run.validation else {}
        for earlier_step, images in earlier.items():  # a resumed run shows the images of its earlier steps too
            self._add_images(earlier_step, images)
        self._write()

    def on_progress(self, step: int, metrics: dict[str, float]) -> None:
        if self.page is None:
            return
        self.page.step = step
        if "samples_per_second" in metrics:
            self.samples_per_second.append(float(metrics["samples_per_second"]))
        self.data_wait += float(metrics.get("data_wait_seconds", 0.0))

    def on_validation(self, step: int, images: list[Path]) -> None:
        if self.page is None:
            return
        self.page.step = max(self.page.step, step)
        self._add_images(step, images)
        self._write()

    def _add_images(self, step: int, images: list[Path]) -> None:
        assert self.page is not None and self.output_dir is not None
        row = self.page.images.setdefault(step, {})
        for image in images:
            match = _IMAGE_NAME.match(image.name)
            column = image.stem
            if match:
                column = match.group("column") + (f" #{match.group('i')}" if match.group("i") != "0" else "")
                self.page.prompts[column] = self.prompts.get(match.group("name"), "")
            row[column] = image.relative_to(self.output_dir).as_posix()

    def on_error(self, message: str) -> None:
        if self.page is not None:
            self.page.status = f"failed: {message}"
            self._write()

    def on_finish(self, step: int, outputs: list[Path]) -> None:
        if self.page is not None:
            self.page.step, self.page.status = step, "finished"
            self.page.facts.append(("outputs", ", ".join(p.name for p in outputs)))
            self._write()

    def _write(self) -> None:
        assert self.page is not None and self.output_dir is not None
        rows = read_metrics(self.output_dir / "metrics.jsonl")
        self.page.loss = [(row["step"], row["loss"]) for row in rows if "loss" in row]
        self.page.lr = [(row["step"], row["lr"]) for row in rows if "lr" in row]
        self.page.throughput = self._throughput()
        self.page.scan_report = self.scan_report
        if self.skipped_report is not None:
            self.page.skipped = read_skipped(self.skipped_report, self.dataset_roots)
        text = render_page(self.page)
        with written_atomically(self.output_dir / REPORT_FILE) as temp:
            temp.write_text(text, encoding="utf-8")

    def _throughput(self) -> list[tuple[str, str]]:
        if not self.samples_per_second:
            return []
        wall = time.perf_counter() - self.started
        speeds = self.samples_per_second
        return [("samples per second (last logging step)", f"{speeds[-1]:.2f}"),
                ("samples per second (mean of logging steps)", f"{sum(speeds) / len(speeds):.2f}"),
                ("seconds waiting for data", f"{self.data_wait:.2f} ({100 * self.data_wait / max(wall, 1e-9):.1f}% "
                                             "of the time since the start)")]

