"""Cohorts: which scans to use and their labels, read from a BIDS dataset or a CSV/TSV table.

Labels follow the paper: age in years, sex coded 0 = female, 1 = male. Missing values are NaN
(age, sex) or "" (session, site). Parsing is defensive (`89+`, decimal commas, F/M/female/male/0/1,
`n/a`, stray whitespace); every problem is reported with its line in one `CohortError`. A sex value
that is not understood (e.g. a 1/2 coding) becomes NaN with a warning naming its lines, unless the sex
label is required (`sex_required=True`); `sex_coding=` states another coding ({"1": "M", "2": "F"}), and a
sex column whose name spells its coding (IXI's "SEX_ID (1=m, 2=f)") is read by it. Label columns with other
names are named explicitly (`age_column=`, ...); a table whose label columns are not recognised gets a warning
listing its columns. A `.txt` file with one image path per line (no header) is an unlabelled cohort.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
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
    "sex": ("sex", "gender", "m/f"),
    "site": ("site", "site_id", "scanner", "centre", "center"),
}
_LABELS = ("age", "sex", "site")
_LIKELY = {"age": re.compile("age", re.I), "sex": re.compile(r"sex|gender|m/f", re.I),
           "site": re.compile("site|scanner|cent(re|er)", re.I)}  # to suggest a column in warnings
_SEX_CODINGS = "F/M, female/male (any case), 0 = female / 1 = male, n/a = missing"


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


FILE_NOT_FOUND = "file not found"


def read_cohort(
    path: str | Path,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    age_column: str | None = None,
    sex_column: str | None = None,
    site_column: str | None = None,
    id_column: str | None = None,
    path_column: str | None = None,
    bids_filter: Mapping[str, str | None] | None = None,
    sex_required: bool = False,
    check_files: bool = True,
    sex_coding: Mapping[str, str] | None = None,
    labels_required: bool = True,
) -> Cohort:
    """Read a BIDS dataset directory, a CSV/TSV table (column `path`, optional `participant_id`,
    `session`, `age`, `sex`, `site`), a `.txt` list of image paths (one per line) or a plain folder of images
    (`*.nii[.gz]`, `*.mgz` directly in it; unlabelled, ids from the file names) into a `Cohort`.

    `age_column=`, `sex_column=`, `site_column=`, `id_column=`, `path_column=` name columns with other
    names (e.g. IXI's "Age (years)"; in BIDS, columns of participants.tsv). `bids_filter` picks one T1w
    image per subject and session by BIDS entities, e.g. `{"space": "MNI152Lin", "res": None}`: a value
    must match, None (or "") means the entity is absent, "*" keeps every value as a separate scan.
    Duplicate ids, missing files and unparseable ages are collected and raised together as one
    `CohortError`, each with its line; with `on_error="skip"` those rows are dropped with a warning.
    Unparseable sex values become NaN with a warning (errors with `sex_required=True`).
    `sex_coding` maps the sex column's values to F/M (e.g. `{"1": "M", "2": "F"}`); without it, a column whose
    name spells a coding ("SEX_ID (1=m, 2=f)") is read by that coding.
    `check_files=False` keeps rows whose image file is missing (they fail when loaded: for readers that skip
    scans which cannot be loaded, such as `jaxtl predict`). `labels_required=False` (readers that need no labels,
    such as `jaxtl predict` and `jaxtl embed`): an age that cannot be read, or a subject's labels given twice, leave
    the label missing with a warning and keep the scans.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    coding = _check_coding(sex_coding) if sex_coding else None
    path = Path(path)
    named = {"age": age_column, "sex": sex_column, "site": site_column, "participant_id": id_column,
             "path": path_column}
    named = {field: column for field, column in named.items() if column}
    if bids_filter and not path.is_dir():
        raise ValueError(f"{path}: bids_filter applies to BIDS directories, not to tables")
    label_problems: list[tuple[str, str]] = []  # labels_required=False: labels left missing, scans kept
    if path.is_dir() and not named and not bids_filter and _is_image_folder(path):
        scans, problems = _read_image_folder(path)
    elif path.is_dir():
        scans, problems = _read_bids(path, named, dict(bids_filter or {}), sex_required, coding,
                                     None if labels_required else label_problems)
    elif path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
        raise CohortError(f"{path}: an image, not a cohort; give a BIDS directory, a CSV/TSV with a 'path' column or "
                          "a .txt list of image paths (one image: jaxtl.load_volume, or jaxtl.embed([path], model))")
    elif path.is_file() and not named and _is_path_list(path):
        scans, problems = _read_path_list(path)
    elif path.is_file():
        scans, problems = _read_table_cohort(path, named, sex_required, coding,
                                             None if labels_required else label_problems)
    else:
        raise CohortError(f"{path}: no such file or directory")
    if not check_files:  # kept: they fail when loaded; the table's hint (where relative paths are read) said here
        missing = [(line, msg) for line, msg in problems if msg.startswith(FILE_NOT_FOUND)]
        problems = [(line, msg) for line, msg in problems if not msg.startswith(FILE_NOT_FOUND)]
        if missing:
            warnings.warn(f"{path}: {len(missing)} image file(s) not found{_listing(missing, limit=5)}", stacklevel=2)
    if label_problems:
        warnings.warn(f"{path}: {len(label_problems)} label(s) not understood, left missing (the scans are kept):"
                      f"{_listing(sorted(label_problems, key=_line_key))}", stacklevel=2)
    if problems:
        _report(path, problems, on_error)
    bad_rows = {line for line, _ in problems}
    scans = [s for line, s in scans if line not in bad_rows]
    if not scans:
        raise CohortError(f"{path}: no usable scans")
    return Cohort(tuple(scans), str(path))


def parse_bids_filter(items: Sequence[str]) -> dict[str, str | None]:
    """`["space=MNI152Lin", "res="]` (the CLI's `--bids-filter`) -> `{"space": "MNI152Lin", "res": None}`."""
    out: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9]+", key.strip()):
            raise ValueError(f"--bids-filter {item!r}: expected ENTITY=VALUE, e.g. space=MNI152Lin "
                             "(ENTITY= for images without the entity, ENTITY=* for every value)")
        out[key.strip()] = value.strip() or None
    return out


def label_columns_hint(source: str | Path, field: str) -> str:
    """What to do when no scan of a cohort has a `field` ("age" or "sex") label: its columns and the fix."""
    path = Path(str(source))
    table = None
    if path.is_dir() and (path / "index.json").exists():
        coding = " and, where it is coded otherwise than F/M or 0/1, its coding (--sex-coding 1=M,2=F)"
        return (f"the cache holds the labels of the cohort it was prepared from; re-run `jaxtl prepare` naming "
                f"the {field} column (--{field}-column NAME){coding if field == 'sex' else ''}")
    if (path.is_file() and _is_path_list(path)) or (path.is_dir() and _is_image_folder(path)):
        return (f"{path} lists images without labels; give a CSV/TSV with a 'path' and a '{field}' column or a BIDS "
                "dataset with participants.tsv")
    if path.is_dir():
        table = _participants_file(path)
    elif path.is_file():
        table = path
    columns = ""
    if table is not None:
        try:
            columns = f"columns of {table}: {', '.join(repr(c) for c in _read_table(table)[0])}; "
        except (CohortError, OSError, UnicodeDecodeError):
            columns = ""
    coding = f" and use {_SEX_CODINGS}" if field == "sex" else ""
    return (f"{columns}name the {field} column (read_cohort(..., {field}_column=NAME), "
            f"`jaxtl prepare --{field}-column NAME`){coding}")


def _listing(problems: Sequence[tuple[str, str]], limit: int | None = None) -> str:
    """One indented line per (where, problem), each after a newline; "  ..." for those past `limit`."""
    shown = problems if limit is None else problems[:limit]
    return "".join(f"\n  {line}: {msg}" for line, msg in shown) + ("\n  ..." if len(shown) < len(problems) else "")


def _report(path: Path, problems: list[tuple[str, str]], on_error: str) -> None:
    listing = _listing(problems)
    n = len(problems)
    if on_error == "raise":
        raise CohortError(
            f"{path}: {n} problem{'s' * (n > 1)} (fix {'them' if n > 1 else 'it'}, or skip those rows: "
            f"read_cohort(..., on_error='skip'), `jaxtl prepare --skip-bad-rows`; `jaxtl predict` and `jaxtl embed` "
            f"skip them unless --on-error raise):{listing}"
        )
    warnings.warn(f"{path}: skipping {n} row(s) with problems:{listing}", stacklevel=3)


# ---------------------------------------------------------------------------------------------------
# Value parsing


def parse_age(text: str, years_per_unit: float = 1.0) -> float:
    """Years as float; `89+` -> 89, `26,9` -> 26.9, `n/a` -> NaN. `years_per_unit` converts a table's unit
    (e.g. 1/12 for months, from its BIDS sidecar: `age_unit`). Raises ValueError."""
    t = text.strip().lower()
    if t in _MISSING:
        return math.nan
    m = _AGE.match(t)
    if m is None or (m.group(2) not in (None, "+") and years_per_unit != 1.0):
        raise ValueError(f"age {text.strip()!r} is not a number of {_unit_name(years_per_unit)}")
    age = float(m.group(1).replace(",", ".")) * years_per_unit
    if not 0 <= age <= 130:
        raise ValueError(f"age {text.strip()!r} is implausible"
                         + (f" in {_unit_name(years_per_unit)}" if years_per_unit != 1.0 else
                            " in years (ages in months, weeks or days: give the age column's unit in the BIDS "
                            'sidecar, e.g. participants.json {"age": {"Units": "months"}})' if age > 130 else ""))
    return age


# BIDS sidecars give a column's unit as "Units" (free text; the spec's example for age: "year"); CMIXF writes "a".
_AGE_UNITS = {
    1.0: ("year", "yr", "y", "a"),
    1 / 12: ("month", "mo", "mon"),
    7 / 365.25: ("week", "wk", "w"),
    1 / 365.25: ("day", "d"),
}


def _unit_name(years_per_unit: float) -> str:
    return _AGE_UNITS.get(years_per_unit, ("unit",))[0] + "s"


def _years_per_unit(unit: str) -> float | None:
    """1/12 for "months", "Months (at scan)", ...: the one unit family named in the text; None if none or several."""
    words = {w[:-1] if len(w) > 2 and w.endswith("s") else w for w in re.findall(r"[a-z]+", unit.lower())}
    found = {per_unit for per_unit, names in _AGE_UNITS.items() if words & set(names)}
    return found.pop() if len(found) == 1 else None


def _sidecar_entry(sidecar: Path, column: str) -> dict | None:
    """A BIDS JSON sidecar's description of `column` (keys in lower case; {} when it is not an object), None when
    the file or the column is not there. Invalid JSON raises `json.JSONDecodeError` (its `.doc` is the text)."""
    if not sidecar.is_file():
        return None
    meta = json.loads(sidecar.read_text(encoding="utf-8-sig", errors="replace"))
    meta = {str(k).lower(): v for k, v in meta.items()} if isinstance(meta, dict) else {}
    entry = meta.get(column.lower())
    if entry is None:
        return None
    return {str(k).lower(): v for k, v in entry.items()} if isinstance(entry, dict) else {}


def age_unit(table: Path, column: str, sidecars: Sequence[Path] = ()) -> float:
    """Years per unit of `table`'s age `column`, from its BIDS JSON sidecar (`table` with .json, else the first of
    `sidecars` that describes the column): its `{column: {"Units": ...}}`. 1.0 (years) when none states a unit."""
    for sidecar in (table.with_suffix(".json"), *sidecars):
        try:
            entry = _sidecar_entry(sidecar, column)
        except json.JSONDecodeError as e:
            if f'"{column.lower()}"' in e.doc.lower():  # it may state the age unit: do not guess
                raise CohortError(f"{sidecar}: not valid JSON ({e}), and it describes the age column {column!r}; "
                                  "fix it") from None
            warnings.warn(f"{sidecar}: not valid JSON ({e}); ignored", stacklevel=4)
            continue
        if entry is None:  # BIDS inheritance: a sidecar further up may describe the column
            continue
        unit = entry.get("units", entry.get("unit"))
        if unit is None or unit == "":
            return 1.0  # the nearest description of the column replaces those above it, unit included
        per_unit = _years_per_unit(str(unit))
        if per_unit is None:
            raise CohortError(f"{sidecar}: unit {unit!r} of the age column {column!r} is not understood; set its "
                              "\"Units\" to \"year\", \"month\", \"week\" or \"day\"")
        return per_unit
    return 1.0


def levels_coding(table: Path, column: str) -> dict[str, float] | None:
    """The sex coding a BIDS sidecar (`table` with .json) states in its `{column: {"Levels": {"1": "male", ...}}}`
    (BIDS: the keys are the column's values); None when it states none that names both sexes."""
    try:
        entry = _sidecar_entry(table.with_suffix(".json"), column)
    except json.JSONDecodeError:
        return None  # age_unit warns of invalid JSON
    levels = (entry or {}).get("levels")
    if not isinstance(levels, dict):
        return None
    coding = {}
    for value, meaning in levels.items():
        try:
            sex = parse_sex(str(meaning))
        except ValueError:
            continue  # "other", descriptions
        if not math.isnan(sex):
            coding[str(value).strip().lower()] = sex
    return coding if sorted(set(coding.values())) == [0.0, 1.0] else None


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
    _, header, rows, problems = _read_table(path)
    return header, rows, problems


def _read_table(path: Path) -> tuple[list[str], list[str], list[tuple[int, list[str]]], list[tuple[str, str]]]:
    """`read_table` plus the header as written (for messages)."""
    text = path.read_text(encoding="utf-8-sig")  # -sig: Excel writes a byte-order mark
    if not text.strip():
        raise CohortError(f"{path}: empty file")
    first = text.splitlines()[0]
    delimiter = _sniff_delimiter(first)
    if path.suffix.lower() == ".tsv":
        if "\t" in first or not any(d in first for d in ",;"):
            delimiter = "\t"
        else:  # a .tsv saved with commas (spreadsheets do): read it as written rather than as one column
            warnings.warn(f"{path}: no tabs in the header, so it is read as {delimiter!r}-separated (BIDS tables are "
                          "tab-separated: save it with tabs to silence this)", stacklevel=4)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    raw = [c.strip() for c in next(reader)]
    header = [_normalise_column(c) for c in raw]
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
    return raw, header, rows, problems


def _sniff_delimiter(first_line: str) -> str:
    counts = {d: first_line.count(d) for d in ("\t", ";", ",")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _normalise_column(name: str) -> str:
    return "_".join(name.strip().lower().split())


def _find_columns(header: list[str], raw: list[str], path: Path, named: Mapping[str, str]) -> dict[str, int]:
    """Column index of each field: the explicitly `named` columns, else the first accepted alias."""
    duplicates = {c for c in header if header.count(c) > 1}
    if duplicates:
        empty = " (empty header cells: delete the empty columns, e.g. trailing separators from a spreadsheet)"
        raise CohortError(f"{path}: duplicate column name(s) {sorted(duplicates)}{empty if '' in duplicates else ''}")
    found = {}
    for field, column in named.items():
        if _normalise_column(column) not in header:
            raise CohortError(f"{path}: no column {column!r} ({field}_column); the columns are "
                              f"{', '.join(repr(c) for c in raw)}")
        found[field] = header.index(_normalise_column(column))
    for field, aliases in _COLUMNS.items():
        if field in found:
            continue
        for alias in aliases:
            if alias in header and header.index(alias) not in found.values():
                found[field] = header.index(alias)
                break
    return found


def _check_coding_has_column(path: Path, raw: list[str], found: dict[str, int], coding: object) -> None:
    """A sex coding was given for a table whose sex column is not recognised: every sex would be missing."""
    if coding and "sex" not in found:
        raise CohortError(f"{path}: a sex coding was given, but no sex column is recognised (columns: "
                          f"{', '.join(repr(c) for c in raw)}); name it: read_cohort(..., sex_column=NAME), "
                          "`jaxtl prepare --sex-column NAME`")


def _warn_unrecognised(path: Path, raw: list[str], found: dict[str, int], fields: Sequence[str] = _LABELS) -> None:
    """Warn when label columns are missing while the table has columns jaxtl does not use."""
    missing = [f for f in fields if f not in found]
    unused = [c for i, c in enumerate(raw) if i not in found.values()]
    if not (missing and unused):
        return
    guesses = {f: next((c for c in unused if _LIKELY[f].search(c)), None) for f in missing}
    named = [(f, repr(g)) for f, g in guesses.items() if g] or [(missing[0], "NAME")]
    accepted = "; ".join(f"{f}: {', '.join(_COLUMNS[f])}" for f in missing)
    warnings.warn(
        f"{path}: no {'/'.join(missing)} column recognised, so {'these labels are' if len(missing) > 1 else 'it is'} "
        f"missing. Columns not used: {', '.join(repr(c) for c in unused)}. If one holds a label, name it, e.g. "
        f"read_cohort(..., {', '.join(f'{f}_column={n}' for f, n in named)}) or `jaxtl prepare "
        f"{' '.join(f'--{f}-column {n}' for f, n in named)}` (names understood: {accepted})",
        stacklevel=4,
    )


def _sex_reading(raw: Sequence[str], rows: Sequence[tuple[int, list[str]]], cols: Mapping[str, int],
                 coding: dict[str, float] | None) -> tuple[dict[str, float] | None, bool]:
    """How a table's sex column is read: (the stated coding, else one its name spells, else None; and, without a
    coding, whether the column is 1/2-coded, i.e. ambiguous)."""
    coding = coding or _declared_coding(raw, cols)
    return coding, coding is None and _one_two_coded(rows, cols)


def _one_two_coded(rows: Sequence[tuple[int, list[str]]], cols: Mapping[str, int]) -> bool:
    """Whether the sex column holds 2s: then it is a 1/2 coding (1=m, 2=f as IXI, or the reverse), and its 1s
    cannot be read as 0/1's male either."""
    i = cols.get("sex")
    return i is not None and any(i < len(cells) and cells[i].strip() in ("2", "2.0") for _, cells in rows)


def _check_coding(sex_coding: Mapping[str, str]) -> dict[str, float]:
    """`{"1": "M", "2": "F"}` -> `{"1": 1.0, "2": 0.0}` (values as `parse_sex` reads them; keys compared stripped,
    case-insensitively)."""
    out = {}
    for raw, meaning in sex_coding.items():
        try:
            value = parse_sex(str(meaning))
        except ValueError:
            value = math.nan
        if math.isnan(value):
            raise ValueError(f"sex_coding {str(raw)!r}: {meaning!r} is not F/M (female/male)")
        out[str(raw).strip().lower()] = value
    if sorted(set(out.values())) != [0.0, 1.0]:
        raise ValueError(f"sex_coding {dict(sex_coding)}: name a value for each sex, e.g. {{'1': 'M', '2': 'F'}}")
    return out


def parse_sex_coding(text: str) -> dict[str, str]:
    """`"1=M,2=F"` (the CLI's `--sex-coding`) -> `{"1": "M", "2": "F"}`."""
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    if not pairs or any(not sep or not key.strip() for key, sep, _ in pairs):
        raise ValueError(f"--sex-coding {text!r}: expected VALUE=F|M pairs, e.g. 1=M,2=F")
    return {key.strip(): value.strip() for key, _, value in pairs}


def _declared_coding(raw: Sequence[str], cols: Mapping[str, int]) -> dict[str, float] | None:
    """A coding spelled in the sex column's name, e.g. IXI's "SEX_ID (1=m, 2=f)"; None when there is none."""
    i = cols.get("sex")
    if i is None:
        return None
    pairs = re.findall(r"(\w+)\s*=\s*(female|male|[fm])\b", raw[i], flags=re.IGNORECASE)
    coding = {k.lower(): parse_sex(v) for k, v in pairs}
    return coding if sorted(coding.values()) == [0.0, 1.0] else None


def _row_sex(text: str, where: str, bad: list[tuple[str, str]], *, sex_required: bool, one_two: bool,
             coding: dict[str, float] | None = None) -> float:
    """A row's sex: NaN (recorded in `bad`) or an error (`sex_required`) when unparseable or 1/2-coded; with a
    `coding`, its values (missing markers give NaN; any other value is not understood)."""
    t = text.strip().lower()
    if coding:  # a stated coding: its values, or missing; anything else is not understood
        t = t[:-2] if t.endswith(".0") and t[:-2] in coding else t
        if t in coding:
            return coding[t]
        if t in _MISSING:
            return math.nan
        if sex_required:
            raise ValueError(f"sex {text.strip()!r} is not in the stated coding ({', '.join(sorted(coding))})")
        bad.append((where, text))
        return math.nan
    if one_two and text.strip() in ("0", "0.0", "1", "1.0", "2", "2.0"):  # in a 1/2 column 0 may mean unknown
        if sex_required:
            raise ValueError(f"sex {text.strip()!r}: the column codes sex as 1/2, which is ambiguous; state the "
                             "coding (sex_coding={'1': 'M', '2': 'F'}, `jaxtl prepare --sex-coding 1=M,2=F`) or "
                             "recode it as F/M")
        bad.append((where, text))
        return math.nan
    return parse_sex(text) if sex_required else _sex_or_nan(text, where, bad)


def _sex_or_nan(text: str, where: str, bad: list[tuple[str, str]]) -> float:
    """`parse_sex`, but an unparseable value is recorded in `bad` and becomes NaN."""
    try:
        return parse_sex(text)
    except ValueError:
        bad.append((where, text))
        return math.nan


def _warn_bad_sex(path: Path, bad: list[tuple[str, str]]) -> None:
    if not bad:
        return
    listing = ", ".join(f"{where} {value!r}" for where, value in bad[:10]) + (", ..." if len(bad) > 10 else "")
    hint = (" (a 1/2 coding is ambiguous, so its 1s are not read as male either: state it, e.g. "
            "sex_coding={'1': 'M', '2': 'F'}, `jaxtl prepare --sex-coding 1=M,2=F`)"
            if any(v.strip() in ("2", "2.0") for _, v in bad)
            else "")
    warnings.warn(
        f"{path}: {len(bad)} sex value(s) not understood, set to missing (NaN): {listing}{hint}. "
        f"Accepted: {_SEX_CODINGS}; other columns and labels are kept",
        stacklevel=4,
    )


def _is_path_list(path: Path) -> bool:
    """A `.txt` file whose first line is not a table header with a path column: one image path per line."""
    if path.suffix.lower() != ".txt":
        return False
    with open(path, encoding="utf-8-sig") as f:
        first = next((line.strip() for line in f if line.strip() and not line.startswith("#")), "")
    cells = [_normalise_column(c) for c in re.split(r"[\t;,]", first)]
    if any(c in _COLUMNS["path"] for c in cells):
        return False
    return first.lower().endswith(NIFTI_SUFFIXES) or len(cells) == 1  # else a table without a path column


def _read_path_list(path: Path) -> tuple[list[tuple[str, Scan]], list[tuple[str, str]]]:
    """One image path per line (no header; blank lines and `#` comments skipped), relative to the file."""
    lines = [(n, t.strip()) for n, t in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)]
    lines = [(n, t) for n, t in lines if t and not t.startswith("#")]
    if not lines:
        raise CohortError(f"{path}: no image paths (expected one path per line)")
    images = [_resolve(t, path.parent) for _, t in lines]
    ids = _ids_from_paths(images, path.parent)
    scans, problems = [], []
    for (n, text), image, scan_id in zip(lines, images, ids, strict=True):
        where = f"line {n}"
        if not image.is_file():
            problems.append((where, _not_found(image, text, path)))
        participant = _bids_entity(image, "sub") or scan_id
        scans.append((where, Scan(scan_id, participant, image, _bids_entity(image, "ses") or "")))
    problems += _duplicate_ids(scans)
    return scans, sorted(problems, key=_line_key)


def _is_image_folder(path: Path) -> bool:
    """A plain folder of images (e.g. `scans/*.nii.gz`, as brainageR takes them), not a BIDS dataset."""
    if (path / "dataset_description.json").exists() or any(p.is_dir() for p in path.glob("sub-*")):
        return False
    return any(p.name.lower().endswith(NIFTI_SUFFIXES) and not p.name.startswith(".") for p in path.iterdir())


def _read_image_folder(path: Path) -> tuple[list[tuple[str, Scan]], list[tuple[str, str]]]:
    """Every image directly in `path` (sorted; no labels; ids from the file names), as a `.txt` list of them."""
    images = sorted(p for p in path.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES)
                    and not p.name.startswith(".") and (p.is_file() or p.is_symlink()))
    ids = _ids_from_paths(images, path)
    scans = [(p.name, Scan(i, _bids_entity(p, "sub") or i, p, _bids_entity(p, "ses") or ""))
             for p, i in zip(images, ids, strict=True)]
    return scans, _duplicate_ids(scans)


def _read_table_cohort(
    path: Path, named: Mapping[str, str] | None = None, sex_required: bool = False,
    coding: dict[str, float] | None = None, label_problems: list[tuple[str, str]] | None = None,
) -> tuple[list[tuple[str, Scan]], list[tuple[str, str]]]:
    """Scans and problems; with `label_problems` (labels not required) an unreadable age is recorded there and
    left missing."""
    raw, header, rows, problems = _read_table(path)
    cols = _find_columns(header, raw, path, named or {})
    if "path" not in cols:
        hint = ("; a list of image paths without a header? save it as .txt, or add a first line 'path'"
                if len(raw) == 1 and raw[0].lower().endswith(NIFTI_SUFFIXES) else
                "; add one with the image paths, or name it (read_cohort(..., path_column=NAME), `jaxtl prepare "
                "--path-column NAME`, then use the cache)")
        raise CohortError(f"{path}: no 'path' column (columns: {', '.join(raw)}){hint}")
    _check_coding_has_column(path, raw, cols, coding)
    _warn_unrecognised(path, raw, cols)
    if coding is None and "sex" in cols:  # a BIDS-style sidecar (the table with .json) may state the coding
        coding = levels_coding(path, raw[cols["sex"]])
    root = path.parent
    paths = [_resolve(cells[cols["path"]], root) for _, cells in rows]
    fallback_ids = _ids_from_paths(paths, root)
    scans, bad_sex = [], []
    coding, one_two = _sex_reading(raw, rows, cols, coding)
    rows_of = collections.Counter(cells[cols["participant_id"]] for _, cells in rows) if "participant_id" in cols \
        else collections.Counter()
    unit = age_unit(path, raw[cols["age"]]) if "age" in cols else 1.0
    for (line, cells), image, fallback in zip(rows, paths, fallback_ids, strict=True):
        where = f"line {line}"
        row = {field: cells[i] for field, i in cols.items()}
        try:
            if not row["path"]:
                raise ValueError("empty path")
            age = _age_or_missing(row.get("age", ""), unit, where, label_problems)
            sex = _row_sex(row.get("sex", ""), where, bad_sex, sex_required=sex_required, one_two=one_two,
                           coding=coding)
        except ValueError as e:
            problems.append((where, str(e)))
            continue
        if not image.is_file():
            problems.append((where, _not_found(image, row["path"], path)))
        if row.get("participant_id"):
            participant = row["participant_id"]
            session = row.get("session") or ""
            if not session and rows_of[participant] > 1:  # several scans of one person: their BIDS sessions
                session = _bids_entity(image, "ses") or ""
            scan_id = f"{participant}_{session}" if session else participant
        else:  # ids from the file name (BIDS entities) or, when names collide, the relative path
            participant = _bids_entity(image, "sub") or fallback
            session = row.get("session") or _bids_entity(image, "ses") or ""
            scan_id = fallback
        scans.append((where, Scan(scan_id, participant, image, session, age, sex, row.get("site", ""))))
    _warn_bad_sex(path, bad_sex)
    problems += _duplicate_ids(_with_runs(scans))
    return scans, sorted(problems, key=_line_key)


def _age_or_missing(text: str, unit: float, where: str, label_problems: list[tuple[str, str]] | None,
                    prefix: str = "") -> float:
    """`parse_age`; with `label_problems` (labels not required) an unreadable age is recorded there, NaN."""
    try:
        return parse_age(text, unit)
    except ValueError as e:
        if label_problems is None:
            raise
        label_problems.append((where, f"{prefix}{e}"))
        return math.nan


def _not_found(image: Path, text: str, table: Path) -> str:
    if image.is_symlink():
        return f"{FILE_NOT_FOUND}: {image} is a broken link (a DataLad/git-annex file not fetched? `datalad get`)"
    relative = not Path(text).expanduser().is_absolute()
    return f"{FILE_NOT_FOUND}: {image}" + (f" (relative paths are read from {table.name}'s folder)" * relative)


def _resolve(text: str, root: Path) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else root / p


def _with_runs(scans: list[tuple[str, Scan]]) -> list[tuple[str, Scan]]:
    """Scans sharing an id whose files are different BIDS runs (`_run-1`, `_run-2`) get the run in their id
    (`sub-02_ses-01_run-1`), in place."""
    by_id = collections.defaultdict(list)
    for k, (_, scan) in enumerate(scans):
        by_id[scan.id].append(k)
    for ks in by_id.values():
        runs = [_bids_entity(scans[k][1].path, "run") for k in ks]
        if len(ks) > 1 and None not in runs and len(set(runs)) == len(runs):
            for k, run in zip(ks, runs, strict=True):
                where, scan = scans[k]
                scans[k] = (where, dataclasses.replace(scan, id=f"{scan.id}_{run}"))
    return scans


def _duplicate_ids(scans: list[tuple[str, Scan]]) -> list[tuple[str, str]]:
    first: dict[str, tuple[str, Scan]] = {}
    problems = []
    for where, scan in scans:
        if scan.id not in first:
            first[scan.id] = (where, scan)
            continue
        where0, scan0 = first[scan.id]
        if _strip_suffix(str(scan0.path)) == _strip_suffix(str(scan.path)):
            hint = f": the same scan as {scan0.path.name} in another file format; list one of them"
        elif not scan.session:
            hint = ": another scan of the same participant? give the table a 'session' column"
        else:
            hint = ""
        problems.append((where, f"duplicate id {scan.id!r} (first at {where0}){hint}"))
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


def _read_bids(
    root: Path, named: Mapping[str, str] | None = None, bids_filter: dict[str, str | None] | None = None,
    sex_required: bool = False, coding: dict[str, float] | None = None,
    label_problems: list[tuple[str, str]] | None = None,
) -> tuple[list[tuple[str, Scan]], list[tuple[str, str]]]:
    images = sorted(
        p
        for pattern in ("sub-*/anat/*_T1w.nii*", "sub-*/ses-*/anat/*_T1w.nii*")
        for p in root.glob(pattern)
        # not hidden files (macOS `._` copies); broken links are scans whose content is not fetched (DataLad)
        if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".") and (p.is_file() or p.is_symlink())
    )
    if not images:
        raise CohortError(
            f"{root}: not a BIDS dataset (no sub-*/[ses-*/]anat/*_T1w.nii[.gz]); "
            "pass a BIDS directory, a folder of .nii/.nii.gz/.mgz images, a CSV/TSV with a 'path' column "
            "or a .txt list of image paths"
        )
    images = _select_t1w(root, images, bids_filter or {})
    labels, bad_subjects, problems = _participants(root, named or {}, sex_required, coding, label_problems)
    session_ages = {}
    for subject in sorted({p.relative_to(root).parts[0] for p in images}):
        ages, session_problems = _session_ages(_labels_file(root, f"{subject}/{subject}_sessions.tsv"),
                                               (named or {}).get("age"))
        session_ages[subject] = ages
        if label_problems is None:
            problems += session_problems
        else:  # that session's age falls back to participants.tsv's
            label_problems += [(w, f"{m} (the participants.tsv age is used)") for w, m in session_problems]
    scans, unlabelled = [], []
    labelled = {subject for subject, _ in labels}
    rows_of = collections.defaultdict(list)  # subject -> its participants.tsv keys, good rows and bad
    for key in (*labels, *bad_subjects):
        rows_of[key[0]].append(key)
    no_row = []  # scans of subjects with per-session rows, none of them for the scan's session
    own_row = set()
    for image in images:
        subject = image.relative_to(root).parts[0]
        session = _bids_entity(image, "ses") or ""
        key = _row_key(rows_of[subject], session)
        if not rows_of[subject]:
            unlabelled.append(subject)
        elif key is None:
            no_row.append(f"{subject} {session}")
        age, sex, site = labels.get(key, (math.nan, math.nan, ""))
        age = session_ages[subject].get(_bare_session(session), age) if session else age
        scan_id = re.sub(r"_T1w$", "", _strip_suffix(image.name))
        if key is not None and key[1] and _bare_session(key[1]) == _bare_session(session):
            own_row.add(scan_id)  # labelled by its own session's row
        # a subject whose participants.tsv row is bad shares that row's fate (reported or skipped)
        where = bad_subjects.get(key, str(image.relative_to(root)))
        scans.append((where, Scan(scan_id, subject, image, session, age, sex, site)))
    if no_row:
        warnings.warn(f"{root}: {len(no_row)} scan(s) whose session has no row in participants.tsv (e.g. "
                      f"{no_row[0]}), though their subject has rows for other sessions; their labels are missing",
                      stacklevel=3)
    problems += _duplicate_ids(scans)
    if labels and unlabelled:
        unpadded = {s.removeprefix("sub-").lstrip("0"): s for s in labelled}
        near = next((f"; {u} and {unpadded[key]} may be the same subject (zero padding)" for u in unlabelled
                     if (key := u.removeprefix("sub-").lstrip("0")) in unpadded), "")
        warnings.warn(
            f"{root}: {len(set(unlabelled))} subject(s) with images but no row in participants.tsv "
            f"(e.g. {unlabelled[0]}); their labels are missing{near}",
            stacklevel=3,
        )
    sessions_of = collections.defaultdict(set)
    for _, s in scans:
        sessions_of[s.participant_id].add(s.session)
    shared = sorted({s.participant_id for _, s in scans if len(sessions_of[s.participant_id]) > 1 and s.session
                     and _bare_session(s.session) not in session_ages[s.participant_id] and math.isfinite(s.age)
                     and s.id not in own_row})
    if shared:
        warnings.warn(
            f"{root}: {len(shared)} subject(s) with several sessions take one age from participants.tsv for all of "
            f"them (e.g. {shared[0]}); give each session's age in sub-XX/sub-XX_sessions.tsv (columns session_id, "
            f"age), or brain-age gaps of follow-up scans are off by the years between sessions",
            stacklevel=3,
        )
    without_images = sorted(labelled - {p.relative_to(root).parts[0] for p in images})
    if without_images:
        warnings.warn(
            f"{root}: {len(without_images)} participant(s) in participants.tsv without a T1w image"
            f"{' matching bids_filter' if bids_filter else ''} (e.g. {without_images[0]}); they are not in the cohort",
            stacklevel=3,
        )
    return scans, problems


def _bare_session(session: str) -> str:
    """"ses-01" -> "1": session labels compared without the prefix and zero padding."""
    s = session.removeprefix("ses-")
    return s.lstrip("0") or ("0" if s else "")


def _row_key(keys: Sequence[tuple[str, str]], session: str) -> tuple[str, str] | None:
    """Which of a subject's participants.tsv rows (`keys`: (subject, session), session "" for a row of the whole
    subject) labels its scan of `session`: that session's (also "1" for "ses-01"), else the subject's, else its only
    row (e.g. a per-subject table with a `visit` column), else None."""
    return (next((k for k in keys if k[1] == session), None)
            or next((k for k in keys if k[1] and session and _bare_session(k[1]) == _bare_session(session)), None)
            or next((k for k in keys if not k[1]), None)
            or (keys[0] if len(keys) == 1 else None))


def _entities(path: Path) -> dict[str, str]:
    """BIDS entities of a file name, e.g. {"sub": "01", "space": "MNI152Lin", "res": "2"}."""
    parts = re.sub(r"_T1w$", "", _strip_suffix(path.name)).split("_")
    return dict(p.split("-", 1) for p in parts if re.fullmatch(r"[A-Za-z0-9]+-[A-Za-z0-9+]+", p))


def _select_t1w(root: Path, images: list[Path], bids_filter: dict[str, str | None]) -> list[Path]:
    """Apply `bids_filter`; refuse subjects/sessions left with several T1w images (e.g. fMRIPrep outputs)."""
    def keep(image: Path) -> bool:
        ents = _entities(image)
        return all(want == "*" or ents.get(key) == (want or None) for key, want in bids_filter.items())

    selected = [p for p in images if keep(p)]
    if not selected:
        raise CohortError(f"{root}: no T1w image matches bids_filter {bids_filter}; the images have "
                          f"{_format_entities(_entity_values(images))}")
    # runs are repeated acquisitions of the same image: each is its own scan unless the filter names `run`
    wildcards = sorted({k for k, v in bids_filter.items() if v == "*"} | ({"run"} - set(bids_filter)))
    groups: dict[tuple, list[Path]] = {}
    for image in selected:
        ents = _entities(image)
        key = (image.relative_to(root).parts[0], ents.get("ses", ""), *(ents.get(k) for k in wildcards))
        groups.setdefault(key, []).append(image)
    several = [g for g in groups.values() if len(g) > 1]
    same = [g for g in several if len({tuple(sorted(_entities(p).items())) for p in g}) == 1]
    several = [g for g in several if g not in same]
    problems = []
    if same:  # nothing to choose by: one scan stored twice
        listing = "".join(f"\n  {', '.join(str(p.relative_to(root)) for p in g)}" for g in same[:5])
        listing += f"\n  and {len(same) - 5} more" if len(same) > 5 else ""
        problems.append(f"{len(same)} scan(s) stored twice with the same BIDS entities (e.g. .nii and .nii.gz): "
                        f"remove one file of each:{listing}")
    if several:
        example = several[0]
        varying = _entity_values(example)
        keys = [k for k in varying if k != "ses"] or ["space"]
        as_dict = ", ".join(f"{k!r}: VALUE" for k in keys)
        as_flags = " ".join(f"--bids-filter {k}=VALUE" for k in keys)
        problems.append(
            f"{len(several)} subject/session(s) have several T1w images, e.g. "
            f"{', '.join(p.name for p in example)} (they differ in {_format_entities(varying)}). jaxtl takes one "
            f"brain-extracted T1w image linearly registered to MNI152 1mm per scan; choose it by BIDS entities: "
            f"read_cohort(..., bids_filter={{{as_dict}}}) or `{as_flags}` on jaxtl prepare, transfer, predict, "
            f"embed (ENTITY= selects images "
            f"without that entity, ENTITY=* keeps every value as a separate scan, as runs are by default). "
            f"Standard-space outputs of fMRIPrep and similar pipelines are non-linearly normalised and often "
            f"resampled; the paper's models saw linear registrations. Listed: "
            + "; ".join(", ".join(str(p.relative_to(root)) for p in g) for g in several[:5])
            + (f"; and {len(several) - 5} more" if len(several) > 5 else "")
        )
    if problems:
        raise CohortError(f"{root}: " + "\n".join(problems))
    # fMRIPrep's standard-space T1w outputs (space-MNI152NLin2009cAsym, -NLin6Asym, ...) are non-linearly normalised.
    # The space label names the template only (NLin6Asym is also FSL's MNI152_T1_1mm, which linear registrations
    # target), so only a dataset that fMRIPrep generated is warned about.
    nonlinear = [p for p in selected if "NLin" in (_entities(p).get("space") or "")]
    if nonlinear and "fmriprep" in _generated_by(root):
        warnings.warn(f"{root}: {len(nonlinear)} of {len(selected)} T1w image(s) are fMRIPrep's standard-space outputs "
                      f"(e.g. {nonlinear[0].name}), non-linearly normalised: the paper's models saw brain-extracted "
                      "images linearly (12-dof) registered to MNI152 1mm, so features and predictions of non-linearly "
                      "warped brains are off by an unknown amount; register the brain-extracted T1w linearly (e.g. "
                      "flirt -dof 12 to MNI152_T1_1mm_brain) where you can", stacklevel=4)
    return selected


def _generated_by(root: Path) -> str:
    """The pipeline names in a BIDS derivatives folder's dataset_description.json (GeneratedBy, or the older
    PipelineDescription), lower-cased and joined; "" when there is none or it cannot be read."""
    try:
        desc = json.loads((root / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(desc, dict):
        return ""
    entries = desc.get("GeneratedBy") or [desc.get("PipelineDescription") or {}]
    if not isinstance(entries, list):
        return ""
    return " ".join(str(e.get("Name", "")) for e in entries if isinstance(e, dict)).lower()


def _entity_values(images: Sequence[Path]) -> dict[str, list[str]]:
    """The entities whose values differ between `images` (all if none differ), with their values."""
    ents = [_entities(p) for p in images]
    keys = sorted({k for e in ents for k in e} - {"sub"})
    values = {k: sorted({e.get(k) or "<none>" for e in ents}) for k in keys}
    return {k: v for k, v in values.items() if len(v) > 1} or values


def _format_entities(values: dict[str, list[str]]) -> str:
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in values.items()) or "no entities besides sub"


def _labels_file(root: Path, name: str) -> Path | None:
    """`root/name`, else (a derivatives pipeline folder: labels live in the raw dataset) `raw/name`."""
    candidates = [root / name]
    resolved = root.resolve()  # "." has no parent name
    if resolved.parent.name == "derivatives":
        candidates.append(resolved.parent.parent / name)
    return next((c for c in candidates if c.is_file()), None)


def _participants_file(root: Path) -> Path | None:
    return _labels_file(root, "participants.tsv")


def _participants(
    root: Path, named: Mapping[str, str] | None = None, sex_required: bool = False,
    coding: dict[str, float] | None = None, label_problems: list[tuple[str, str]] | None = None,
) -> tuple[dict[str, tuple[float, float, str]], dict[str, str], list[tuple[str, str]]]:
    """Labels by (participant_id, session), the bad rows' locations by the same keys, and the problems. The
    session is "" unless participants.tsv has a session column (one row per session, not BIDS but common).
    With `label_problems` (labels not required), a row's unreadable labels and a subject given twice are recorded
    there and its labels left missing, instead of a bad row."""
    path = _participants_file(root)
    if path is None:
        warnings.warn(f"{root}: no participants.tsv; ages and sexes are missing", stacklevel=4)
        return {}, {}, []
    raw, header, rows, problems = _read_table(path)
    problems = [(f"{path.name} {where}", msg) for where, msg in problems]
    cols = _find_columns(header, raw, path, {k: v for k, v in (named or {}).items() if k != "path"})
    if "participant_id" not in cols:
        raise CohortError(f"{path}: no participant_id column (columns: {', '.join(raw)}); "
                          "name it with id_column= (jaxtl prepare --id-column NAME)")
    _check_coding_has_column(path, raw, cols, coding)
    _warn_unrecognised(path, raw, cols)
    labels: dict[tuple[str, str], tuple[float, float, str]] = {}
    bad: dict[tuple[str, str], str] = {}
    first: dict[tuple[str, str], int] = {}
    bad_sex: list[tuple[str, str]] = []
    if coding is None and "sex" in cols:  # BIDS: participants.json may state the coding ({"1": "male", ...})
        coding = levels_coding(path, raw[cols["sex"]])
    coding, one_two = _sex_reading(raw, rows, cols, coding)
    unit = age_unit(path, raw[cols["age"]]) if "age" in cols else 1.0
    for line, cells in rows:
        where = f"{path.name} line {line}"
        row = {field: cells[i] for field, i in cols.items()}
        subject = row["participant_id"]
        if not subject:
            problems.append((where, "empty participant_id"))
            continue
        subject = subject if subject.startswith("sub-") else f"sub-{subject}"
        session = "" if row.get("session", "").strip().lower() in _MISSING else row["session"].strip()
        key = (subject, session if not session or session.startswith("ses-") else f"ses-{session}")
        if key in first:
            hint = ("" if "session" in cols else "; one row per session? add a session_id column, or give each "
                    "session's age in sub-XX/sub-XX_sessions.tsv")
            problem = (where, f"duplicate participant_id {subject!r}{' ' + key[1] if key[1] else ''} (first at "
                              f"line {first[key]}){hint}")
            if label_problems is None:
                problems.append(problem)
                bad.setdefault(key, where)
            else:  # which row is right is unknown: no labels
                label_problems.append(problem)
                labels[key] = (math.nan, math.nan, "")
            continue
        first[key] = line
        try:
            age = _age_or_missing(row.get("age", ""), unit, where, label_problems, prefix=f"{subject}: ")
            sex = _row_sex(row.get("sex", ""), f"line {line}", bad_sex, sex_required=sex_required, one_two=one_two,
                           coding=coding)
            labels[key] = (age, sex, row.get("site", ""))
        except ValueError as e:
            if label_problems is None:
                problems.append((where, f"{subject}: {e}"))
                bad[key] = where
            else:
                label_problems.append((where, f"{subject}: {e}"))
                labels[key] = (math.nan, math.nan, row.get("site", ""))
    _warn_bad_sex(path, bad_sex)
    return labels, bad, problems


def _session_ages(path: Path | None, age_column: str | None = None) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Per-session ages from `sub-X/sub-X_sessions.tsv` (BIDS longitudinal), if present, keyed by `_bare_session`
    ("ses-01", "01" and "1" are one session); the age column by `age_column` or the usual aliases."""
    if path is None:
        return {}, []
    raw, header, rows, problems = _read_table(path)
    problems = [(f"{path.name} {where}", msg) for where, msg in problems]
    session = next((header.index(c) for c in ("session_id", "session", "ses") if c in header), None)
    ages_at = ([_normalise_column(age_column)] if age_column else []) + list(_COLUMNS["age"])
    age = next((header.index(c) for c in ages_at if c in header), None)
    if session is None or age is None:
        return {}, problems
    unit = age_unit(path, raw[age], [path.parent.parent / "sessions.json"])  # sub-X/sub-X_sessions.tsv, dataset level
    ages = {}
    for line, cells in rows:
        try:
            value = parse_age(cells[age], unit)
        except ValueError as e:
            problems.append((f"{path.name} line {line}", str(e)))
            continue
        sid = cells[session]
        if not math.isnan(value) and sid:
            ages[_bare_session(sid)] = value
    return ages, problems
