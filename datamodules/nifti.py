"""A folder of NIfTI volumes (`.nii`, `.nii.gz`), such as CT sub-volumes around plaques: 3D patches in `[0, 1]`.

Layout: a file directly in `root` is one patient (patient = its name without extension);
a subfolder is one patient with any number of volumes (patient = the subfolder's name),
so all of a patient's volumes stay on one side of the split. A volume's id is its path in
`root` without extension::

    data/nifti/
        plaque_001.nii.gz           id plaque_001              patient plaque_001
        plaque_002.nii              id plaque_002              patient plaque_002
        patient_17/
            lad.nii.gz              id patient_17/lad          patient patient_17
            rca.nii.gz              id patient_17/rca          patient patient_17

Every volume is read with nibabel (MONAI `NibabelReader`), reoriented to RAS (MONAI
`Orientationd`: the first array axis runs to the patient's Right, the second Anterior,
the third Superior, whatever the file's affine), scaled to `[0, 1]` (CT window or
percentiles) and cropped/padded to `spatial_size` without resampling: the voxel spacing is
the file's. `crop`:

- `center`: the centre of the volume (MONAI `ResizeWithPadOrCropd`), for volumes that are
  already patches (the paper's 64³ sub-volumes around plaques);
- `foreground`: the centre of the bounding box of the voxels above the lowest intensity
  (above `hu_min` in `window` mode), for whole scans surrounded by air;
- `centers`: one patch per row of `centers_file`, a CSV `id,x,y,z` of points in voxel
  coordinates of the RAS-oriented volume (a volume may have several rows: several plaques;
  every volume needs at least one). A patch's id is `<volume id>@<x>_<y>_<z>`; its patient
  is the volume's.

Every patch is cut with the point (or the centre) at index `size // 2` of each axis;
where it reaches beyond the volume it is padded with 0 (the lowest intensity).
Hidden files and folders (names starting with `.`) and the files named by `split_file`
and `centers_file` are ignored; any other file that is not a NIfTI volume is an error.
Headers are read by `datamodules.readers.nifti`, pixels by `datamodules.readers.image_files`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from monai.transforms import BorderPad, Orientationd, ResizeWithPadOrCropd, SpatialCrop, Transform
from monai.transforms.utils import generate_spatial_bounding_box

from memwatch.datamodules.base import MedicalImageDataModule
from memwatch.datamodules.intensity import check_intensity, scale_to_unit
from memwatch.datamodules.readers.folders import visible_files
from memwatch.datamodules.readers.image_files import LoadImageFile, image_format
from memwatch.datamodules.readers.nifti import RAS_LABELS, check_volume_file
from memwatch.errors import InputError

LAYOUT = (
    "root/<patient>.nii.gz (one volume per patient) or root/<patient>/<volume>.nii.gz (several per patient)"
)
def read_centers(path: Path) -> dict[str, list[tuple[int, int, int]]]:
    """Volume id → its points `(x, y, z)` (rounded to voxels) from a CSV with columns `id,x,y,z`."""
    if not path.is_file():
        raise InputError(
            f"centers_file {path} does not exist: give a CSV with columns id,x,y,z or leave it null"
        )
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"id", "x", "y", "z"} <= {c.strip() for c in rows[0] if c}:
        raise InputError(
            f"centers_file {path} needs the columns id,x,y,z (x, y, z in voxels of the RAS-oriented volume)"
        )
    centers: dict[str, list[tuple[int, int, int]]] = {}
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        try:
            point = tuple(round(float(row[axis])) for axis in "xyz")
        except ValueError:
            raise InputError(
                f"centers_file {path} line {line}: x, y, z = {row['x']!r}, {row['y']!r}, {row['z']!r} are not "
                "numbers: give voxel coordinates"
            ) from None
        points = centers.setdefault(row["id"], [])
        if point in points:
            raise InputError(
                f"centers_file {path} line {line} repeats the point {point} of {row['id']!r}: remove one"
            )
        points.append(point)
    return centers


class CropAroundPoint(Transform):
    """`image` `[C, X, Y, Z]` → `[C, *size]` with `record["center"]` at index `size // 2`, zero-padded past the edges.

    MONAI's `SpatialCrop(roi_center=...)` shrinks a patch at the volume's edge (and a
    later pad would move the point off centre): pad first (`BorderPad`), then crop.
    """

    def __init__(self, size: Sequence[int]) -> None:
        self.size = tuple(int(s) for s in size)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        image = record["image"]
        start = [int(c) - s // 2 for c, s in zip(record["center"], self.size, strict=True)]
        before = [max(0, -b) for b in start]
        after = [max(0, b + s - n) for b, s, n in zip(start, self.size, image.shape[1:], strict=True)]
        border = [p for pair in zip(before, after, strict=True) for p in pair]
        if any(border):
            image = BorderPad(spatial_border=border, mode="constant")(image)
        begin = [b + p for b, p in zip(start, before, strict=True)]
        image = SpatialCrop(roi_start=begin, roi_end=[b + s for b, s in zip(begin, self.size, strict=True)])(
            image
        )
        return {**record, "image": image}


class ForegroundCenter(Transform):
    """Sets `record["center"]` to the centre of the bounding box of the voxels above 0 (the lowest intensity)."""

    def __init__(self, lowest: str, fix: str) -> None:
        self.lowest, self.fix = lowest, fix

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        start, end = generate_spatial_bounding_box(record["image"])
        if all(s == e for s, e in zip(start, end, strict=True)):
            raise InputError(
                f"image {record['id']} ({record['image_path']}) has no voxel above {self.lowest}, so crop foreground "
                f"has nothing to centre on: {self.fix}, or set --data.init_args.crop center"
            )
        return {**record, "center": [s + (e - s) // 2 for s, e in zip(start, end, strict=True)]}


class NiftiDataModule(MedicalImageDataModule):
    """NIfTI volumes from one folder (see the module docstring for the layout and the crops).

    Headers are checked when the module is set up (at CLI start-up): a missing or empty
    `root`, a file that is not NIfTI or whose header cannot be read, an image that is not
    one 3D volume, and a bad `centers_file` each raise `InputError` naming the file. Pixels
    are read when the datasets are built (`cache: memory` decodes every volume once, at
    set-up); a damaged volume or NaN/infinite voxels raise `InputError` then.

    Args:
        root: folder of `.nii`/`.nii.gz` volumes, one file or one subfolder per patient.
        spatial_size: `(X, Y, Z)` of every patch, in RAS voxels.
        crop: `center`, `foreground` or `centers` (see the module docstring).
        intensity: `window` maps `[hu_min, hu_max]` to `[0, 1]` and clips (CT in Hounsfield
            units, after the file's `scl_slope`/`scl_inter`); `percentile` maps the
            `percentiles` of each volume to `[0, 1]` and clips (MRI, any units).
        hu_min, hu_max: the CT window (`window` only).
        percentiles: lower and upper percentile, in `[0, 100]` (`percentile` only).
        centers_file: CSV `id,x,y,z` of patch centres (`crop: centers` only).
        batch_size, num_workers, n_train, val_fraction, split_seed, split_file, augment,
            cache, cache_dir: see `MedicalImageDataModule`; the split is by patient, from
            `split_file` (`patient,split`) if given, else seeded.
    """

    def __init__(
        self,
        root: str = "data/nifti",
        spatial_size: Sequence[int] = (64, 64, 64),
        crop: Literal["center", "foreground", "centers"] = "center",
        intensity: Literal["window", "percentile"] = "window",
        hu_min: float = -1000.0,
        hu_max: float = 1000.0,
        percentiles: Sequence[float] = (0.5, 99.5),
        centers_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(spatial_size=spatial_size, **kwargs)
        if self.spatial_dims != 3:
            raise InputError(
                f"spatial_size={list(spatial_size)} must have 3 sizes for NIfTI volumes: set "
                "--data.init_args.spatial_size, e.g. [64, 64, 64]"
            )
        if crop not in ("center", "foreground", "centers"):
            raise InputError(f"crop={crop!r} must be center, foreground or centers")
        if (crop == "centers") != (centers_file is not None):
            raise InputError(
                "crop centers needs centers_file (a CSV id,x,y,z) and centers_file needs crop centers: set both "
                f"--data.init_args.crop centers and --data.init_args.centers_file, or neither (crop={crop!r}, "
                f"centers_file={centers_file!r})"
            )
        self.scaling = check_intensity(intensity, ("window", "percentile"), hu_min, hu_max, percentiles)
        self.root = Path(root)
        self.crop = crop
        self.intensity = intensity
        self.centers_file = centers_file

    def _volumes(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            raise InputError(
                f"root={self.root} is not a folder: set --data.init_args.root to a folder of NIfTI volumes laid out as "
                f"{LAYOUT}"
            )
        named = {Path(f).resolve() for f in (self.split_file, self.centers_file) if f is not None}
        volumes, seen = [], {}
        for path in visible_files(self.root, "root"):
            if path.resolve() in named:
                continue
            found = image_format(path)
            if found is None or found[0] != "nifti":
                raise InputError(
                    f"{path} is not a NIfTI volume (.nii, .nii.gz): convert it (DICOM series: e.g. dcm2niix) "
                    "or move it out of root"
                )
            relative = path.parent.relative_to(self.root) / found[1]
            volume_id = relative.as_posix()
            if volume_id in seen:
                raise InputError(
                    f"{path} and {seen[volume_id]} have the same id {volume_id!r}: rename one of them"
                )
            seen[volume_id] = path
            shape = check_volume_file(path)
            volumes.append(
                {"id": volume_id, "patient": relative.parts[0], "image": str(path), "image_path": str(path),
                 "format": "nifti", "shape": shape}
            )  # fmt: skip
        if not volumes:
            raise InputError(
                f"root={self.root} holds no NIfTI volumes: add .nii or .nii.gz files as {LAYOUT}"
            )
        return volumes

    def list_records(self) -> list[dict[str, Any]]:
        volumes = self._volumes()
        if self.centers_file is None:
            return [{k: v for k, v in volume.items() if k != "shape"} for volume in volumes]
        path = Path(self.centers_file)
        centers = read_centers(path)
        known = {volume["id"] for volume in volumes}
        unknown = sorted(set(centers) - known)
        if unknown:
            raise InputError(
                f"centers_file {path} names {unknown[0]!r} ({len(unknown)} unknown id(s)), which is no volume in "
                f"root={self.root}: ids are paths in root without .nii/.nii.gz, e.g. {sorted(known)[0]!r}"
            )
        records = []
        for volume in volumes:
            shape = volume.pop("shape")
            if volume["id"] not in centers:
                raise InputError(
                    f"{volume['image_path']} has no row in centers_file {path}: add a row {volume['id']},x,y,z "
                    "or move the volume out of root"
                )
            for point in centers[volume["id"]]:
                if not all(0 <= c < n for c, n in zip(point, shape, strict=True)):
                    raise InputError(
                        f"centers_file {path}: point {point} of {volume['id']!r} lies outside its RAS-oriented shape "
                        f"{shape}: give voxel coordinates x, y, z of the volume reoriented to RAS"
                    )
                patch_id = f"{volume['id']}@{point[0]}_{point[1]}_{point[2]}"
                records.append({**volume, "id": patch_id, "center": list(point)})
        return records

    def load_transforms(self) -> list[Callable]:
        keys = "image"
        scale = scale_to_unit(self.scaling, keys)
        if self.intensity == "window":
            lowest, fix = f"hu_min={self.scaling.hu_min:g}", "lower hu_min"
        else:
            lowest, fix = f"the {self.scaling.percentiles[0]:g}th percentile", "remove the constant volume"
        if self.crop == "center":
            crop: list[Callable] = [
                ResizeWithPadOrCropd(keys=keys, spatial_size=self.spatial_size, mode="constant")
            ]
        elif self.crop == "foreground":
            crop = [ForegroundCenter(lowest, fix), CropAroundPoint(self.spatial_size)]
        else:
            crop = [CropAroundPoint(self.spatial_size)]
        # Scaled before cropping, so that zero padding is the lowest intensity and percentiles
        # describe the whole volume, not the patch.
        return [LoadImageFile(), Orientationd(keys=keys, axcodes="RAS", labels=RAS_LABELS), scale, *crop]
