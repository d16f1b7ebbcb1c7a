"""Image files of preference data: the confinement rule every reader applies, the readability check, loading.

`rlhf.data.validate` checks each record's images with `image_problem` before training; the data jobs open theirs
with `load_image`.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..errors import UserError


class ImageLoadError(UserError, OSError):
    """An image file that is missing or cannot be decoded."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, or raise ImageLoadError naming the file and the reason."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from None


def resolve_image(root: str | Path, ref: str) -> Path:
    """The one confinement rule of every reader: `ref` resolved against `root` (symlinks and `..` followed; an
    absolute `ref` stands alone) must land inside `root`, else ValueError naming both."""
    root = Path(root).resolve()
    path = (root / ref).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image {ref!r} resolves to {path}, outside the image root {root}")
    return path


def image_problem(path: str | Path) -> str | None:
    """Why an image file cannot be used (missing, not an image, truncated, empty), or None.

    `verify()` checks a PNG's chunks and CRCs without decoding; it checks nothing of a JPEG's data, so other formats
    are decoded too (JPEG at 1/8 scale: every byte is still read, so a truncated file fails here and not in the
    collator mid-training).
    """
    try:
        with Image.open(path) as image:
            image.verify()
            if image.width < 1 or image.height < 1:
                return f"empty image ({image.width}x{image.height}): {path}"
            verified_png = image.format == "PNG"
        if not verified_png:
            with Image.open(path) as image:
                image.draft(image.mode, (1, 1))
                image.load()
    except FileNotFoundError:
        return f"file not found: {path}"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"cannot read image {path}: {exc}"
    return None
