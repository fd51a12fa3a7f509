import json
import random

import pytest

from simpletuner.config.schema import DatasetConfig, ParquetOptions
from simpletuner.data.captions import (CaptionResolver, apply_filters, caption_dropout, caption_from_filename,
                                       check_captions, load_filters, parse_filter)
from simpletuner.data.storage import DatasetStorage
from simpletuner.errors import ConfigError, DataError


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    for name in ("a_red_fox.jpg", "sub/two_cats (3).png", "sub/plain.jpg", "blank.jpg", "photo.1.jpg"):
        (folder / name).write_bytes(b"img")
    (folder / "a_red_fox.txt").write_text("a red fox\n\nthe fox, running\nfox in snow\n")
    (folder / "sub" / "two_cats (3).txt").write_text("two cats")
    (folder / "blank.txt").write_text("  \n")
    return folder


def _resolver(root, **fields) -> CaptionResolver:
    dataset = DatasetConfig(id="d", instance_data_dir=str(root), **fields)
    return CaptionResolver.from_config(dataset, DatasetStorage.from_config(dataset))


@pytest.mark.parametrize(("path", "caption"), [
    ("a_red_fox.jpg", "a red fox"),
    ("sub/two_cats (3).png", "two cats"),
    ("dog_01.jpg", "dog"),
    ("my_dog_2 (1).jpeg", "my dog"),
    ("castle upscaled by magic.png", "castle"),
    ("007.jpg", "007"),  # nothing but a number: kept
    ("photo.1.jpg", "photo.1"),
])
def test_filename_captions_are_cleaned(path, caption):
    assert caption_from_filename(path) == caption


def test_filename_strategy(root):
    resolver = _resolver(root)
    assert resolver.candidates("sub/two_cats (3).png") == ["two cats"]


def test_textfile_strategy_picks_one_line_per_step_with_a_seeded_rng(root):
    resolver = _resolver(root, caption_strategy="textfile")
    assert resolver.candidates("a_red_fox.jpg") == ["a red fox", "the fox, running", "fox in snow"]
    picks = [resolver.pick("a_red_fox.jpg", random.Random(seed)) for seed in range(60)]
    assert set(picks) == {"a red fox", "the fox, running", "fox in snow"}
    again = [resolver.pick("a_red_fox.jpg", random.Random(seed)) for seed in range(60)]
    assert picks == again


def test_missing_caption_is_an_error_naming_the_file(root):
    resolver = _resolver(root, caption_strategy="textfile")
    with pytest.raises(DataError, match=r"sub/plain\.jpg has no caption \(no caption file sub/plain\.txt\)"):
        resolver.candidates("sub/plain.jpg")
    with pytest.raises(DataError, match=r"blank\.txt is empty"):
        resolver.candidates("blank.jpg")
    missing = check_captions(resolver, ["a_red_fox.jpg", "sub/plain.jpg", "blank.jpg"])
    assert missing.count == 2 and "sub/plain.jpg" in missing.examples[0]


def test_missing_caption_can_fall_back_to_the_file_name(root):
    resolver = _resolver(root, caption_strategy="textfile", missing_caption="filename")
    assert resolver.candidates("sub/plain.jpg") == ["plain"]
    assert resolver.candidates("blank.jpg") == ["blank"]


def test_instance_prompt_options(root):
    assert _resolver(root, caption_strategy="instanceprompt", instance_prompt="sks dog").candidates(
        "a_red_fox.jpg") == ["sks dog"]
    assert _resolver(root, instance_prompt="sks", prepend_instance_prompt=True).candidates(
        "a_red_fox.jpg") == ["sks a red fox"]
    assert _resolver(root, caption_strategy="textfile", instance_prompt="sks", only_instance_prompt=True).candidates(
        "sub/plain.jpg") == ["sks"]  # no caption file needed
    with pytest.raises(ConfigError, match="prepend_instance_prompt needs instance_prompt"):
        _resolver(root, prepend_instance_prompt=True)


def test_filters_strings_regexes_and_substitutions():
    filters = load_filters(["s/fox(es)?/wolf/", "the ", r"\d+ ?", "in snow"])
    assert [f.pattern is None for f in filters] == [False, True, False, True]
    assert apply_filters("the fox 12 in snow, 3 foxes", filters) == "wolf , wolf"
    assert parse_filter("s/a/b/").apply("banana") == "bbnbnb"
    with pytest.raises(ConfigError, match=r"'\(unclosed' is not a valid regular expression"):
        parse_filter("(unclosed")


def test_filter_list_from_a_text_file_and_json(tmp_path, root):
    text = tmp_path / "filters.txt"
    text.write_text("red \n\ns/fox/cat/\n")
    resolver = _resolver(root, caption_strategy="textfile", caption_filter_list=str(text))
    assert resolver.candidates("a_red_fox.jpg") == ["a cat", "the cat, running", "cat in snow"]
    listing = tmp_path / "filters.json"
    listing.write_text(json.dumps(["two "]))
    assert _resolver(root, caption_filter_list=str(listing)).candidates("sub/two_cats (3).png") == ["cats"]
    with pytest.raises(ConfigError, match="does not exist"):
        _resolver(root, caption_filter_list=str(tmp_path / "nope.txt"))


def test_a_filter_that_empties_a_caption_is_an_error(root):
    with pytest.raises(DataError, match="removes every word"):
        _resolver(root, caption_filter_list=[".*"]).candidates("a_red_fox.jpg")


def test_caption_dropout_is_pure():
    assert caption_dropout("x", 0.0, random.Random(1)) == "x"
    assert caption_dropout("x", 1.0, random.Random(1)) == ""
    runs = [[caption_dropout("x", 0.3, rng) for _ in range(1000)] for rng in (random.Random(5), random.Random(5))]
    assert runs[0] == runs[1]
    assert 200 < runs[0].count("") < 400


def _metadata_rows():
    return [
        {"id": "a_red_fox", "caption": "a fox from the table", "alt": "alt fox"},
        {"id": "sub/two_cats (3)", "caption": "", "alt": "cats from the fallback"},
        {"id": "photo.1", "caption": None, "alt": None},
    ]


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv"])
def test_metadata_tables_with_column_mapping_and_fallback(root, tmp_path, kind):
    rows = _metadata_rows()
    path = tmp_path / f"meta.{kind}"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(row) for row in rows))
    else:
        path.write_text("id,caption,alt\n" + "\n".join(f'"{r["id"]}",{r["caption"] or ""},{r["alt"] or ""}'
                                                        for r in rows))
    options = ParquetOptions(path=str(path), filename_column="id", caption_column="caption",
                             fallback_caption_column="alt")
    resolver = _resolver(root, caption_strategy=kind, parquet=options)
    assert resolver.candidates("a_red_fox.jpg") == ["a fox from the table"]
    assert resolver.candidates("sub/two_cats (3).png") == ["cats from the fallback"]
    with pytest.raises(DataError, match="empty caption"):
        resolver.candidates("photo.1.jpg")
    with pytest.raises(DataError, match="no row for it"):
        resolver.candidates("sub/plain.jpg")


def test_metadata_column_mistakes_are_config_errors(root, tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps({"file": "a_red_fox", "text": "x"}))
    options = ParquetOptions(path=str(path), filename_column="id", caption_column="caption")
    with pytest.raises(ConfigError, match=r"no column 'id', 'caption'; columns are \['file', 'text'\]"):
        _resolver(root, caption_strategy="jsonl", parquet=options)
    missing = ParquetOptions(path=str(tmp_path / "absent.jsonl"))
    with pytest.raises(ConfigError, match="not found"):
        _resolver(root, caption_strategy="jsonl", parquet=missing)


def test_metadata_with_extensions_and_a_list_of_captions(root, tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps({"file_name": "a_red_fox.jpg", "captions": ["one", "two"]}))
    options = ParquetOptions(path=str(path), filename_column="file_name", caption_column="captions",
                             identifier_includes_extension=True)
    assert _resolver(root, caption_strategy="jsonl", parquet=options).candidates("a_red_fox.jpg") == ["one", "two"]


def test_textfile_captions_on_s3(s3_server):
    s3_server.make_bucket("caption-tests")
    s3_server.put("caption-tests", {"p/x.jpg": b"img", "p/x.txt": b"caption on s3\n", "p/m.jsonl":
                                    json.dumps({"id": "x", "caption": "from jsonl"}).encode()})
    fields = s3_server.dataset_fields("caption-tests", "p")
    dataset = DatasetConfig(id="s3", caption_strategy="textfile", **fields)
    assert CaptionResolver.from_config(dataset, DatasetStorage.from_config(dataset)).candidates("x.jpg") == [
        "caption on s3"]
    dataset = DatasetConfig(id="s3", caption_strategy="jsonl", parquet=ParquetOptions(path="m.jsonl"), **fields)
    assert CaptionResolver.from_config(dataset, DatasetStorage.from_config(dataset)).candidates("x.jpg") == [
        "from jsonl"]
