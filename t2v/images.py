"""Conditioning pictures (`image = "..."` in a template, `t2v generate --image`): the checks a picture
must pass, the clip size it gives, and how it is fitted to the frame.

Read with Pillow, imported inside the functions so that `t2v --help` does not load it; nothing here
loads a model. The size rule is the official Wan2.2 one (`best_output_size` in its `wan/utils`): the
picture's aspect at the template's pixel area, the sides floored to multiples of 32, once width first
and once height first, keeping the pair closer to the picture's aspect.

What a picture may be: any still or animated image Pillow reads (an animated one gives its first
frame), 8 bits per channel, grey, palette or RGB, with or without transparency (composited on
`MATTE`), its EXIF orientation applied. Refused, each in one line naming `image` and the file: a
missing file, a file that is not an image, a truncated or corrupt one, one over Pillow's
decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, 89.5 megapixels), CMYK (its colours depend on a
print profile t2v does not apply) and 16 bits per channel (Pillow would cut it to 8 without dithering).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from t2v.errors import InvalidInput
from t2v.outputs import check_outputs

if TYPE_CHECKING:
    from PIL import Image

    from t2v.jobs import JobSpec
    from t2v.models.wan22 import ModelRules

log = logging.getLogger("t2v")

FITS = ("crop", "pad")
"""`fit`: cover the frame and centre-crop the overflow, or fit inside it and pad with `BARS`."""
MATTE = (255, 255, 255)
"""Transparent pixels are composited on white: the background of a product shot or a printed card."""
BARS = (0, 0, 0)
"""`fit = "pad"` fills the frame around the picture with black, as a letterbox does."""
FAR_ASPECT = 1.2
"""With `fit` unset, a picture whose aspect is more than 20% off the clip's is cropped with a warning."""


@dataclass(frozen=True)
class Picture:
    """A conditioning picture as t2v uses it."""

    pixels: Image.Image
    """RGB, 8 bits per channel, upright."""
    frames: int = 1
    """Frames in the file; an animated picture gives its first."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.pixels.size


def read_picture(path: str | Path, *, data: bytes | None = None) -> Picture:
    """The picture at `path` as RGB pixels; raises InvalidInput naming `image` for what t2v refuses.

    With `data`, the file's bytes already read (the dashboard checks their hash first): `path` then
    only names it in messages."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if data is None and not path.is_file():
        raise InvalidInput(f"`image` must be an existing file but is '{path}'.")
    try:
        # A picture between Pillow's limit and twice it only warns: refused here like the larger ones.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path if data is None else io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise InvalidInput(f"`image` '{path}' is not an image Pillow can read ({exc}).") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"`image` '{path}' is too large to decode safely ({exc}); scale it down.") from exc
    except Exception as exc:  # Pillow raises a zoo of types for a broken header
        raise InvalidInput(f"`image` '{path}' is truncated or corrupt ({exc}).") from exc
    with image:
        _check_depth(image, path)
        frames = getattr(image, "n_frames", 1)
        try:
            image.load()  # the first frame only, whatever the file holds
        except Exception as exc:
            raise InvalidInput(f"`image` '{path}' is truncated or corrupt ({exc}).") from exc
        return Picture(pixels=_rgb(ImageOps.exif_transpose(image), path), frames=frames)


def _check_depth(image: Image.Image, path: Path) -> None:
    """Refuse CMYK and 16-bit pictures before their pixels are decoded."""
    if image.mode == "CMYK":
        raise InvalidInput(
            f"`image` '{path}' is CMYK, whose colours depend on a print profile; save it as RGB (sRGB)."
        )
    # A 16-bit RGB PNG opens as mode RGB; its raw mode ("RGB;16B") tells.
    raw_modes = [str(tile.args) for tile in getattr(image, "tile", [])]
    if image.mode.startswith(("I", "F")) or any(";16" in raw for raw in raw_modes):
        raise InvalidInput(
            f"`image` '{path}' has 16 or more bits per channel (mode {image.mode}); save it with 8."
        )


def _rgb(image: Image.Image, path: Path) -> Image.Image:
    from PIL import Image

    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*MATTE, 255)), rgba).convert("RGB")
    if image.mode not in ("RGB", "L", "P", "1", "YCbCr"):
        raise InvalidInput(f"`image` '{path}' has colour mode {image.mode}; save it as RGB.")
    return image.convert("RGB")


def clip_size(
    width: int, height: int, *, area: int, multiple: int = 32, max_side: int = 1280
) -> tuple[int, int]:
    """(width, height) of the clip a `width` x `height` picture gives at `area` pixels: its aspect kept
    as closely as sides that are multiples of `multiple`, at most `max_side`, allow."""
    aspect = width / height
    ideal_width = math.sqrt(area * aspect)

    def side(value: float) -> int:
        return max(multiple, int(min(value, max_side) // multiple * multiple))

    width_first_w = side(ideal_width)
    width_first = (width_first_w, side(area / width_first_w))
    height_first_h = side(area / ideal_width)
    height_first = (side(area / height_first_h), height_first_h)

    def off(size: tuple[int, int]) -> float:
        return _aspect_off(size[0] / size[1], aspect)

    # Ties go to height first, as in the official rule.
    return width_first if off(width_first) < off(height_first) else height_first


def _aspect_off(a: float, b: float) -> float:
    """How far apart two aspects are, as a factor >= 1."""
    return max(a / b, b / a)


def size_for_picture(job: JobSpec, rules: ModelRules, *, size_given: bool) -> JobSpec:
    """`job` with the clip size and fit its picture gives. Without `size_given` (no `height`/`width` of
    its own) and no `fit`, the picture's aspect at the job's pixel area, cropped to it; otherwise the
    job's own size, the picture cropped or padded (`fit`, cropping when unset: with a warning when the
    aspects are far apart). Raises InvalidInput for a picture t2v refuses, or for outputs wrong for
    the size it settles (`check_outputs`: a focus along a side not cut, a preview wider than the clip),
    which `JobSpec.validate` leaves to this while the size is not settled."""
    check_fit(job.fit)
    picture = read_picture(job.image)
    width, height = picture.size
    if picture.frames > 1:
        log.warning("`image` '%s' has %d frames: its first is used.", job.image, picture.frames)
    if not size_given and job.fit is None:
        w, h = clip_size(
            width,
            height,
            area=job.width * job.height,
            multiple=rules.spatial_multiple,
            max_side=rules.max_side,
        )
        job = replace(job, width=w, height=h)
    off = _aspect_off(job.width / job.height, width / height)
    if job.fit is None and off > FAR_ASPECT:
        log.warning(
            "`image` '%s' is %dx%d and the clip %dx%d: the picture's sides are cropped (set `fit` to "
            '"pad" to keep all of it, or to "crop" to say so).',
            job.image,
            width,
            height,
            job.width,
            job.height,
        )
    job = replace(job, fit=job.fit or "crop")
    check_outputs(job)
    return job


def check_fit(fit: object) -> None:
    if fit is not None and fit not in FITS:
        raise InvalidInput(f"`fit` must be one of {', '.join(FITS)} but is {fit!r}.")


def fit_picture(picture: Picture, width: int, height: int, fit: str | None) -> Image.Image:
    """The picture scaled (LANCZOS) to cover a `width` x `height` frame and centre-cropped, or with
    `fit = "pad"` scaled to fit inside it and centred on `BARS`."""
    from PIL import Image, ImageOps

    if fit == "pad":
        return ImageOps.pad(picture.pixels, (width, height), method=Image.Resampling.LANCZOS, color=BARS)
    return ImageOps.fit(picture.pixels, (width, height), method=Image.Resampling.LANCZOS)


def example_help(area: tuple[int, int] = (832, 480), picture: tuple[int, int] = (1024, 768)) -> str:
    """What the help says a picture gives, computed by the rule itself."""
    w, h = clip_size(*picture, area=area[0] * area[1])
    return f"a {picture[0]}x{picture[1]} picture at the 480P area ({area[0]}x{area[1]}) gives a {w}x{h} clip"
