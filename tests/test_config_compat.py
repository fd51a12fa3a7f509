"""Every SimpleTuner option has a place: a schema field, another spelling, ignored with a reason, or unsupported."""

import shlex
from pathlib import Path

from pydantic_core import PydanticUndefined

from simpletuner.config.compat import (
    ALIASES, DATASET_ALIASES, DATASET_IGNORED, DATASET_UNSUPPORTED, ENV_NAMES, FAMILY_SWITCHES, IGNORED, UNSUPPORTED,
)
from simpletuner.config.schema import DatasetConfig, TrainingConfig

# The options of SimpleTuner's helpers/configuration/cmd_args.py (2025), plus older switches.
SIMPLETUNER_OPTIONS = (Path(__file__).parent / "data" / "simpletuner_options.txt").read_text().split()
TRANSLATED = {"offset_noise", "use_bitfit", "ema_cpu_only"} | set(FAMILY_SWITCHES)


def test_every_simpletuner_option_is_classified():
    known = set(TrainingConfig.model_fields) | set(ALIASES) | set(IGNORED) | set(UNSUPPORTED) | TRANSLATED
    assert [name for name in SIMPLETUNER_OPTIONS if name not in known] == []


def test_every_env_name_maps_to_a_known_option():
    known = set(TrainingConfig.model_fields) | set(IGNORED) | set(UNSUPPORTED) | TRANSLATED
    assert sorted(set(ENV_NAMES.values()) - known) == []


def test_compat_lists_do_not_shadow_schema_fields():
    # A field added to schema.py must be removed from compat.py's lists (the field wins, the docs would lie).
    for names, fields in ((set(ALIASES) | set(IGNORED) | set(UNSUPPORTED), TrainingConfig.model_fields),
                          (set(DATASET_ALIASES) | set(DATASET_IGNORED) | set(DATASET_UNSUPPORTED),
                           DatasetConfig.model_fields)):
        assert sorted(names & set(fields)) == []
    assert set(ALIASES.values()) <= set(TrainingConfig.model_fields)
    assert set(DATASET_ALIASES.values()) <= set(DatasetConfig.model_fields)


# SimpleTuner's current field registry: "name default" per line (see the file's header).
CURRENT = [line.split(None, 1) for line in
           (Path(__file__).parent / "data" / "simpletuner_options_current.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
COMPATIBILITY_MD = (Path(__file__).parents[1] / "docs" / "COMPATIBILITY.md").read_text()


def _upstream_default(text: str):
    text = shlex.split(text)[0] if text.strip() != '""' else ""
    if text == "-":
        return PydanticUndefined
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_every_current_release_option_is_classified():
    known = set(TrainingConfig.model_fields) | set(ALIASES) | set(IGNORED) | set(UNSUPPORTED) | TRANSLATED
    assert len(CURRENT) > 350
    assert [name for name, _ in CURRENT if name not in known] == []


def test_current_release_defaults_match_or_are_listed_with_a_reason():
    defaults_table = COMPATIBILITY_MD.split("## Defaults that differ", 1)[1]
    differing = []
    for name, default in CURRENT:
        field = ALIASES.get(name, name)
        upstream = _upstream_default(default)
        if field not in TrainingConfig.model_fields or upstream is PydanticUndefined:
            continue
        ours = TrainingConfig.model_fields[field].default
        if ours != upstream and not (ours is PydanticUndefined and upstream is None):
            differing.append(name)
            assert f"| `{name}` |" in defaults_table, f"{name}: SimpleTuner {upstream!r}, here {ours!r}, not listed"
    assert {"max_grad_norm", "lora_dropout", "checkpoints_total_limit", "grad_clip_method"} <= set(differing)


# SimpleTuner's default asks for what we lack here (docs/COMPATIBILITY.md lists it).
REFUSED_AT_SIMPLETUNERS_DEFAULT = {"huber_schedule"}


def test_unsupported_options_at_simpletuners_default_are_harmless():
    # A current-release file that writes an option we lack at SimpleTuner's default asks for nothing we lack.
    refused = [name for name, default in CURRENT if name in UNSUPPORTED
               and (upstream := _upstream_default(default)) is not PydanticUndefined
               and not UNSUPPORTED[name].is_harmless(upstream)]
    assert refused == sorted(REFUSED_AT_SIMPLETUNERS_DEFAULT)
    assert "| `huber_schedule` |" in COMPATIBILITY_MD
