"""2D images and masks in two folders, matched by file stem."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from diffseg.data.errors import DataError
from diffseg.data.formats.base import IMAGE2D_SUFFIXES, Case, DatasetInfo, Scan, Source, is_hidden
from diffseg.data.labels import LabelMap, binary_label_map, class_label_map

_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def image_channels(path: str | Path) -> int:
    """1 for gray, 3 for colour images (alpha is dropped); reads the header only."""
    try:
        with Image.open(path) as im:
            mode = im.mode
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise DataError(f"{path}: cannot read image header (expected a readable "
                        f"{'/'.join(s[1:] for s in IMAGE2D_SUFFIXES)} file, found {exc})") from exc
    if mode in _GRAY_MODES:
        return 1
    if mode in _COLOUR_MODES:
        return 3
    raise DataError(f"{path}: unsupported image mode (expected gray or RGB, found {mode!r})")


def _list_by_stem(folder: Path, what: str, problems: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or is_hidden(p) or p.suffix.lower() not in IMAGE2D_SUFFIXES:
            continue
        if p.stem in files:
            problems.append(f"{p}: two {what} files share the stem {p.stem!r} "
                            f"(expected one, found {files[p.stem].name} and {p.name})")
            continue
        files[p.stem] = p
    return files


class Folder2DSource(Source):
    """ROOT/images/* and ROOT/masks/* matched by stem (png, tif/tiff, jpg/jpeg, bmp).

    Masks are binary when ``num_classes == 2`` (0 background, > 0 foreground), else class ids
    0..num_classes-1. ``coarse_dir`` (absolute or relative to ROOT) holds SegRefiner coarse masks.
    """

    title = "Folder2D"
    synthetic_hint = "data=shapes2d"

    def __init__(self, root, num_classes: int = 2, image_dir: str = "images", mask_dir: str = "masks",
                 coarse_dir: str | None = None, class_names: list[str] | None = None) -> None:
        super().__init__(root)
        if int(num_classes) < 2:
            raise DataError(f"num_classes: expected >= 2 (background + foreground), found {num_classes}")
        if class_names is not None and len(class_names) != int(num_classes):
            raise DataError(f"class_names: expected {num_classes} names (one per class incl. "
                            f"background), found {len(class_names)}: {list(class_names)}")
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.image_dir = self.root / image_dir
        self.mask_dir = self.root / mask_dir
        self.coarse_dir = None if coarse_dir is None else self.root / coarse_dir  # abs path wins
        self.layout = (f"{self.image_dir}/<name>.png and {self.mask_dir}/<name>.png matched by "
                       f"file stem (png, tif, jpg or bmp)")
        self._info: DatasetInfo | None = None

    def label_map(self) -> LabelMap:
        if self.num_classes == 2:
            return binary_label_map(self.class_names)
        return class_label_map(self.num_classes, self.class_names)

    def _require_root(self) -> None:
        missing = [d for d in (self.image_dir, self.mask_dir, self.coarse_dir)
                   if d is not None and not d.is_dir()]
        if missing:
            raise self.not_found(f"missing folder(s) {', '.join(map(str, missing))}; "
                                 f"expected {self.layout}")

    def _scan_files(self) -> Scan:
        problems: list[str] = []
        images = _list_by_stem(self.image_dir, "image", problems)
        masks = _list_by_stem(self.mask_dir, "mask", problems)
        coarse = _list_by_stem(self.coarse_dir, "coarse", problems) if self.coarse_dir else {}
        if not images:
            raise self.not_found(f"no images in {self.image_dir}; expected {self.layout}")
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask:
            problems.append(f"{self.mask_dir}: no mask for {len(no_mask)} image(s) "
                            f"(expected a mask per image stem, missing {no_mask})")
        if no_image:
            problems.append(f"{self.image_dir}: no image for {len(no_image)} mask(s) "
                            f"(expected an image per mask stem, missing {no_image})")
        if self.coarse_dir is not None and not set(images) & set(coarse):
            problems.append(f"{self.coarse_dir}: no coarse mask matches an image stem (expected <stem>.png per image)")
        # coarse masks may cover only some cases (e.g. another model's test predictions): the
        # datamodule checks that every case of the splits it loads has one
        cases = [Case(stem, [str(images[stem])], str(masks[stem]), str(coarse[stem]) if stem in coarse else None)
                 for stem in images if stem in masks]
        return Scan(cases, problems, ids=sorted(set(images) | set(masks)))

    def info(self) -> DatasetInfo:
        if self._info is None:
            scan = self.scan()
            if not scan.cases:
                raise self.not_found(f"no image/mask pairs; expected {self.layout}")
            channels, problems = {}, []
            for c in scan.cases:
                try:
                    channels[c.id] = image_channels(c.images[0])
                except DataError as exc:
                    problems.append(str(exc))
            DataError.raise_if(problems, f"{self.image_dir}: unreadable images")
            first = scan.cases[0]
            ref = channels[first.id]
            DataError.raise_if(
                [f"{c.images[0]}: {channels[c.id]} channel(s) (expected {ref} like {first.images[0]}; "
                 f"mixed gray and colour images)" for c in scan.cases if channels[c.id] != ref],
                f"{self.image_dir}: mixed gray and colour images")
            self._info = DatasetInfo(spatial_dims=2, in_channels=channels[first.id],
                                     label_map=self.label_map(),
                                     modalities=["gray"] if channels[first.id] == 1 else ["rgb"],
                                     spacing=(1.0, 1.0))
        return self._info
