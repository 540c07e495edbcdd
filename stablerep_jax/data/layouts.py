"""Existing image collections that `import_images` turns into our TFRecords.

Two layouts, both read into `CaptionGroup`s (a caption, its id and the paths of its K images):

  reference  the StableRep reference's data: a CSV of `relative_path,caption` rows and a list
             of root folders, one per generation seed, each holding the same relative paths
             (`dataset/data.py` keeps the rows whose path ends in .png/.jpg/.jpeg, so a header
             row is skipped; caption_id is the index among the kept rows). A path that is
             absolute or climbs out of the roots with `..` is refused, naming its row.
  folder     a folder of caption groups: one sub-folder per caption holding `caption.txt` and
             its images (sorted by file name); caption_id follows the sorted sub-folder names.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import posixpath

import tensorflow as tf

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FOLDER_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS + (".webp", ".bmp")
CAPTION_FILE = "caption.txt"


@dataclasses.dataclass(frozen=True)
class CaptionGroup:
    caption: str
    caption_id: int
    paths: tuple[str, ...]


def inside_root(rel_path: str, where: str) -> str:
    """`rel_path` normalised, or ValueError naming `where` when it is absolute or climbs out of
    its root with `..` (a CSV must not make the job read files outside the roots). Symbolic
    links inside a root are followed: data sets are often spread over disks that way."""
    if rel_path.startswith(("/", "\\")) or "://" in rel_path or os.path.isabs(rel_path):
        raise ValueError(f"{where}: {rel_path!r} is absolute; paths must be relative to the roots")
    as_posix = posixpath.normpath(rel_path.replace("\\", "/"))    # Windows-style '..\\' too
    if as_posix == ".." or as_posix.startswith("../"):
        raise ValueError(f"{where}: {rel_path!r} leads outside the root folders ('..')")
    return posixpath.normpath(rel_path)


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of `path` (a BOM dropped); bytes that are not UTF-8 are a ValueError naming
    `what`, the file, the line and the bytes (a bare UnicodeDecodeError names none of them)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path}:{line} is not UTF-8 text: undecodable bytes "
                         f"{data[e.start:e.end]!r} (byte {e.start} of the file); save it as "
                         "UTF-8") from e


def read_reference_layout(csv_path: str, roots: list[str]) -> list[CaptionGroup]:
    """CSV rows -> groups with one path per root, in CSV order."""
    if not roots:
        raise ValueError("roots is empty: give the root folders, one per seed, comma-separated")
    if not tf.io.gfile.exists(csv_path):
        raise FileNotFoundError(f"csv {csv_path!r} does not exist")
    text = read_text(csv_path, "csv")
    groups = []
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row:
            continue
        if len(row) < 2:
            raise ValueError(f"{csv_path}:{line_no}: expected 'relative_path,caption', got {row!r}")
        rel_path, caption = row[0].strip(), row[1]
        if not rel_path.lower().endswith(IMAGE_EXTENSIONS):
            continue            # the reference skips such rows (e.g. a header)
        rel_path = inside_root(rel_path, f"{csv_path}:{line_no}")
        groups.append(CaptionGroup(caption=caption, caption_id=len(groups),
                                   paths=tuple(os.path.join(root, rel_path) for root in roots)))
    if not groups:
        raise ValueError(f"{csv_path}: no row names an image ({', '.join(IMAGE_EXTENSIONS)})")
    return groups


def read_folder_layout(folder: str) -> list[CaptionGroup]:
    """Sub-folders with caption.txt + images -> groups, sorted by sub-folder name."""
    if not tf.io.gfile.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist")
    groups = []
    for name in sorted(tf.io.gfile.listdir(folder)):
        sub = os.path.join(folder, name.rstrip("/"))
        if not tf.io.gfile.isdir(sub):
            continue
        caption_path = os.path.join(sub, CAPTION_FILE)
        if not tf.io.gfile.exists(caption_path):
            raise FileNotFoundError(f"{sub} has no {CAPTION_FILE}")
        caption = read_text(caption_path, "caption file").strip()
        if not caption:
            raise ValueError(f"{caption_path} is empty")
        images = sorted(n for n in tf.io.gfile.listdir(sub)
                        if n.lower().endswith(FOLDER_IMAGE_EXTENSIONS))
        if not images:
            raise ValueError(f"{sub} holds no image ({', '.join(FOLDER_IMAGE_EXTENSIONS)})")
        groups.append(CaptionGroup(caption=caption, caption_id=len(groups),
                                   paths=tuple(os.path.join(sub, n) for n in images)))
    if not groups:
        raise ValueError(f"{folder} has no caption sub-folders")
    return groups
