"""Aspect buckets: plans, bounds, skips, small-bucket merges and the no-usable-image error."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from simpletuner.config.schema import DatasetConfig, TrainingConfig
from simpletuner.data.buckets import (
    SMALL_BUCKET,
    TOO_SMALL,
    WOULD_UPSCALE,
    BucketSettings,
    Skip,
    SkipReport,
    align,
    assign_buckets,
    image_seed,
    plan_for_target,
    plan_image,
    target_size_for_aspect,
)
from simpletuner.data.records import ImagePlan, ImageRecord
from simpletuner.errors import ConfigError, DataError


def records(sizes: list[tuple[int, int]], prefix: str = "img") -> list[ImageRecord]:
    return [ImageRecord(f"{prefix}/{i:04d}.jpg", 1000 + i, 1.7e9, w, h) for i, (w, h) in enumerate(sizes)]


def pixel(resolution: float = 512, alignment: int = 64, **kw) -> BucketSettings:
    return BucketSettings(resolution=resolution, resolution_type="pixel", alignment=alignment, **kw)


def pixel_area(resolution: float = 1024, alignment: int = 64, **kw) -> BucketSettings:
    return BucketSettings(resolution=resolution, resolution_type="pixel_area", alignment=alignment, **kw)


# ----------------------------------------------------------------------------- target sizes


@pytest.mark.parametrize(
    ("aspect", "kind", "resolution", "alignment", "expected"),
    [
        (4 / 3, "pixel", 1024, 64, (1344, 1024)),  # 1365.3 -> nearest multiple of 64
        (3 / 4, "pixel", 1024, 64, (1024, 1344)),
        (1.0, "pixel", 1000, 64, (1024, 1024)),  # the shorter side itself is aligned
        (1.0, "area", 1.0, 64, (1024, 1024)),  # SimpleTuner's remap: 1.0 MP -> 1024²
        (1.0, "area", 0.5, 64, (768, 768)),  # 0.5 -> 768²
        (1.0, "area", 1.2, 64, (1088, 1088)),  # 1.2e6 px -> 1095.4 -> 1088
        (1.0, "pixel_area", 1024, 64, (1024, 1024)),
        (16 / 9, "pixel_area", 1024, 64, (1344, 768)),  # 1365.3 x 768
        (16 / 9, "pixel_area", 1024, 8, (1368, 768)),
    ],
)
def test_target_sizes(aspect, kind, resolution, alignment, expected):
    s = BucketSettings(resolution=resolution, resolution_type=kind, alignment=alignment)
    assert target_size_for_aspect(aspect, s) == expected


def test_align_rounds_to_nearest_multiple_and_never_below_one_step():
    assert [align(v, 64) for v in (1, 31, 32, 95, 96, 1000)] == [64, 64, 64, 64, 128, 1024]


# ----------------------------------------------------------------------------- plans


def test_crop_off_resizes_straight_to_bucket():
    plan = plan_image(4000, 3000, pixel_area(1024))
    assert plan == ImagePlan((4000, 3000), (1152, 896), (0, 0, 1152, 896), (1152, 896))


@pytest.mark.parametrize(
    ("style", "box"),
    [("center", (256, 0, 768, 512)), ("centre", (256, 0, 768, 512)), ("corner", (512, 0, 1024, 512))],
)
def test_crop_styles_square(style, box):
    plan = plan_image(2000, 1000, pixel(512, crop=True, crop_style=style, crop_aspect="square"))
    assert plan == ImagePlan((2000, 1000), (1024, 512), box, (512, 512))
    assert plan.crop_top_left == (box[1], box[0])


def test_random_crop_is_deterministic_per_seed_and_varies_across_images():
    s = pixel(512, crop=True, crop_style="random", crop_aspect="square")
    first = plan_image(2000, 1000, s, image_seed(42, "a.jpg"))
    assert first == plan_image(2000, 1000, s, image_seed(42, "a.jpg"))
    lefts = {plan_image(2000, 1000, s, image_seed(42, f"{i}.jpg")).crop_box[0] for i in range(40)}
    assert len(lefts) > 10 and all(0 <= left <= 512 for left in lefts)
    assert image_seed(1, "a.jpg") != image_seed(2, "a.jpg") != image_seed(1, "b.jpg")


def test_maximum_image_size_downsamples_to_target_downsample_size_before_crop():
    s = pixel(512, crop=True, crop_style="center", maximum_image_size=1024, target_downsample_size=768)
    big = plan_image(3000, 2000, s)  # exceeds 1024: shorter side to 768, then crop 512²
    assert big.resized_size == (1152, 768) and big.target_size == (512, 512)
    assert big.crop_box == (320, 128, 832, 640)
    small = plan_image(1000, 800, s)  # within the maximum: just cover the bucket
    assert small.resized_size == (640, 512)


def test_maximum_image_size_in_area_units():
    s = BucketSettings(
        resolution=0.25, resolution_type="area", alignment=64, crop=True, crop_style="center",
        maximum_image_size=2.0, target_downsample_size=1.0,
    )
    plan = plan_image(4000, 4000, s)  # 16 MP > 1536²: down to 1024² first, then 512² crop
    assert plan.resized_size == (1024, 1024) and plan.target_size == (512, 512)


def test_crop_aspect_closest_preserve_and_random():
    buckets = (0.75, 1.0, 1.5)
    closest = pixel_area(1024, crop=True, crop_style="center", crop_aspect="closest", crop_aspect_buckets=buckets)
    assert plan_image(1600, 1000, closest).target_size == target_size_for_aspect(1.5, closest)
    preserve = pixel_area(1024, crop=True, crop_style="center", crop_aspect="preserve")
    assert plan_image(1600, 1000, preserve).target_size == target_size_for_aspect(1.6, preserve)
    rand = pixel_area(512, crop=True, crop_style="center", crop_aspect="random", crop_aspect_buckets=buckets)
    chosen = {plan_image(3000, 3000, rand, seed).target_size for seed in range(30)}
    assert chosen == {target_size_for_aspect(a, rand) for a in buckets}
    # a random aspect never needs upscaling when a fitting one exists: only 1.5 fits 900x500
    assert {plan_image(900, 500, rand, seed).target_size for seed in range(20)} == {(640, 448)}


def test_minimum_image_size_skips_with_reason():
    skip = plan_image(200, 180, pixel(512, minimum_image_size=256))
    assert skip == Skip(TOO_SMALL, "too small: 200x180 < minimum 256 per side")
    area = BucketSettings(resolution=1.0, resolution_type="area", alignment=64, minimum_image_size=0.25)
    assert isinstance(plan_image(400, 400, area), Skip)  # 0.16 MP < 512²
    assert isinstance(plan_image(600, 600, area), ImagePlan)
    assert isinstance(plan_image(300, 300, pixel_area(1024, minimum_image_size=512)), Skip)


def test_prevent_upscaling_skips_with_reason():
    skip = plan_image(800, 600, pixel(1024, prevent_upscaling=True))
    assert isinstance(skip, Skip) and skip.kind == WOULD_UPSCALE
    assert "800x600" in skip.reason and "prevent_upscaling" in skip.reason
    assert isinstance(plan_image(800, 600, pixel(1024)), ImagePlan)  # allowed by default
    cropped = pixel(512, crop=True, crop_style="center", prevent_upscaling=True)
    assert isinstance(plan_image(600, 400, cropped), Skip)  # 400 < 512: covering needs upscaling
    assert plan_image(1200, 600, cropped).resized_size == (1024, 512)


def test_invalid_size_is_skipped():
    assert plan_image(0, 100, pixel()).kind == "invalid size"


# ----------------------------------------------------------------------------- properties

ALIGNMENTS = st.sampled_from([8, 16, 32, 64])
SIDES = st.integers(1, 9000)


@st.composite
def bucket_settings(draw) -> BucketSettings:
    kind = draw(st.sampled_from(["pixel", "area", "pixel_area"]))
    alignment = draw(ALIGNMENTS)
    if kind == "area":
        resolution = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0])) if draw(st.booleans()) else draw(st.floats(0.1, 4.0))
    else:
        resolution = float(draw(st.integers(64, 2048)))
    crop = draw(st.booleans())
    downsample = draw(st.booleans())
    if kind == "pixel":
        maximum, target = (float(draw(st.integers(512, 4096))), float(draw(st.integers(256, 2048))))
    elif kind == "area":
        maximum, target = (draw(st.floats(0.5, 16.0)), draw(st.floats(0.1, 4.0)))
    else:
        maximum, target = (float(draw(st.integers(512, 4096))), float(draw(st.integers(256, 2048))))
    return BucketSettings(
        resolution=resolution,
        resolution_type=kind,
        alignment=alignment,
        maximum_image_size=maximum if downsample else None,
        target_downsample_size=target if downsample else None,
        prevent_upscaling=draw(st.booleans()),
        crop=crop,
        crop_style=draw(st.sampled_from(["center", "centre", "random", "corner"])),
        crop_aspect=draw(st.sampled_from(["square", "preserve", "closest", "random"])),
        crop_aspect_buckets=tuple(draw(st.lists(st.floats(0.25, 4.0), min_size=1, max_size=5))),
        aspect_rounding=draw(st.sampled_from([None, None, 1, 2, 4])),
    )


def ideal_sides(aspect: float, s: BucketSettings) -> tuple[float, float]:
    """The target's sides before rounding to the alignment (module docstring's (w, h))."""
    if s.resolution_type == "pixel":
        short = align(s.resolution, s.alignment)
        return (short * aspect, short) if aspect >= 1 else (short, short / aspect)
    area = s.area_pixels(s.resolution)
    return math.sqrt(area * aspect), math.sqrt(area / aspect)


def assert_side_bound(side: int, ideal: float, g: int) -> None:
    assert side % g == 0 and side >= g
    assert abs(side - ideal) <= g / 2 + 1e-6 or (side == g and ideal < g)


def target_aspect(plan: ImagePlan, s: BucketSettings) -> float:
    """The aspect the target was computed for: the image's, or the one a crop chose."""
    from simpletuner.data.buckets import image_aspect

    w, h = plan.original_size
    if not s.crop or s.crop_aspect == "preserve":
        return image_aspect(w, h, s)
    if s.crop_aspect == "square":
        return 1.0
    chosen = [a for a in s.crop_aspect_buckets if target_size_for_aspect(a, s) == plan.target_size]
    assert chosen, "closest/random targets come from crop_aspect_buckets"
    return chosen[0]


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(width=SIDES, height=SIDES, s=bucket_settings(), seed=st.integers(0, 2**32))
def test_plan_properties(width, height, s, seed):
    result = plan_image(width, height, s, seed)
    assert result == plan_image(width, height, s, seed)  # same input, same output
    if isinstance(result, Skip):
        assert result.kind == WOULD_UPSCALE and s.prevent_upscaling  # no minimum given: nothing else skips
        return
    (tw, th), (rw, rh), (left, top, right, bottom) = result.target_size, result.resized_size, result.crop_box
    g = s.alignment
    # target sides are multiples of the alignment, within g/2 of their ideal (the stated bound)
    ideal_w, ideal_h = ideal_sides(target_aspect(result, s), s)
    assert_side_bound(tw, ideal_w, g)
    assert_side_bound(th, ideal_h, g)
    if ideal_w >= g and ideal_h >= g:
        low, high = (1 - g / (2 * ideal_w)), (1 + g / (2 * ideal_w))
        low_h, high_h = (1 - g / (2 * ideal_h)), (1 + g / (2 * ideal_h))
        ratio = (tw / th) / (ideal_w / ideal_h)
        assert low / high_h - 1e-9 <= ratio <= high / low_h + 1e-9  # aspect error bound
        if s.resolution_type != "pixel":
            area_ratio = tw * th / s.area_pixels(s.resolution)
            assert low * low_h - 1e-9 <= area_ratio <= high * high_h + 1e-9  # area bound
    # the crop lies inside the resized image and has the target's size
    assert 0 <= left and 0 <= top and right <= rw and bottom <= rh
    assert (right - left, bottom - top) == (tw, th)
    if not s.crop:
        assert (rw, rh) == (tw, th) and (left, top) == (0, 0)
        if s.prevent_upscaling:
            assert tw <= width and th <= height
        return
    # crop: the resize keeps the aspect to half a pixel per side and never upscales when told not to
    ratio = (rw / rh) / (width / height)
    assert (1 - 0.5 / (rw - 0.5)) / (1 + 0.5 / (rh - 0.5)) <= ratio <= (1 + 0.5 / (rw - 0.5)) / (1 - 0.5 / (rh - 0.5))
    if s.prevent_upscaling:
        assert rw <= width and rh <= height
    if s.crop_aspect == "square":
        assert tw == th


@hsettings(max_examples=200, deadline=None)
@given(width=SIDES, height=SIDES, s=bucket_settings(), tw=st.integers(1, 40), th=st.integers(1, 40))
def test_plan_for_target_properties(width, height, s, tw, th):
    target = (tw * s.alignment, th * s.alignment)
    result = plan_for_target(width, height, target, s, 7)
    if isinstance(result, Skip):
        assert s.prevent_upscaling
        return
    left, top, right, bottom = result.crop_box
    assert result.target_size == target and (right - left, bottom - top) == target
    assert right <= result.resized_size[0] and bottom <= result.resized_size[1] and min(left, top) >= 0


@hsettings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), min_size=1, max_size=60),
    s=bucket_settings(),
    minimum=st.one_of(st.none(), st.integers(64, 1024)),
    batch=st.integers(1, 6),
    policy=st.sampled_from(["merge", "drop"]),
)
def test_nothing_is_lost_silently(sizes, s, minimum, batch, policy):
    kind = s.resolution_type
    if minimum is not None and kind == "area":
        minimum = minimum / 1000  # megapixels
    s = BucketSettings(**{**s.__dict__, "small_bucket_policy": policy, "minimum_image_size": minimum})
    recs = records(sizes)
    try:
        result = assign_buckets(recs, s, batch, seed=3)
    except DataError as error:
        assert f"{len(recs)} file(s) found" in str(error)
        return
    assert len(result) + result.skipped.total == len(recs)
    assert all(n >= batch for n in result.bucket_counts())
    for bucket, size in enumerate(result.buckets):
        assert {result.plan(r).target_size for r in result.bucket_records(bucket).tolist()} == {size}


# ----------------------------------------------------------------------------- assignment


def test_groups_by_target_and_plans_match_plan_image():
    s = pixel_area(512, crop=True, crop_style="random", crop_aspect="preserve")
    recs = records([(1000, 1000)] * 6 + [(1500, 1000)] * 4 + [(1000, 1500)] * 5)
    result = assign_buckets(recs, s, 2, seed=9)
    assert [(row.size, row.images, row.batches) for row in result.table()] == [
        ((448, 640), 5, 2), ((512, 512), 6, 3), ((640, 448), 4, 2)
    ]
    for record, plan in result.plans():
        r = recs[record]
        assert plan == plan_image(r.width, r.height, s, image_seed(9, r.path))
    again = assign_buckets(recs, s, 2, seed=9)
    assert all(a == b for a, b in zip(result.plans(), again.plans()))
    other_seed = assign_buckets(recs, s, 2, seed=10)
    assert [p for _, p in result.plans()] != [p for _, p in other_seed.plans()]


def test_small_bucket_merges_into_nearest_aspect_and_is_replanned():
    s = pixel(512, alignment=64)
    recs = records([(1024, 1024)] * 8 + [(1024, 2048)] * 4 + [(1100, 1000)] * 2)
    result = assign_buckets(recs, s, 4, seed=0)
    assert [m.source for m in result.merges] == [(576, 512)] and result.merges[0].into == (512, 512)
    assert result.merges[0].images == 2
    assert dict((row.size, row.images) for row in result.table()) == {(512, 512): 10, (512, 1024): 4}
    merged = result.plan(12)
    assert merged.target_size == (512, 512) and merged.original_size == (1100, 1000)
    assert merged.resized_size == (563, 512) and merged.crop_box == (25, 0, 537, 512)  # cover, centre crop
    assert result.skipped.total == 0


@pytest.mark.parametrize(("prevent_upscaling", "into"), [(False, (768, 512)), (True, (512, 512))])
def test_merge_passes_over_buckets_that_would_need_upscaling(prevent_upscaling, into):
    s = pixel(512, crop=True, crop_style="center", crop_aspect="preserve", prevent_upscaling=prevent_upscaling)
    # 720x520 -> bucket 704x512 (2 images); nearest by aspect is 768x512, which 720x520 covers
    # only by upscaling; the next nearest, 512x512, it covers as it is.
    recs = records([(2000, 1300)] * 4 + [(1500, 1500)] * 4 + [(720, 520)] * 2)
    result = assign_buckets(recs, s, 4, seed=0)
    assert [(m.source, m.into, m.images) for m in result.merges] == [((704, 512), into, 2)]
    plan = result.plan(8)
    assert plan.target_size == into
    assert (plan.resized_size[0] <= 720) == prevent_upscaling


def test_small_bucket_dropped_when_no_bucket_can_take_it():
    s = pixel(512, alignment=64, crop=True, crop_style="center", crop_aspect="preserve", prevent_upscaling=True)
    recs = records([(4000, 1000)] * 4 + [(520, 520)] * 2)  # 512x512 images cannot cover 2048x512
    result = assign_buckets(recs, s, 4, seed=0)
    assert result.merges == () and len(result) == 4
    assert result.skipped.counts == {SMALL_BUCKET: 2}
    example = result.skipped.examples[SMALL_BUCKET][0]
    assert example.startswith("img/0004.jpg: bucket 512x512 has 2 image(s) < batch size 4")
    assert "no other bucket could take them without upscaling" in example
    with pytest.raises(KeyError, match="img/0004.jpg"):
        result.plan(4)


def test_drop_policy_reports_dropped_buckets():
    s = pixel(512, small_bucket_policy="drop")
    recs = records([(1024, 1024)] * 8 + [(1100, 1000)] * 3)
    result = assign_buckets(recs, s, 4, seed=0)
    assert len(result) == 8 and result.merges == ()
    assert result.skipped.counts == {SMALL_BUCKET: 3}
    assert len(result.skipped.examples[SMALL_BUCKET]) == 3
    assert any("3 small bucket" in line for line in result.skipped.lines())


def test_no_usable_image_raises_data_error_explaining_every_group():
    s = pixel(512, minimum_image_size=256, prevent_upscaling=True, small_bucket_policy="drop")
    recs = records([(200, 180)] * 5 + [(400, 400)] * 3 + [(2000, 2000)] * 2)
    upstream = SkipReport()
    upstream.add("unreadable", 1, "img/broken.jpg: cannot identify image file")
    upstream.add("unreadable", 1)
    with pytest.raises(DataError) as caught:
        assign_buckets(recs, s, 4, seed=0, dataset_id="portraits", upstream=upstream)
    message = str(caught.value)
    assert "dataset 'portraits': no usable image; 12 file(s) found" in message
    assert "5 too small (e.g. img/0000.jpg: too small: 200x180 < minimum 256 per side" in message
    assert "lower minimum_image_size" in message
    assert "3 would upscale (e.g. img/0005.jpg: would upscale: 400x400 -> 512x512" in message
    assert "2 small bucket (e.g. img/0008.jpg: bucket 512x512 has 2 image(s) < batch size 4" in message
    assert "2 unreadable (e.g. img/broken.jpg: cannot identify image file)" in message


def test_no_files_at_all_says_so():
    with pytest.raises(DataError, match="no image files were found.*instance_data_dir"):
        assign_buckets([], pixel(), 1, seed=0, dataset_id="empty")


# ----------------------------------------------------------------------------- configuration


def training(**kw) -> TrainingConfig:
    return TrainingConfig(model_family="sdxl", pretrained_model_name_or_path="tiny", **kw)


def dataset(**kw) -> DatasetConfig:
    return DatasetConfig(id="photos", instance_data_dir="/data/photos", **kw)


def test_from_config_falls_back_to_training_and_takes_the_family_alignment():
    s = BucketSettings.from_config(dataset(crop=True), training(resolution=768, resolution_type="pixel",
                                                                minimum_image_size=300), alignment=64)
    assert (s.resolution, s.resolution_type, s.minimum_image_size, s.alignment, s.crop) == (768, "pixel", 300, 64, True)
    s = BucketSettings.from_config(
        dataset(resolution=1.0, resolution_type="area", minimum_image_size=0.5, crop_aspect_buckets=[1, 1.5]),
        training(), alignment=16,
    )
    assert (s.resolution, s.resolution_type, s.minimum_image_size, s.alignment) == (1.0, "area", 0.5, 16)
    assert s.crop_aspect_buckets == (1.0, 1.5)


def test_unset_resolution_is_the_family_native_one():
    assert BucketSettings.from_config(dataset(), training(), alignment=8, native_resolution=512).resolution == 512
    area = BucketSettings.from_config(dataset(resolution_type="area"), training(), alignment=64,
                                      native_resolution=1024)
    assert (area.resolution, area.resolution_type) == (1.0, "area")
    given = BucketSettings.from_config(dataset(), training(resolution=640), alignment=8, native_resolution=512)
    assert given.resolution == 640


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"crop": True, "crop_aspect": "closest"}, "crop_aspect 'closest' needs crop_aspect_buckets"),
        ({"resolution": 1024, "resolution_type": "area"}, "use resolution_type 'pixel' or 'pixel_area'"),
        ({"resolution": 1.0, "resolution_type": "pixel"}, "below the alignment"),
        ({"maximum_image_size": 2048}, "maximum_image_size and target_downsample_size go together"),
    ],
)
def test_from_config_rejects_bad_combinations_naming_the_dataset(kw, fragment):
    with pytest.raises(ConfigError, match=f"dataset 'photos': .*{re.escape(fragment)}"):
        BucketSettings.from_config(dataset(**kw), training(), alignment=64)


class ColumnView(Sequence):
    """A columnar index view: hands over sizes as one array, records only on demand."""

    def __init__(self, recs: list[ImageRecord]) -> None:
        self.recs, self.reads = recs, 0

    def __len__(self) -> int:
        return len(self.recs)

    def __getitem__(self, i):
        self.reads += 1
        return self.recs[i]

    def sizes(self) -> np.ndarray:
        return np.array([(r.width, r.height) for r in self.recs])


def test_a_columnar_view_is_not_walked_record_by_record():
    recs = records([(1024, 1024)] * 8 + [(1536, 1024)] * 8)
    view = ColumnView(recs)
    result = assign_buckets(view, pixel(512), 4, seed=0)
    assert view.reads == 0
    assert result.table() == assign_buckets(recs, pixel(512), 4, seed=0).table()
    assert result.plan(9) == plan_image(1536, 1024, pixel(512))


# ----------------------------------------------------------------------------- aspect_bucket_rounding


def test_rounding_is_read_from_the_training_options():
    dataset = DatasetConfig(id="d", instance_data_dir="/x")
    training = TrainingConfig(model_family="sdxl", pretrained_model_name_or_path="m", aspect_bucket_rounding=2)
    assert BucketSettings.from_config(dataset, training, 64).aspect_rounding == 2
    unset = training.model_copy(update={"aspect_bucket_rounding": None})
    assert BucketSettings.from_config(dataset, unset, 64).aspect_rounding is None


@pytest.mark.parametrize("places", [0, 10])
def test_rounding_outside_one_to_nine_places_is_refused(places):
    with pytest.raises(ConfigError, match="aspect_bucket_rounding must be 1 to 9"):
        pixel_area(aspect_rounding=places)


@pytest.mark.parametrize(
    ("size", "places", "expected"),
    [((1920, 1080), 2, 1.78), ((1080, 1920), 2, 0.56), ((1920, 1080), 1, 1.8), ((1000, 30000), 1, 0.1),
     ((1920, 1080), None, 1920 / 1080)],
)
def test_image_aspect_rounds_as_simpletuner(size, places, expected):
    from simpletuner.data.buckets import image_aspect

    assert image_aspect(*size, pixel_area(aspect_rounding=places)) == expected


def test_one_decimal_place_joins_aspects_that_exact_ratios_keep_apart():
    # 1.26 and 1.34 land in different 8-pixel buckets; at one decimal place both are 1.3
    exact, rounded = pixel_area(1024, 8), pixel_area(1024, 8, aspect_rounding=1)
    a, b = plan_image(1260, 1000, exact), plan_image(1340, 1000, exact)
    assert a.target_size != b.target_size
    assert plan_image(1260, 1000, rounded).target_size == plan_image(1340, 1000, rounded).target_size
    assert plan_image(1260, 1000, rounded).target_size == target_size_for_aspect(1.3, rounded)


def test_rounding_changes_the_plan_and_so_the_latent_key():
    from simpletuner.cache.keys import EncoderIdentity, SourceIdentity, Transform, latent_key

    record = ImageRecord("a.jpg", 10, 1.0, 1340, 1000)
    encoder = EncoderIdentity("m", "vae", "float32")
    source = SourceIdentity.of("/d", record)
    exact = plan_image(1340, 1000, pixel_area(1024, 8))
    rounded = plan_image(1340, 1000, pixel_area(1024, 8, aspect_rounding=1))
    assert exact != rounded
    assert latent_key(source, Transform.of(exact), encoder) != latent_key(source, Transform.of(rounded), encoder)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(16, 4000), st.integers(16, 4000), st.integers(16, 4000), st.integers(16, 4000),
    st.integers(1, 3), st.sampled_from(["pixel", "area", "pixel_area"]), st.booleans(),
)
def test_equal_rounded_aspects_share_a_bucket(w1, h1, w2, h2, places, kind, preserve_crop):
    from simpletuner.data.buckets import image_aspect

    resolution = {"pixel": 512, "area": 0.5, "pixel_area": 768}[kind]
    crop = {"crop": True, "crop_aspect": "preserve", "crop_style": "center"} if preserve_crop else {}
    s = BucketSettings(resolution=resolution, resolution_type=kind, alignment=16, aspect_rounding=places, **crop)
    a, b = plan_image(w1, h1, s), plan_image(w2, h2, s)
    if image_aspect(w1, h1, s) == image_aspect(w2, h2, s):
        assert a.target_size == b.target_size
    for plan, (w, h) in ((a, (w1, h1)), (b, (w2, h2))):
        assert plan.target_size == target_size_for_aspect(image_aspect(w, h, s), s)
        if preserve_crop:  # the crop covers the bucket from the whole image, scaled
            assert plan.resized_size[0] >= plan.target_size[0] and plan.resized_size[1] >= plan.target_size[1]


# ----------------------------------------------------------------------------- crops drawn again each epoch


def test_epoch_plans_draw_random_crops_again_in_the_same_bucket():
    sizes = [(96, 64), (64, 96), (200, 64), (64, 64)] * 3
    s = pixel_area(32, 8, crop=True, crop_style="random")
    assignment = assign_buckets(records(sizes), s, 2, seed=7)
    moved = 0
    for record in range(len(sizes)):
        first = assignment.epoch_plan(record, 0)
        assert first == assignment.plan(record)
        for epoch in (1, 2, 5):
            plan = assignment.epoch_plan(record, epoch)
            assert plan == assignment.epoch_plan(record, epoch)  # the same every time it is asked
            assert (plan.target_size, plan.resized_size, plan.original_size) == (
                first.target_size, first.resized_size, first.original_size)
            left, top, right, bottom = plan.crop_box
            assert 0 <= left and 0 <= top and right <= plan.resized_size[0] and bottom <= plan.resized_size[1]
            moved += plan.crop_box != first.crop_box
    assert moved > 10  # 9 of the 12 images have room to move, over three later epochs


@pytest.mark.parametrize("crop", [{"crop": True, "crop_style": "center"}, {"crop": True, "crop_style": "corner"}, {}])
def test_epoch_plans_of_fixed_crops_never_change(crop):
    s = pixel_area(32, 8, **crop)
    assignment = assign_buckets(records([(96, 64), (64, 96), (200, 64)] * 2), s, 2, seed=7)
    assert not s.crops_vary
    assert all(assignment.epoch_plan(r, 3) == assignment.plan(r) for r in range(len(assignment.records)))
