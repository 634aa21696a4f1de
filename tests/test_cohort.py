"""Cohorts from CSV/TSV tables and BIDS datasets: defensive parsing and error reporting."""

import math
import pickle

import numpy as np
import pytest

from jaxtl.cohort import Cohort, CohortError, parse_age, parse_sex, read_cohort


def _touch(root, *names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # cohort reading never opens the images


@pytest.mark.parametrize(
    "text, age",
    [("45", 45.0), (" 45.5 ", 45.5), ("26,9", 26.9), ("89+", 89.0), ("90 +", 90.0), ("63y", 63.0),
     ("n/a", math.nan), ("NA", math.nan), ("", math.nan), ("  ", math.nan), ("nan", math.nan)],
)
def test_parse_age(text, age):
    assert parse_age(text) == age or (math.isnan(age) and math.isnan(parse_age(text)))


@pytest.mark.parametrize("text", ["forty", "-3", "450", "1.2.3", "45 months"])
def test_parse_age_rejects(text):
    with pytest.raises(ValueError, match="age"):
        parse_age(text)


@pytest.mark.parametrize(
    "text, sex",
    [("F", 0.0), ("f", 0.0), ("female", 0.0), (" Female ", 0.0), ("0", 0.0), ("0.0", 0.0),
     ("M", 1.0), ("male", 1.0), ("MALE", 1.0), ("1", 1.0), ("n/a", math.nan), ("other", math.nan), ("", math.nan)],
)
def test_parse_sex(text, sex):
    got = parse_sex(text)
    assert got == sex or (math.isnan(sex) and math.isnan(got))


def test_parse_sex_rejects_ambiguous_codes():
    with pytest.raises(ValueError, match="ambiguous"):
        parse_sex("2")
    with pytest.raises(ValueError, match="not understood"):
        parse_sex("yes")


def test_csv_with_all_columns_and_messy_values(tmp_path):
    _touch(tmp_path, "img/a.nii.gz", "img/b.nii.gz", "img/c.nii", "img/d.mgz")
    (tmp_path / "cohort.csv").write_text(
        "\ufeffParticipant_ID, Session ,Path,AGE,Sex,site\r\n"  # BOM, odd case, spaces, CRLF
        "s01,1,img/a.nii.gz, 45 ,F,A\r\n"
        's02,,img/b.nii.gz,"26,9", male ,B\r\n'
        "s03,2,img/c.nii,89+,n/a,\r\n"
        "\r\n"
        f"s04,,{tmp_path}/img/d.mgz,n/a,0,A\r\n"
    )
    cohort = read_cohort(tmp_path / "cohort.csv")
    assert len(cohort) == 4
    assert cohort.ids.tolist() == ["s01_1", "s02", "s03_2", "s04"]
    assert cohort.participant_ids.tolist() == ["s01", "s02", "s03", "s04"]
    assert cohort.sessions.tolist() == ["1", "", "2", ""]
    np.testing.assert_array_equal(cohort.ages, [45.0, 26.9, 89.0, np.nan])
    np.testing.assert_array_equal(cohort.sexes, [0.0, 1.0, np.nan, 0.0])
    assert cohort.sites.tolist() == ["A", "B", "", "A"]
    assert cohort.paths.tolist()[0] == str(tmp_path / "img/a.nii.gz")
    assert [s.id for s in cohort] == cohort.ids.tolist()
    assert cohort[1].age == 26.9


def test_semicolon_csv_with_decimal_commas_and_tsv(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "c.csv").write_text("path;age;sex\na.nii.gz;71,5;M\nb.nii.gz;80,25;F\n")
    np.testing.assert_array_equal(read_cohort(tmp_path / "c.csv").ages, [71.5, 80.25])
    (tmp_path / "c.tsv").write_text("participant_id\tpath\tage\tsex\nx\ta.nii.gz\t33,3\tf\n")
    cohort = read_cohort(tmp_path / "c.tsv")
    assert cohort.ids.tolist() == ["x"] and cohort.ages.tolist() == [33.3]


def test_ids_from_file_names_and_from_paths_when_names_collide(tmp_path):
    _touch(tmp_path, "sub-01_ses-a_T1w.nii.gz", "sub-02_T1w.nii.gz")
    (tmp_path / "c.csv").write_text("path\nsub-01_ses-a_T1w.nii.gz\nsub-02_T1w.nii.gz\n")
    cohort = read_cohort(tmp_path / "c.csv")
    assert cohort.ids.tolist() == ["sub-01_ses-a", "sub-02"]
    assert cohort.participant_ids.tolist() == ["sub-01", "sub-02"]
    assert cohort.sessions.tolist() == ["ses-a", ""]
    # UK Biobank layout: every file has the same name
    _touch(tmp_path, "1000001/T1/T1_brain_to_MNI.nii.gz", "1000002/T1/T1_brain_to_MNI.nii.gz")
    (tmp_path / "ukb.csv").write_text("path,age\n1000001/T1/T1_brain_to_MNI.nii.gz,60\n"
                                      "1000002/T1/T1_brain_to_MNI.nii.gz,61\n")
    assert read_cohort(tmp_path / "ukb.csv").ids.tolist() == ["1000001/T1/T1_brain_to_MNI",
                                                              "1000002/T1/T1_brain_to_MNI"]


def test_all_problems_reported_together_with_their_lines(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz", "c.nii.gz")
    (tmp_path / "c.csv").write_text(
        "participant_id,path,age,sex\n"
        "s1,a.nii.gz,50,F\n"  # line 2: fine
        "s2,missing.nii.gz,50,F\n"  # line 3: missing file
        "s1,b.nii.gz,51,M\n"  # line 4: duplicate id
        "s4,c.nii.gz,fifty,F\n"  # line 5: bad age
        "s5,c.nii.gz,50,2\n"  # line 6: ambiguous sex
        "s6,c.nii.gz,45,5,F\n"  # line 7: unquoted decimal comma
    )
    with pytest.raises(CohortError) as info:
        read_cohort(tmp_path / "c.csv")
    message = str(info.value)
    assert "c.csv: 5 problems" in message
    for fragment in ["line 3: file not found", "line 4: duplicate id 's1' (first at line 2)", "line 5: age 'fifty'",
                     "line 6: sex '2'", "line 7: 5 fields, header has 4 (unquoted decimal comma?)"]:
        assert fragment in message, fragment
    assert "line 2" not in message.replace("first at line 2", "")


def test_skip_mode_drops_bad_rows_with_a_warning(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "c.csv").write_text("participant_id,path,age\ns1,a.nii.gz,50\ns2,nope.nii.gz,50\ns3,b.nii.gz,old\n")
    with pytest.warns(UserWarning, match="skipping 2 row"):
        cohort = read_cohort(tmp_path / "c.csv", on_error="skip")
    assert cohort.ids.tolist() == ["s1"]


def test_table_without_path_column_or_rows(tmp_path):
    (tmp_path / "c.csv").write_text("subject,age\ns1,40\n")
    with pytest.raises(CohortError, match="no 'path' column"):
        read_cohort(tmp_path / "c.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(CohortError, match="empty file"):
        read_cohort(tmp_path / "e.csv")
    with pytest.raises(CohortError, match="no such file"):
        read_cohort(tmp_path / "absent.csv")


def _bids(root):
    _touch(
        root,
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
        "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz",
        "sub-02/ses-2/anat/sub-02_ses-2_run-2_T1w.nii",
        "sub-03/anat/sub-03_T2w.nii.gz",  # not a T1w: ignored
        "derivatives/fmriprep/sub-01/anat/sub-01_space-MNI152NLin6Asym_desc-brain_T1w.nii.gz",
    )
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\tsite\n"
        "sub-01\t89+\tF\tX\n"
        "02\t 30,5 \tM\tY\n"  # no sub- prefix, decimal comma, stray spaces
        "sub-04\t50\tF\tX\n"  # no images
    )
    (root / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage\nses-1\t30.5\nses-2\t32\n")


def test_bids_dataset(tmp_path):
    _bids(tmp_path)
    with pytest.warns(UserWarning, match="1 participant.*without a T1w image"):
        cohort = read_cohort(tmp_path)
    assert cohort.ids.tolist() == ["sub-01", "sub-02_ses-1", "sub-02_ses-2", "sub-02_ses-2_run-2"]
    assert cohort.participant_ids.tolist() == ["sub-01", "sub-02", "sub-02", "sub-02"]
    assert cohort.sessions.tolist() == ["", "ses-1", "ses-2", "ses-2"]
    np.testing.assert_array_equal(cohort.ages, [89.0, 30.5, 32.0, 32.0])  # per-session ages from sessions.tsv
    np.testing.assert_array_equal(cohort.sexes, [0, 1, 1, 1])
    assert cohort.sites.tolist() == ["X", "Y", "Y", "Y"]


def test_bids_derivatives_folder_takes_labels_from_the_raw_dataset(tmp_path):
    _bids(tmp_path)
    with pytest.warns(UserWarning):
        cohort = read_cohort(tmp_path / "derivatives" / "fmriprep")
    assert cohort.ids.tolist() == ["sub-01_space-MNI152NLin6Asym_desc-brain"]
    assert cohort.ages.tolist() == [89.0]


@pytest.mark.filterwarnings("ignore:.*without a T1w image")
def test_bids_problems_name_participants_tsv_lines(tmp_path):
    _bids(tmp_path)
    with open(tmp_path / "participants.tsv", "a") as f:
        f.write("sub-04\t51\tM\tX\n")  # line 5: duplicate
    (tmp_path / "participants.tsv").write_text(
        (tmp_path / "participants.tsv").read_text().replace("02\t 30,5 \tM", "02\t 30,5 \tQ")
    )
    with pytest.raises(CohortError) as info:
        read_cohort(tmp_path)
    message = str(info.value)
    assert "participants.tsv line 3: sub-02: sex 'Q' not understood" in message
    assert "participants.tsv line 5: duplicate participant_id 'sub-04' (first at line 4)" in message
    with pytest.warns(UserWarning, match="skipping 2 row"):
        cohort = read_cohort(tmp_path, on_error="skip")
    assert cohort.ids.tolist() == ["sub-01"]  # all scans of sub-02, whose row is bad, are dropped


def test_bids_without_participants_and_non_bids_directory(tmp_path):
    _touch(tmp_path / "ds", "sub-9/anat/sub-9_T1w.nii.gz")
    with pytest.warns(UserWarning, match="no participants.tsv"):
        cohort = read_cohort(tmp_path / "ds")
    assert cohort.ids.tolist() == ["sub-9"] and np.isnan(cohort.ages).all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CohortError, match="not a BIDS dataset"):
        read_cohort(tmp_path / "empty")


def test_cohort_object(tmp_path):
    _touch(tmp_path, "sub-1_T1w.nii.gz", "sub-2_T1w.nii.gz", "sub-3_T1w.nii.gz")
    cohort = Cohort.from_paths([tmp_path / f"sub-{i}_T1w.nii.gz" for i in (1, 2, 3)])
    assert len(cohort) == 3 and cohort.ids.tolist() == ["sub-1", "sub-2", "sub-3"]
    assert np.isnan(cohort.ages).all()
    assert cohort.select([2, 0]).ids.tolist() == ["sub-3", "sub-1"]
    assert cohort.select(np.array([True, False, True])).ids.tolist() == ["sub-1", "sub-3"]
    copy = pickle.loads(pickle.dumps(cohort))
    assert copy.ids.tolist() == cohort.ids.tolist() and copy.paths.tolist() == cohort.paths.tolist()
