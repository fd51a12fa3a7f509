"""`simpletuner options` shows every option; docs/OPTIONS.md is the generated text."""

import subprocess
import sys

from simpletuner.commands.options import docs_path
from simpletuner.config.describe import DOCS_COMMAND, render_markdown, render_text
from simpletuner.config.schema import DatasetConfig, ParquetOptions, TrainingConfig


def test_docs_options_md_is_up_to_date():
    committed = docs_path().read_text(encoding="utf-8") if docs_path().exists() else ""
    assert committed == render_markdown(), (
        f"docs/OPTIONS.md is out of date with the schema: regenerate it with `{DOCS_COMMAND}` and commit it"
    )


def test_every_option_is_listed_with_type_default_choices_and_help():
    text = render_text()
    for name in TrainingConfig.model_fields:
        assert f"\n{name} (" in text
    for name in DatasetConfig.model_fields:
        assert f"\n{name} (" in text
    for name in ParquetOptions.model_fields:
        assert f"\nparquet.{name} (" in text
    assert 'lr_scheduler (choice) default: "constant_with_warmup"' in text
    assert "accepted: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, sine" in text
    assert "model_family (choice) default: required" in text
    assert "Peak learning rate." in text


def test_every_field_has_a_description():
    for model in (TrainingConfig, DatasetConfig, ParquetOptions):
        missing = [name for name, info in model.model_fields.items() if not info.description]
        assert missing == [], f"{model.__name__} fields without a description: {missing}"


def test_markdown_lists_unsupported_simpletuner_options():
    text = render_markdown()
    assert "| `learning_rate` | float | 0.0001 |" in text
    assert "- `use_8bit_adam`: use optimizer=adamw8bit" in text
    assert "- `disable_benchmark`: we run no start-up benchmark" in text


def test_options_command_filters_and_prints_markdown():
    result = subprocess.run([sys.executable, "-m", "simpletuner", "options", "lora_rank"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "lora_rank (int) default: 16" in result.stdout
    assert "learning_rate (" not in result.stdout
    result = subprocess.run([sys.executable, "-m", "simpletuner", "options", "--markdown"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == render_markdown()


def test_write_docs_writes_the_markdown(tmp_path):
    target = tmp_path / "OPTIONS.md"
    result = subprocess.run([sys.executable, "-m", "simpletuner.commands.options", "--write-docs", str(target)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert target.read_text() == render_markdown()
