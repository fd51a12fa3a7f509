"""Bad configurations, as data: each row is a mistake a person can make, and a fragment of the one line
`simpletuner config check` must answer with (exit 2, no traceback). Driven by
tests/test_config_errors.py::test_bad_configuration_corpus.

Row fields (all but name and expect optional):
  name      a short id
  options   merged into a good config.json (written with json.dumps: inf and nan become Infinity and NaN)
  datasets  the dataset entries instead of the good ones; folder "images" holds one PNG, "empty" none
  raw       (file name, text): the configuration file itself, instead of a config.json
  files     {name: text} written beside the configuration
  overrides command-line arguments after the file
  block     top-level modules made unimportable in the checking process (sys.modules[name] = None),
            as on a machine where that optional package is not installed
  expect    a fragment of stderr
  lines     how many lines stderr has (default 1)
"""

GOOD_DATASETS = [
    {"id": "photos", "instance_data_dir": "images", "caption_strategy": "filename"},
    {"id": "embeds", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
]
DEEP = 100_000

ROWS = [
    {"name": "infinite_learning_rate", "options": {"learning_rate": float("inf")},
     "expect": "learning_rate: inf is not accepted"},
    {"name": "nan_learning_rate", "options": {"learning_rate": float("nan")},
     "expect": "learning_rate: nan is not accepted"},
    {"name": "infinite_learning_rate_in_toml",
     "raw": ("config.toml", 'model_family = "sdxl"\npretrained_model_name_or_path = "a/b"\n'
                            'data_backend_config = "multidatabackend.json"\nlearning_rate = inf\n'),
     "expect": "learning_rate: inf is not accepted"},
    {"name": "infinite_learning_rate_in_config_env",
     "raw": ("config.env", "export MODEL_FAMILY=sdxl\nexport MODEL_NAME=a/b\n"
                           "export DATALOADER_CONFIG=multidatabackend.json\nexport LEARNING_RATE=Infinity\n"),
     "expect": "learning_rate: 'Infinity' is not accepted"},
    {"name": "infinite_float_on_the_command_line", "overrides": ["--adam_beta2", "-inf"],
     "expect": "must be a finite number"},
    {"name": "nan_in_a_dataset", "datasets": [{**GOOD_DATASETS[0], "probability": float("nan")}, GOOD_DATASETS[1]],
     "expect": "probability: nan is not accepted"},
    {"name": "huge_max_train_steps", "options": {"max_train_steps": 10**400},
     "expect": "max_train_steps: a number of 1329 bits is out of range"},
    {"name": "huge_number_on_the_command_line", "overrides": ["--seed", "9" * 30],
     "expect": "seed: a number of 100 bits is out of range"},
    {"name": "number_too_long_to_read", "raw": ("config.json", '{"max_train_steps": 1' + "0" * 5000 + "}"),
     "expect": "a number has more than 4300 digits"},
    {"name": "json_root_is_a_number", "raw": ("config.json", "5"), "expect": "a configuration is a JSON object"},
    {"name": "null_model_family", "options": {"model_family": None},
     "expect": "model_family: null is not accepted"},
    {"name": "json_nested_100000_deep", "raw": ("config.json", '{"model_family": ' + "[" * DEEP + "]" * DEEP + "}"),
     "expect": "nest too deeply"},
    {"name": "toml_nested_100000_deep", "raw": ("config.toml", "model_family = " + "[" * DEEP + "]" * DEEP + "\n"),
     "expect": "nest too deeply"},
    {"name": "json_nested_40_deep", "raw": ("config.json", '{"validation_prompt": ' + "[" * 40 + "]" * 40 + "}"),
     "expect": "values nest more than 32 levels deep"},
    {"name": "json_nested_600000_deep_in_a_large_file",  # large files are first read by config/many_keys.py
     "raw": ("config.json", '{"model_family": ' + "[" * 6 * DEEP + "]" * 6 * DEEP + "}"), "expect": "nest too deeply"},
    {"name": "many_unknown_keys_and_an_infinite_learning_rate",
     "options": {**{f"unknown_{i}": i for i in range(100_000)}, "learning_rate": float("inf")},
     "lines": 23, "expect": "learning_rate: inf is not accepted"},
    {"name": "many_unknown_keys_and_a_huge_max_train_steps",
     "options": {**{f"unknown_{i}": i for i in range(100_000)}, "max_train_steps": 10**400},
     "lines": 23, "expect": "max_train_steps: a number of 1329 bits is out of range"},
    {"name": "dataset_file_nested_100000_deep", "options": {"data_backend_config": "deep.json"},
     "files": {"deep.json": "[" * DEEP + "]" * DEEP}, "expect": "nest too deeply"},
    {"name": "negative_dataset_resolution", "datasets": [{**GOOD_DATASETS[0], "resolution": -512}, GOOD_DATASETS[1]],
     "expect": "resolution: -512 is out of range"},
    {"name": "empty_image_folder", "datasets": [{**GOOD_DATASETS[0], "instance_data_dir": "empty"}, GOOD_DATASETS[1]],
     "expect": "holds no image files"},
    {"name": "lycoris_not_installed", "options": {"lora_type": "lycoris", "lycoris_config": "lycoris.json"},
     "files": {"lycoris.json": '{"algo": "lokr"}'}, "block": ["lycoris"],
     "expect": "lora_type='lycoris' needs the 'lycoris' package, which is not installed: `pip install lycoris-lora`"},
    {"name": "wandb_not_installed", "options": {"report_to": "wandb"}, "block": ["wandb"],
     "expect": "report_to='wandb' needs the 'wandb' package"},
    {"name": "prodigy_not_installed", "options": {"optimizer": "prodigy"}, "block": ["prodigyopt"],
     "expect": "optimizer='prodigy' needs the 'prodigyopt' package"},
    {"name": "lion_not_installed", "options": {"optimizer": "lion"}, "block": ["lion_pytorch"],
     "expect": "`pip install lion-pytorch`"},
    {"name": "bitsandbytes_not_installed", "options": {"optimizer": "adamw8bit"}, "block": ["bitsandbytes"],
     "expect": "optimizer='adamw8bit' needs the 'bitsandbytes' package"},
    {"name": "s3fs_not_installed", "block": ["s3fs"],
     "datasets": [{"id": "photos", "type": "aws", "aws_bucket_name": "photos"}, GOOD_DATASETS[1]],
     "expect": "dataset 'photos' (type aws) on S3 needs the 's3fs' package"},
    {"name": "s3_cache_without_s3fs", "block": ["s3fs"], "options": {"cache_dir": "s3://bucket/cache"},
     "expect": "cache_dir s3://bucket/cache on S3 needs the 's3fs' package"},
    {"name": "many_unknown_keys", "options": {f"unknown_{i}": i for i in range(2_500_000)},
     "lines": 22, "expect": "and 2499980 more unknown options"},  # a heading, 20 named, a count
]
