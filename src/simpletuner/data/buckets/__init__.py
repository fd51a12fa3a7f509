"""Aspect buckets: which size each image trains at, and how it gets there.

settings.py (BucketSettings and the reasons an image is left out), plan.py (one image), report.py (what an
assignment found) and assign.py (a whole index); their public names are imported from here.

Pure functions. `plan_image` turns an image's size and the dataset's settings into
an `ImagePlan` (resize, then crop to the bucket's target size) or a `Skip` with
its reason; `assign_buckets` plans a whole index, groups images by target size,
folds buckets smaller than a batch into their nearest neighbour (or drops them,
reported) and counts every excluded image by reason.

Resolution (as SimpleTuner reads it; `a` is the aspect ratio width/height, `g` the
model family's alignment):

* ``pixel``: the shorter side is `resolution` rounded to a multiple of g; the
  longer side is the multiple of g nearest to shorter * a (or shorter / a).
* ``area``: `resolution` is in megapixels; the round values SimpleTuner remaps
  keep their familiar squares (0.25 -> 512², 0.5 -> 768², 1.0 -> 1024²,
  2.0 -> 1536², 4.0 -> 2048²); any other value v is v * 10⁶ pixels. Each target
  side is the multiple of g nearest to its ideal side sqrt(A * a) or sqrt(A / a).
* ``pixel_area``: `resolution` in pixels, the target area is resolution².

minimum_image_size, maximum_image_size and target_downsample_size are read in the
same unit as the resolution (pixel: per side; area: megapixels with the same
remapping; pixel_area: pixels whose square is the area).

Crop off: the image is resized straight to its bucket (aspect distortion within
the bounds below). Crop on: the bucket's aspect comes from crop_aspect (square,
the image's own, the closest or a random one of crop_aspect_buckets); the image is
resized, aspect kept, just enough to cover the bucket (or, when it exceeds
maximum_image_size, down to target_downsample_size if that still covers it) and
the bucket is cropped out of it at the crop_style position. Unlike SimpleTuner,
which crops at the image's native resolution unless maximum_image_size is set,
crops here always see the whole image scaled to the bucket.

aspect_bucket_rounding (SimpleTuner's option): an image's own aspect ratio
(width/height) is rounded to that many decimal places before its bucket is computed
(crop off, crop_aspect preserve and closest), so images whose rounded aspects are
equal share a bucket; unset, the exact ratio is used. A ratio that rounds to 0 is
taken as the smallest step, 10^-places.

Bounds, with (w, h) the ideal target sides computed from the aspect ratio (rounded,
with aspect_bucket_rounding) before aligning (asserted by the property tests):

* every target side is a positive multiple of g;
* every target side is within g/2 of its ideal, or equals g where the ideal is
  below g; so the target's area is within factors (1 - g/2w)(1 - g/2h) and
  (1 + g/2w)(1 + g/2h) of the ideal area (area types), and its aspect ratio within
  (1 - g/2w)/(1 + g/2h) and (1 + g/2w)/(1 - g/2h) of the ideal aspect;
* crop on: the resized image keeps the original aspect to within half a pixel
  per side, covers the target, and the crop box lies inside it and has the
  target's size; crop off: resized size == target size, crop box == whole image.
"""

from simpletuner.data.buckets.assign import NoUsableImages, assign_buckets
from simpletuner.data.buckets.plan import (
    align, epoch_image_seed, image_aspect, image_seed, plan_for_target, plan_image, redraw_crop, target_size_for_aspect,
)
from simpletuner.data.buckets.report import BucketAssignment, BucketMerge, BucketRow, SkipReport
from simpletuner.data.buckets.settings import (
    INVALID_SIZE, SMALL_BUCKET, TOO_SMALL, WOULD_UPSCALE, BucketSettings, Skip,
)

__all__ = [
    "INVALID_SIZE", "SMALL_BUCKET", "TOO_SMALL", "WOULD_UPSCALE", "BucketAssignment", "BucketMerge", "BucketRow",
    "BucketSettings", "NoUsableImages", "Skip", "SkipReport", "align", "assign_buckets", "epoch_image_seed",
    "image_aspect", "image_seed", "plan_for_target", "plan_image", "redraw_crop", "target_size_for_aspect",
]
