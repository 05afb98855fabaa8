"""The DICOM study the C-STORE case sends, made once into bench/.cache, and the check that it arrived intact.

Owns: generating a CT study from pydicom's bundled CT_small.dcm (its header, a 512 x 512 x 16-bit pixel
payload per instance, like a real CT slice, filled with random bytes so that no two instances are alike
and a mix-up would show), a manifest with a SHA-256 of every instance's pixel data, and comparing what a
storescp wrote against that manifest. It must not start processes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

#: Bumped when the generated study changes, so an old cache is made anew.
STUDY_VERSION = 1
ROWS = COLUMNS = 512
#: 420 slices of 512 KiB each: 220 MB of pixel data, above the 200 MB the case asks for.
INSTANCES = 420


@dataclass(frozen=True)
class Study:
    folder: Path
    instances: int
    file_bytes: int  # what storescu reads and sends, headers included
    pixels: dict[str, str]  # SOP Instance UID -> SHA-256 of its pixel data


def _manifest(folder: Path) -> Path:
    return folder / "manifest.json"


def load(folder: Path) -> Study | None:
    try:
        data = json.loads(_manifest(folder).read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != STUDY_VERSION:
        return None
    files = sorted((folder / "dcm").glob("*.dcm"))
    if len(files) != data["instances"] or sum(f.stat().st_size for f in files) != data["file_bytes"]:
        return None
    return Study(folder / "dcm", data["instances"], data["file_bytes"], data["pixels"])


def ensure_study(cache: Path, instances: int = INSTANCES) -> Study:
    """The cached study, generated first if it is missing or stale (a few seconds, once)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder = cache / f"ct-study-v{STUDY_VERSION}-{instances}"
    study = load(folder)
    if study is not None:
        return study
    out = folder / "dcm"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.dcm"):
        old.unlink()
    template = get_testdata_file("CT_small.dcm", download=False)
    if template is None:
        raise FileNotFoundError("pydicom's test file CT_small.dcm is not installed")
    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    pixels: dict[str, str] = {}
    total = 0
    for number in range(1, instances + 1):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = number
        ds.SliceLocation = float(number)
        ds.ImagePositionPatient = [0.0, 0.0, float(number)]
        data = os.urandom(ROWS * COLUMNS * 2)
        ds.PixelData = data
        path = out / f"{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        pixels[uid] = hashlib.sha256(data).hexdigest()
        total += path.stat().st_size
    manifest = {"version": STUDY_VERSION, "instances": instances, "file_bytes": total, "pixels": pixels}
    _manifest(folder).write_text(json.dumps(manifest))
    return Study(out, instances, total, pixels)


def verify(study: Study, received: Path) -> tuple[bool, str]:
    """Did every instance arrive, once, with its pixel data bit for bit? (ok, a one-line account)."""
    import pydicom

    files = [p for p in received.rglob("*") if p.is_file()]
    seen: set[str] = set()
    bad: list[str] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            uid = str(ds.SOPInstanceUID)
            digest = hashlib.sha256(ds.PixelData).hexdigest()
        except Exception as exc:  # any unreadable file is a failure to report, not a crash
            bad.append(f"{path.name}: unreadable ({type(exc).__name__})")
            continue
        if study.pixels.get(uid) != digest:
            bad.append(f"{path.name}: pixel data differs" if uid in study.pixels else f"{path.name}: unknown")
        elif uid in seen:
            bad.append(f"{path.name}: duplicate")
        seen.add(uid)
    missing = len(set(study.pixels) - seen)
    ok = not bad and missing == 0 and len(files) == study.instances
    text = f"{len(files)}/{study.instances} files, {missing} missing, {len(bad)} bad"
    if bad:
        text += f" (first: {bad[0]})"
    return ok, text
