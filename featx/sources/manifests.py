"""CSV manifests (`path,label[,split][,group]`) and plain image lists."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.errors import UsageError
from featx.settings import SPLIT_ALIASES
from featx.sources.dataset import FileLoader, RawSource, unlabelled
from featx.sources.folders import is_image_name, stat_key

log = logging.getLogger("featx")


# Column names a CSV header may use, per role (compared case-insensitively).
CSV_COLUMNS = {
    "path": (
        "path",
        "filename",
        "file",
        "file_name",
        "filepath",
        "file_path",
        "image",
        "image_path",
        "image_file",
        "image_name",
        "img",
        "img_path",
        "fname",
    ),
    "label": ("label", "class", "target", "category", "class_name", "classname", "labels", "y"),
    "split": ("split", "subset", "set", "partition"),
    "group": ("group", "group_id", "subject", "subject_id", "patient", "patient_id"),
}


@dataclass
class CsvTable:
    """The data rows of a CSV: `rows[k]` is (line number, {role: stripped value}) for the roles
    in `columns` (role -> column index); `header` is 'named', 'unnamed' or None."""

    columns: dict[str, int]
    rows: list[tuple[int, dict[str, str]]]
    header: str | None
    notes: list[str] = field(default_factory=list)


def read_csv(
    path: str | Path, where: str, need: tuple[str, ...] = ("path", "label"), optional: tuple[str, ...] = ()
) -> CsvTable:
    """Read a CSV of image paths for extract's manifest and predict's input, or raise a one-line
    UsageError that starts with `where` (the option and file).

    UTF-8 with or without a byte-order mark. The first row is a header when none of its cells
    names an image (an existing file, or a name ending in an image extension): taken as data, such
    a row would invent an image and a class named after its label column. A header's known column
    names (CSV_COLUMNS: path, filename, file, image...; label, class, target...; split; group)
    place the columns (an unnamed path or label column is the first or second one); without
    known names, or without a header, the columns are path, label[, split] by position. `need`
    lists the roles every row must have, except those in `optional` (extract's label: a header
    that names no label column and has no second column, or rows of one column, give a table
    without one)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{where}: cannot read the CSV ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: spreadsheets write a byte-order mark
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UsageError(
            f"{where}: the CSV is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as "
            f"UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}-utf8.csv"
        ) from None
    rows: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append((reader.line_num, [c.strip() for c in r]))
    except csv.Error as e:
        raise UsageError(f"{where}: row {reader.line_num} is not valid CSV ({e})") from None
    expect = ",".join(need) + ("[,split]" if "label" in need else "")
    if not rows:
        raise UsageError(f"{where}: the CSV lists no images (expected rows {expect})")
    base = path.parent

    def is_file(p: str) -> bool:
        return bool(p) and os.path.isfile(p if os.path.isabs(p) else base / p)

    first = [c.lower() for c in rows[0][1]]
    header = None
    notes: list[str] = []
    columns: dict[str, int] = {}
    if not any(is_file(c) or is_image_name(c) for c in rows[0][1]):
        for role, names in CSV_COLUMNS.items():
            hit = next((k for k, c in enumerate(first) if c in names and k not in columns.values()), None)
            if hit is not None:
                columns[role] = hit
        header = "named" if columns else "unnamed"
    if header == "named":
        for role, k in (("path", 0), ("label", 1)):
            if role in need and role not in columns and k < len(first) and k not in columns.values():
                columns[role] = k
        missing = [r for r in need if r not in columns and r not in optional]
        if missing:
            raise UsageError(
                f"{where}: the header {','.join(rows[0][1])} names no {missing[0]} column; "
                f"call it one of {', '.join(CSV_COLUMNS[missing[0]][:4])}"
            )
    else:
        width = len(rows[1][1]) if header and len(rows) > 1 else len(rows[0][1])
        columns = {"path": 0}
        if "label" in optional and width == 1:  # one column: paths alone (unlabelled data)
            need = tuple(r for r in need if r != "label")
            expect = "path"
        if header == "unnamed":
            notes.append(
                f"{where}: the first row ({','.join(rows[0][1])[:80]}) names no image file, so it was read "
                f"as a header (columns {expect} by position)"
            )
        if "label" in need:
            columns.update({"label": 1, **({"split": 2} if width >= 3 else {})})
    data = rows[1:] if header else rows
    if not data:
        raise UsageError(f"{where}: the CSV lists no images, only a header (expected rows {expect})")
    if header != "named" and (
        "label" in need or "label" in optional
    ):  # by position, the same width throughout
        width = len(data[0][1])
        widths = (2, 3) if "label" in need else (1,)
        for line, r in data:
            if len(r) != width or len(r) not in widths:
                shape = "path,label or path,label,split" if "label" in need else "path (one column)"
                raise UsageError(f"{where}: row {line} has {len(r)} columns; every row must be {shape}")
    top = max(columns.values())
    out = []
    for line, r in data:
        if len(r) <= top:
            raise UsageError(f"{where}: row {line} has {len(r)} columns; the header has {len(first)}")
        out.append((line, {role: r[k] for role, k in columns.items()}))
    return CsvTable(columns, out, header, notes)


def manifest_source(path: Path) -> RawSource:
    """A CSV manifest; one without a label column (a header naming none, or one column) is unlabelled."""
    where = f"--data {path}"
    table = read_csv(path, where, need=("path", "label"), optional=("label",))
    has_split, has_group = "split" in table.columns, "group" in table.columns
    labelled = "label" in table.columns
    group_split: dict[str, tuple[int, str | None]] = {}  # group -> (first row, its split)
    groups: list[str] = []
    base = path.parent
    seen: dict[str, tuple[int, str, str | None]] = {}  # normalized path -> (line, label, split)
    paths, labels_s, splits, dropped = [], [], [], []
    for line, rec in table.rows:
        p, lab = rec["path"], rec.get("label", "")
        if not p or (labelled and not lab):
            raise UsageError(f"{where}: row {line} has an empty path or label")
        split = None
        if has_split:
            split = SPLIT_ALIASES.get(rec["split"].lower())
            if split is None:
                raise UsageError(f"{where}: row {line}: split {rec['split']!r} is not train, val or test")
        key = os.path.normcase(os.path.normpath(p if os.path.isabs(p) else base / p))
        if key in seen:
            first_line, first_lab, first_split = seen[key]
            if (first_lab, first_split) != (lab, split):
                was = "/".join(x for x in (first_lab, first_split) if x)
                now = "/".join(x for x in (lab, split) if x)
                raise UsageError(
                    f"{where}: {p} is listed twice with different labels or splits (row {first_line}: "
                    f"{was}, row {line}: {now}); keep one row per image"
                )
            dropped.append((p, first_line, line))
            continue
        if has_group:
            group = rec["group"] or f"\0row {line}"  # no group: the image is its own
            first = group_split.setdefault(group, (line, split))
            if has_split and first[1] != split:
                raise UsageError(
                    f"{where}: group {group!r} is in split {first[1]} (row {first[0]}) and {split} (row {line}); "
                    f"a group's images must share one split, or the test images leak into training"
                )
            groups.append(group)
        seen[key] = (line, lab, split)
        paths.append(p)
        labels_s.append(lab)
        splits.append(split)
    notes = list(table.notes)
    if dropped:
        p, a, b = dropped[0]
        notes.append(f"{where}: {len(dropped)} duplicate row(s) were dropped (first: {p}, rows {a} and {b})")
    if not labelled:
        notes.append(
            f"{where}: no label column: read as unlabelled data "
            f"(extract, export and predict work; fit, score and bench need labels)"
        )
    classes = sorted(set(labels_s))
    index = {c: i for i, c in enumerate(classes)}
    full = [p if os.path.isabs(p) else str(base / p) for p in paths]
    h = hashlib.sha256(path.read_bytes())
    for p in full:
        h.update(stat_key(p))
    return RawSource(
        name=path.stem,
        spec=str(path),
        classes=classes,
        ids=paths,
        labels=np.array([index[c] for c in labels_s], dtype=np.int64),
        splits=np.array(splits, dtype="<U5") if has_split else None,
        loader=FileLoader(full, paths),
        fingerprint=h.hexdigest(),
        split_source="manifest" if has_split else "seeded",
        notes=notes,
        groups=np.array(groups, dtype=str) if has_group else None,
        labelled=labelled,
    )


LIST_SUFFIXES = (".txt", ".lst")


def read_path_list(path: str | Path, where: str) -> list[str]:
    """The image paths of a text list (one a line, relative to the list's folder; blank lines and
    lines starting with # are left out), as written; every one must end in an image extension."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise UsageError(f"{where}: cannot read the list ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{where}: the list is not UTF-8 text (byte at offset {e.start}); save it as UTF-8"
        ) from None
    out = []
    for k, line in enumerate(text.splitlines(), 1):
        p = line.strip()
        if not p or p.startswith("#"):
            continue
        if not is_image_name(os.path.basename(p)):
            raise UsageError(
                f"{where}: line {k} ({p[:80]}) is not an image path; a {Path(path).suffix} list names "
                f"one image file a line (labelled data: a CSV manifest path,label)"
            )
        out.append(p)
    if not out:
        raise UsageError(f"{where}: the list names no images (one image path a line)")
    return out


def list_source(path: Path) -> RawSource:
    """A text file of image paths: unlabelled data, in the list's order (a path listed twice is taken once)."""
    where = f"--data {path}"
    base = path.parent
    seen: dict[str, None] = {}
    for p in read_path_list(path, where):
        seen.setdefault(p, None)
    ids = list(seen)
    full = [p if os.path.isabs(p) else str(base / p) for p in ids]
    h = hashlib.sha256(b"image list\n" + path.read_bytes())
    for p in full:
        h.update(stat_key(p))
    classes, labels = unlabelled(len(ids))
    return RawSource(
        name=path.stem,
        spec=str(path),
        classes=classes,
        ids=ids,
        labels=labels,
        splits=None,
        loader=FileLoader(full, ids),
        fingerprint=h.hexdigest(),
        split_source="seeded",
        labelled=False,
        notes=[
            f"{where}: an image list: read as unlabelled data (extract, export and predict work; fit, score "
            f"and bench need labels)"
        ],
    )


def read_image_list(path: str) -> list[str]:
    """The image paths of a CSV given to `featx predict` (the path column; see `read_csv`),
    relative ones joined to the CSV's folder. Rows with an empty path are left out."""
    table = read_csv(path, str(path), need=("path",))
    for note in table.notes:
        log.warning(note)
    base = os.path.dirname(os.path.abspath(path))
    return [p if os.path.isabs(p) else os.path.join(base, p) for _, rec in table.rows if (p := rec["path"])]
