"""Cohorts: which scans to use and their labels, read from a BIDS dataset or a CSV/TSV table.

Labels follow the paper: age in years, sex coded 0 = female, 1 = male. Missing values are NaN
(age, sex) or "" (session, site). Parsing is defensive (`89+`, decimal commas, F/M/female/male/0/1,
`n/a`, stray whitespace); every problem is reported with its line in one `CohortError`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii", ".mgz")
_MISSING = {"", "n/a", "na", "nan", "none", "null", "-", "?", "unknown"}
_FEMALE = {"f", "female", "w", "woman", "0"}
_MALE = {"m", "male", "man", "1"}
_OTHER = {"o", "other"}  # valid in BIDS; no label for a binary sex model
_AGE = re.compile(r"^(\d+(?:[.,]\d*)?)\s*(\+|y|yr|yrs|years?)?$")
# Accepted column names (lower case, spaces as underscores) for each field.
_COLUMNS = {
    "path": ("path", "file", "filepath", "file_path", "filename", "image", "t1", "t1w"),
    "participant_id": ("participant_id", "participant", "subject_id", "subject", "sub", "id", "eid"),
    "session": ("session", "session_id", "ses", "visit"),
    "age": ("age", "age_years", "age_at_scan"),
    "sex": ("sex", "gender"),
    "site": ("site", "scanner", "centre", "center"),
}


class CohortError(ValueError):
    """A cohort table or BIDS dataset with problems; the message lists each with its line."""


@dataclasses.dataclass(frozen=True)
class Scan:
    """One T1 image and its labels. `id` is unique within a cohort (e.g. `sub-01_ses-1`)."""

    id: str
    participant_id: str
    path: Path
    session: str = ""
    age: float = math.nan
    sex: float = math.nan  # 0 = female, 1 = male, NaN = unknown
    site: str = ""


@dataclasses.dataclass(frozen=True)
class Cohort:
    """An ordered, immutable list of scans with numpy accessors for labels."""

    scans: tuple[Scan, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.scans)

    def __iter__(self) -> Iterator[Scan]:
        return iter(self.scans)

    def __getitem__(self, index: int) -> Scan:
        return self.scans[index]

    def __repr__(self) -> str:
        return f"Cohort({len(self)} scans from {self.source!r})"

    def select(self, indices: Sequence[int] | np.ndarray) -> Cohort:
        """Sub-cohort by integer indices or a boolean mask, e.g. `c.select(~np.isnan(c.ages))`."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return Cohort(tuple(self.scans[int(i)] for i in idx), self.source)

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path]) -> Cohort:
        """Unlabelled cohort from image paths; ids from BIDS entities or file names."""
        paths = [Path(p) for p in paths]
        ids = _ids_from_paths(paths, root=None)
        scans = tuple(
            Scan(id=i, participant_id=_bids_entity(p, "sub") or i, path=p, session=_bids_entity(p, "ses") or "")
            for i, p in zip(ids, paths, strict=True)
        )
        return cls(scans, "paths")

    @property
    def ids(self) -> np.ndarray:
        return np.array([s.id for s in self.scans], dtype=str)

    @property
    def participant_ids(self) -> np.ndarray:
        return np.array([s.participant_id for s in self.scans], dtype=str)

    @property
    def sessions(self) -> np.ndarray:
        return np.array([s.session for s in self.scans], dtype=str)

    @property
    def paths(self) -> np.ndarray:
        return np.array([str(s.path) for s in self.scans], dtype=str)

    @property
    def ages(self) -> np.ndarray:
        return np.array([s.age for s in self.scans], dtype=np.float64)

    @property
    def sexes(self) -> np.ndarray:
        return np.array([s.sex for s in self.scans], dtype=np.float64)

    @property
    def sites(self) -> np.ndarray:
        return np.array([s.site for s in self.scans], dtype=str)


def read_cohort(path: str | Path, *, on_error: Literal["raise", "skip"] = "raise") -> Cohort:
    """Read a BIDS dataset directory or a CSV/TSV table (column `path`, optional `participant_id`,
    `session`, `age`, `sex`, `site`) into a `Cohort`.

    Duplicate ids, missing files and unparseable values are collected and raised together as one
    `CohortError`, each with its line; with `on_error="skip"` those rows are dropped with a warning.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if path.is_dir():
        scans, problems = _read_bids(path)
    elif path.is_file():
        scans, problems = _read_table_cohort(path)
    else:
        raise CohortError(f"{path}: no such file or directory")
    if problems:
        _report(path, problems, on_error)
    bad_rows = {line for line, _ in problems}
    scans = [s for line, s in scans if line not in bad_rows]
    if not scans:
        raise CohortError(f"{path}: no usable scans")
    return Cohort(tuple(scans), str(path))


def _report(path: Path, problems: list[tuple[str, str]], on_error: str) -> None:
    listing = "\n".join(f"  {line}: {msg}" for line, msg in problems)
    n = len(problems)
    if on_error == "raise":
        raise CohortError(
            f"{path}: {n} problem{'s' * (n > 1)} (fix {'them' if n > 1 else 'it'}, or skip those rows with "
            f"on_error='skip' / --skip-bad-rows):\n{listing}"
        )
    warnings.warn(f"{path}: skipping {n} row(s) with problems:\n{listing}", stacklevel=3)


# ---------------------------------------------------------------------------------------------------
# Value parsing


def parse_age(text: str) -> float:
    """Years as float; `89+` -> 89, `26,9` -> 26.9, `n/a` -> NaN. Raises ValueError."""
    t = text.strip().lower()
    if t in _MISSING:
        return math.nan
    m = _AGE.match(t)
    if m is None:
        raise ValueError(f"age {text.strip()!r} is not a number of years")
    age = float(m.group(1).replace(",", "."))
    if not 0 <= age <= 130:
        raise ValueError(f"age {text.strip()!r} is implausible")
    return age


def parse_sex(text: str) -> float:
    """0 = female, 1 = male (F/M/female/male/0/1, any case), NaN if missing or other. Raises ValueError."""
    t = text.strip().lower()
    if t in ("0.0", "1.0"):
        t = t[0]
    if t in _MISSING or t in _OTHER:
        return math.nan
    if t in _FEMALE:
        return 0.0
    if t in _MALE:
        return 1.0
    hint = " (1/2 coding is ambiguous)" if t == "2" else ""
    raise ValueError(f"sex {text.strip()!r} not understood{hint}; use F/M or 0 = female, 1 = male")


# ---------------------------------------------------------------------------------------------------
# Tables


def read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]], list[tuple[str, str]]]:
    """Header (normalised names) and data rows with their 1-based line numbers, plus shape problems."""
    text = path.read_text(encoding="utf-8-sig")  # -sig: Excel writes a byte-order mark
    if not text.strip():
        raise CohortError(f"{path}: empty file")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else _sniff_delimiter(text.splitlines()[0])
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [_normalise_column(c) for c in next(reader)]
    rows, problems = [], []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            hint = " (unquoted decimal comma?)" if delimiter == "," and len(cells) > len(header) else ""
            problems.append((f"line {line}", f"{len(cells)} fields, header has {len(header)}{hint}"))
            continue
        rows.append((line, [c.strip() for c in cells]))
    return header, rows, problems


def _sniff_delimiter(first_line: str) -> str:
    counts = {d: first_line.count(d) for d in ("\t", ";", ",")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _normalise_column(name: str) -> str:
    return "_".join(name.strip().lower().split())


def _find_columns(header: list[str], path: Path) -> dict[str, int]:
    found = {}
    for field, aliases in _COLUMNS.items():
        for alias in aliases:
            if alias in header:
                found[field] = header.index(alias)
                break
    duplicates = {c for c in header if header.count(c) > 1}
    if duplicates:
        raise CohortError(f"{path}: duplicate column name(s) {sorted(duplicates)}")
    return found


def _read_table_cohort(path: Path) -> tuple[list[tuple[str, Scan]], list[tuple[str, str]]]:
    header, rows, problems = read_table(path)
    cols = _find_columns(header, path)
    if "path" not in cols:
        raise CohortError(f"{path}: no 'path' column (columns: {', '.join(header)}); add one with the image paths")
    root = path.parent
    paths = [_resolve(cells[cols["path"]], root) for _, cells in rows]
    fallback_ids = _ids_from_paths(paths, root)
    scans = []
    for (line, cells), image, fallback in zip(rows, paths, fallback_ids, strict=True):
        where = f"line {line}"
        row = {field: cells[i] for field, i in cols.items()}
        try:
            if not row["path"]:
                raise ValueError("empty path")
            age, sex = parse_age(row.get("age", "")), parse_sex(row.get("sex", ""))
        except ValueError as e:
            problems.append((where, str(e)))
            continue
        if not image.is_file():
            problems.append((where, f"file not found: {image}"))
        if row.get("participant_id"):
            participant, session = row["participant_id"], row.get("session", "")
            scan_id = f"{participant}_{session}" if session else participant
        else:  # ids from the file name (BIDS entities) or, when names collide, the relative path
            participant = _bids_entity(image, "sub") or fallback
            session = row.get("session") or _bids_entity(image, "ses") or ""
            scan_id = fallback
        scans.append((where, Scan(scan_id, participant, image, session, age, sex, row.get("site", ""))))
    problems += _duplicate_ids(scans)
    return scans, sorted(problems, key=_line_key)


def _resolve(text: str, root: Path) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else root / p


def _duplicate_ids(scans: list[tuple[str, Scan]]) -> list[tuple[str, str]]:
    first: dict[str, str] = {}
    problems = []
    for where, scan in scans:
        if scan.id in first:
            problems.append((where, f"duplicate id {scan.id!r} (first at {first[scan.id]})"))
        else:
            first[scan.id] = where
    return problems


def _line_key(item: tuple[str, str]) -> tuple[str, int]:
    where = item[0]
    m = re.search(r"line (\d+)$", where)
    return (where[: m.start()] if m else where, int(m.group(1)) if m else 0)


def _strip_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _ids_from_paths(paths: Sequence[Path], root: Path | None) -> list[str]:
    """File stems (without the BIDS `_T1w` suffix); relative paths when stems collide (e.g. UK Biobank)."""
    stems = [re.sub(r"_T1w$", "", _strip_suffix(p.name)) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    ids = []
    for p in paths:
        try:
            rel = p.relative_to(root) if root is not None else p
        except ValueError:
            rel = p
        ids.append(_strip_suffix(rel.as_posix()))
    return ids


def _bids_entity(path: Path, key: str) -> str | None:
    m = re.search(rf"(?:^|_)({key}-[A-Za-z0-9]+)(?=_|$)", _strip_suffix(path.name))
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------------------
# BIDS


def _read_bids(root: Path) -> tuple[list[tuple[str, Scan]], list[tuple[str, str]]]:
    images = sorted(
        p
        for pattern in ("sub-*/anat/*_T1w.nii*", "sub-*/ses-*/anat/*_T1w.nii*")
        for p in root.glob(pattern)
        if p.name.endswith((".nii", ".nii.gz")) and p.is_file()
    )
    if not images:
        raise CohortError(
            f"{root}: not a BIDS dataset (no sub-*/[ses-*/]anat/*_T1w.nii[.gz]); "
            "pass a BIDS directory or a CSV/TSV with a 'path' column"
        )
    labels, bad_subjects, problems = _participants(root)
    session_ages = {}
    for subject in sorted({p.relative_to(root).parts[0] for p in images}):
        ages, session_problems = _session_ages(root / subject / f"{subject}_sessions.tsv")
        session_ages[subject] = ages
        problems += session_problems
    scans, unlabelled = [], []
    for image in images:
        subject = image.relative_to(root).parts[0]
        session = _bids_entity(image, "ses") or ""
        if subject not in labels and subject not in bad_subjects:
            unlabelled.append(subject)
        age, sex, site = labels.get(subject, (math.nan, math.nan, ""))
        age = session_ages[subject].get(session, age)
        scan_id = re.sub(r"_T1w$", "", _strip_suffix(image.name))
        # a subject whose participants.tsv row is bad shares that row's fate (reported or skipped)
        where = bad_subjects.get(subject, str(image.relative_to(root)))
        scans.append((where, Scan(scan_id, subject, image, session, age, sex, site)))
    problems += _duplicate_ids(scans)
    if labels and unlabelled:
        warnings.warn(
            f"{root}: {len(set(unlabelled))} subject(s) with images but no row in participants.tsv "
            f"(e.g. {unlabelled[0]}); their labels are missing",
            stacklevel=3,
        )
    without_images = sorted(set(labels) - {p.relative_to(root).parts[0] for p in images})
    if without_images:
        warnings.warn(
            f"{root}: {len(without_images)} participant(s) in participants.tsv without a T1w image "
            f"(e.g. {without_images[0]}); they are not in the cohort",
            stacklevel=3,
        )
    return scans, problems


def _participants_file(root: Path) -> Path | None:
    candidates = [root / "participants.tsv"]
    if root.parent.name == "derivatives":  # a derivatives pipeline folder: labels live in the raw dataset
        candidates.append(root.parent.parent / "participants.tsv")
    return next((c for c in candidates if c.is_file()), None)


def _participants(
    root: Path,
) -> tuple[dict[str, tuple[float, float, str]], dict[str, str], list[tuple[str, str]]]:
    """Labels by participant_id, the bad rows' locations by participant_id, and the problems."""
    path = _participants_file(root)
    if path is None:
        warnings.warn(f"{root}: no participants.tsv; ages and sexes are missing", stacklevel=4)
        return {}, {}, []
    header, rows, problems = read_table(path)
    problems = [(f"{path.name} {where}", msg) for where, msg in problems]
    cols = _find_columns(header, path)
    if "participant_id" not in cols:
        raise CohortError(f"{path}: no participant_id column (columns: {', '.join(header)})")
    labels: dict[str, tuple[float, float, str]] = {}
    bad: dict[str, str] = {}
    first: dict[str, int] = {}
    for line, cells in rows:
        where = f"{path.name} line {line}"
        row = {field: cells[i] for field, i in cols.items()}
        subject = row["participant_id"]
        if not subject:
            problems.append((where, "empty participant_id"))
            continue
        subject = subject if subject.startswith("sub-") else f"sub-{subject}"
        if subject in first:
            problems.append((where, f"duplicate participant_id {subject!r} (first at line {first[subject]})"))
            bad.setdefault(subject, where)
            continue
        first[subject] = line
        try:
            labels[subject] = (parse_age(row.get("age", "")), parse_sex(row.get("sex", "")), row.get("site", ""))
        except ValueError as e:
            problems.append((where, f"{subject}: {e}"))
            bad[subject] = where
    return labels, bad, problems


def _session_ages(path: Path) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Per-session ages from `sub-X/sub-X_sessions.tsv` (BIDS longitudinal), if present."""
    if not path.is_file():
        return {}, []
    header, rows, problems = read_table(path)
    problems = [(f"{path.name} {where}", msg) for where, msg in problems]
    if "session_id" not in header or "age" not in header:
        return {}, problems
    ages = {}
    for line, cells in rows:
        try:
            age = parse_age(cells[header.index("age")])
        except ValueError as e:
            problems.append((f"{path.name} line {line}", str(e)))
            continue
        if not math.isnan(age):
            ages[cells[header.index("session_id")]] = age
    return ages, problems
