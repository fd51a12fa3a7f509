"""Every SimpleTuner option has a place: a schema field, another spelling, ignored with a reason, or unsupported."""

from pathlib import Path

from simpletuner.config.compat import (
    ALIASES, DATASET_ALIASES, DATASET_IGNORED, DATASET_UNSUPPORTED, ENV_NAMES, FAMILY_SWITCHES, IGNORED, UNSUPPORTED,
)
from simpletuner.config.schema import DatasetConfig, TrainingConfig

# The options of SimpleTuner's helpers/configuration/cmd_args.py (2025), plus older switches.
SIMPLETUNER_OPTIONS = (Path(__file__).parent / "data" / "simpletuner_options.txt").read_text().split()
TRANSLATED = {"offset_noise", "use_bitfit"} | set(FAMILY_SWITCHES)


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
