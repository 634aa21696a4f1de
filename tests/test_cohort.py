"""Cohorts from CSV/TSV tables and BIDS datasets: defensive parsing and error reporting."""

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxtl import cli
from jaxtl.cache import read_index
from jaxtl.cohort import (
    Cohort,
    CohortError,
    label_columns_hint,
    parse_age,
    parse_bids_filter,
    parse_sex,
    parse_sex_coding,
    read_cohort,
)


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
    # a .tsv saved with commas (a spreadsheet export) is read as written, with a warning
    (tmp_path / "comma.tsv").write_text("path,age,sex\na.nii.gz,71.5,M\n")
    with pytest.warns(UserWarning, match="comma.tsv: no tabs in the header, so it is read as ','-separated"):
        assert read_cohort(tmp_path / "comma.tsv").ages.tolist() == [71.5]
    _touch(tmp_path, "bids/sub-01/anat/sub-01_T1w.nii.gz")
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id,age,sex\nsub-01,40,F\n")
    with pytest.warns(UserWarning, match="participants.tsv: no tabs"):
        assert read_cohort(tmp_path / "bids").ages.tolist() == [40.0]


def test_ids_from_file_names_and_from_paths_when_names_collide(tmp_path):
    _touch(tmp_path, "sub-01_ses-a_T1w.nii.gz", "sub-02_T1w.nii.gz")
    (tmp_path / "c.csv").write_text("path\nsub-01_ses-a_T1w.nii.gz\nsub-02_T1w.nii.gz\n")
    cohort = read_cohort(tmp_path / "c.csv")
    assert cohort.ids.tolist() == ["sub-01_ses-a", "sub-02"]
    assert cohort.participant_ids.tolist() == ["sub-01", "sub-02"]
    assert cohort.sessions.tolist() == ["ses-a", ""]
    # UK Biobank layout: every file has the same name
    _touch(tmp_path, "1000001/T1/T1_brain_to_MNI_linear.nii.gz", "1000002/T1/T1_brain_to_MNI_linear.nii.gz")
    (tmp_path / "ukb.csv").write_text("path,age\n1000001/T1/T1_brain_to_MNI_linear.nii.gz,60\n"
                                      "1000002/T1/T1_brain_to_MNI_linear.nii.gz,61\n")
    assert read_cohort(tmp_path / "ukb.csv").ids.tolist() == ["1000001/T1/T1_brain_to_MNI_linear",
                                                              "1000002/T1/T1_brain_to_MNI_linear"]


def test_all_problems_reported_together_with_their_lines(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz", "c.nii.gz")
    (tmp_path / "c.csv").write_text(
        "participant_id,path,age,sex\n"
        "s1,a.nii.gz,50,F\n"  # line 2: fine
        "s2,missing.nii.gz,50,F\n"  # line 3: missing file
        "s1,b.nii.gz,51,M\n"  # line 4: duplicate id
        "s4,c.nii.gz,fifty,F\n"  # line 5: bad age
        "s5,c.nii.gz,50,2\n"  # line 6: ambiguous sex (an error only where sex is required)
        "s6,c.nii.gz,45,5,F\n"  # line 7: unquoted decimal comma
    )
    with pytest.raises(CohortError) as info:
        read_cohort(tmp_path / "c.csv", sex_required=True)
    message = str(info.value)
    assert "c.csv: 5 problems" in message
    for fragment in ["line 3: file not found", "line 4: duplicate id 's1' (first at line 2)", "line 5: age 'fifty'",
                     "line 6: sex '2'", "line 7: 5 fields, header has 4 (unquoted decimal comma?)"]:
        assert fragment in message, fragment
    assert "line 2" not in message.replace("first at line 2", "")
    with pytest.warns(UserWarning, match="sex value"), pytest.raises(CohortError, match="c.csv: 4 problems"):
        read_cohort(tmp_path / "c.csv")


def test_common_table_mistakes_are_named_with_the_fix(tmp_path):
    """What spreadsheets and longitudinal tables get wrong: each message says what happened and what to do."""
    _touch(tmp_path, "imgs/a.nii.gz", "imgs/a.nii", "imgs/b.nii.gz", "imgs/c.nii.gz")
    (tmp_path / "t.csv").write_text("participant_id,path,age\n"
                                    "P01,imgs/a.nii.gz,50\n"
                                    "P01,imgs/b.nii.gz,52\n"  # a follow-up scan, but no session column
                                    "P03,img/c.nii.gz,60\n")  # a typo in a relative path
    message = str(pytest.raises(CohortError, read_cohort, tmp_path / "t.csv").value)
    assert ("line 3: duplicate id 'P01' (first at line 2): another scan of the same participant? give the table a "
            "'session' column") in message
    assert f"line 4: file not found: {tmp_path / 'img/c.nii.gz'} (relative paths are read from t.csv's folder)" \
        in message
    (tmp_path / "t.txt").write_text("imgs/a.nii.gz\nimgs/a.nii\n")  # one scan in two formats
    assert "the same scan as a.nii.gz in another file format; list one of them" in \
        str(pytest.raises(CohortError, read_cohort, tmp_path / "t.txt").value)
    (tmp_path / "e.csv").write_text("path,age,,\nimgs/a.nii.gz,50,,\n")  # trailing separators
    with pytest.raises(CohortError, match=r"duplicate column name\(s\) \[''\] \(empty header cells: delete"):
        read_cohort(tmp_path / "e.csv")


def test_bids_warns_of_one_age_for_several_sessions_and_of_zero_padding(tmp_path):
    _touch(tmp_path, "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
           "sub-02/anat/sub-02_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-01\t50\n2\t60\n")  # "2": padding lost
    with pytest.warns(UserWarning) as record:
        cohort = read_cohort(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "1 subject(s) with several sessions take one age from participants.tsv for all of them (e.g. sub-01)" \
        in messages and "sub-XX_sessions.tsv" in messages
    assert "sub-02 and sub-2 may be the same subject (zero padding)" in messages
    np.testing.assert_array_equal(cohort.ages[:2], [50, 50])
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t50\nses-2\t53\n")
    with pytest.warns(UserWarning) as record:
        read_cohort(tmp_path)
    assert not any("several sessions" in str(w.message) for w in record)
    # zero padding differs between the folders (ses-01) and sessions.tsv (1): the same sessions
    for old, new in (("ses-1", "ses-01"), ("ses-2", "ses-02")):
        folder = tmp_path / "sub-01" / new
        (tmp_path / "sub-01" / old).rename(folder)
        (folder / "anat" / f"sub-01_{old}_T1w.nii.gz").rename(folder / "anat" / f"sub-01_{new}_T1w.nii.gz")
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\n1\t50\n2\t53\n")
    with pytest.warns(UserWarning) as record:
        cohort = read_cohort(tmp_path)
    assert not any("several sessions" in str(w.message) for w in record)
    np.testing.assert_array_equal(cohort.ages[:2], [50, 53])


def test_participants_tsv_with_one_row_per_session(tmp_path):
    """A participants.tsv with a session column (not BIDS, but common) labels each session; without one, a second
    row of a subject is a duplicate whose message says how to give per-session labels."""
    _touch(tmp_path, "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
           "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tsession_id\tage\tsex\nsub-01\tses-1\t50\tF\n"
                                               "sub-01\t2\t53\tF\nsub-02\t\t60\tM\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor "several sessions take one age"
        cohort = read_cohort(tmp_path)
    assert cohort.ids.tolist() == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1"]
    assert cohort.ages.tolist() == [50, 53, 60] and cohort.sexes.tolist() == [0, 0, 1]
    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-01\t50\nsub-01\t53\nsub-02\t60\n")
    with pytest.raises(CohortError, match=r"line 3: duplicate participant_id 'sub-01' \(first at line 2\); one row "
                                          r"per session\? add a session_id column"):
        read_cohort(tmp_path)
    # sessions written "01" for ses-1, n/a (the subject's row), a session without a row (labels missing, said)
    _touch(tmp_path, "sub-01/ses-3/anat/sub-01_ses-3_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tsession_id\tage\nsub-01\t01\t50\n"
                                               "sub-01\tses-2\t53\nsub-02\tn/a\t60\n")
    with pytest.warns(UserWarning) as caught:
        cohort = read_cohort(tmp_path)
    assert [str(w.message).split(": ", 1)[1][:60] for w in caught] == [  # not "several sessions take one age"
        "1 scan(s) whose session has no row in participants.tsv (e.g."]
    np.testing.assert_array_equal(cohort.ages, [50, 53, np.nan, 60])
    # a per-subject column named like a session (visit) on images without sessions: the subject's only row
    other = tmp_path / "other"
    _touch(other, "sub-01/anat/sub-01_T1w.nii.gz")
    (other / "participants.tsv").write_text("participant_id\tvisit\tage\nsub-01\tbaseline\t50\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_cohort(other).ages.tolist() == [50]


def test_one_session_with_two_runs_is_not_several_sessions(tmp_path):
    _touch(tmp_path, "sub-01/ses-1/anat/sub-01_ses-1_run-1_T1w.nii.gz",
           "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tage\nsub-01\t50\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_cohort(tmp_path).ids.tolist() == ["sub-01_ses-1_run-1", "sub-01_ses-1_run-2"]


def test_table_rows_of_two_runs_take_the_run_in_their_ids(tmp_path):
    _touch(tmp_path, "sub-02_ses-01_run-1_T1w.nii.gz", "sub-02_ses-01_run-2_T1w.nii.gz", "sub-03_T1w.nii.gz")
    (tmp_path / "c.csv").write_text("participant_id,session,path,age\nsub-02,ses-01,sub-02_ses-01_run-1_T1w.nii.gz,50\n"
                                    "sub-02,ses-01,sub-02_ses-01_run-2_T1w.nii.gz,50\nsub-03,,sub-03_T1w.nii.gz,40\n")
    assert read_cohort(tmp_path / "c.csv").ids.tolist() == ["sub-02_ses-01_run-1", "sub-02_ses-01_run-2", "sub-03"]


def test_participants_json_levels_state_the_sex_coding(tmp_path):
    _touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tsex\nsub-01\t1\nsub-02\t2\n")
    with pytest.warns(UserWarning, match="2 sex value"):  # 1/2 is ambiguous without its sidecar
        assert np.isnan(read_cohort(tmp_path).sexes).all()
    (tmp_path / "participants.json").write_text('{"sex": {"Description": "sex", "Levels": {"1": "male", '
                                                '"2": "female", "3": "other"}}}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_cohort(tmp_path).sexes.tolist() == [1, 0]
    (tmp_path / "participants.json").write_text('{"sex": {"Levels": {"1": "female", "2": "male"}}}')
    assert read_cohort(tmp_path).sexes.tolist() == [0, 1]
    (tmp_path / "participants.tsv").write_text("participant_id\tsex\nsub-01\tM\nsub-02\tF\n")
    (tmp_path / "participants.json").write_text('{"sex": {"Levels": {"M": "male", "F": "female"}}}')
    assert read_cohort(tmp_path).sexes.tolist() == [1, 0]  # levels that code nothing new change nothing
    # levels as 0/1 with a third value: stated, so the column is no ambiguous 1/2 coding; "other" is missing
    _touch(tmp_path, "sub-03/anat/sub-03_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tsex\nsub-01\t0\nsub-02\t1\nsub-03\t2\n")
    (tmp_path / "participants.json").write_text('{"sex": {"Levels": {"0": "female", "1": "male", "2": "other"}}}')
    with pytest.warns(UserWarning, match=r"1 sex value\(s\) not understood, set to missing \(NaN\): line 4 '2'"):
        np.testing.assert_array_equal(read_cohort(tmp_path).sexes, [0, 1, np.nan])


def test_labels_not_required_keep_the_scans_and_the_labels_they_can(tmp_path):
    _touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\told\tF\nsub-02\t50\tM\n")
    with pytest.raises(CohortError, match="line 2: sub-01: "):
        read_cohort(tmp_path)
    with pytest.warns(UserWarning, match=r"1 label\(s\) not understood, left missing \(the scans are kept\):\n  "
                                         r"participants.tsv line 2: sub-01: "):
        cohort = read_cohort(tmp_path, labels_required=False)
    np.testing.assert_array_equal(cohort.ages, [np.nan, 50])
    assert cohort.sexes.tolist() == [0, 1]  # sub-01's sex is kept


def test_unfetched_datalad_files_are_scans_that_name_the_fix(tmp_path):
    """git-annex / DataLad datasets hold broken links until `datalad get`: scans, whose loading says so."""
    from jaxtl.data import InputError, load_volume

    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    link = tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    link.symlink_to("../../.git/annex/objects/XX/sub-01_T1w.nii.gz")
    cohort = read_cohort(tmp_path)
    assert cohort.ids.tolist() == ["sub-01"]
    with pytest.raises(InputError, match=r"broken symbolic link .* not fetched yet; get it \(`datalad get PATH`"):
        load_volume(link)
    (tmp_path / "t.csv").write_text(f"path\n{link}\n")
    with pytest.raises(CohortError, match=r"file not found: .* is a broken link .*`datalad get`"):
        read_cohort(tmp_path / "t.csv")


def test_missing_files_kept_for_skipping_readers_are_named_with_the_tables_hint(tmp_path):
    (tmp_path / "t").mkdir()
    _touch(tmp_path, "t/a.nii.gz")
    (tmp_path / "t" / "c.csv").write_text("path\na.nii.gz\nimgs/b.nii.gz\n")
    with pytest.warns(UserWarning, match=r"1 image file\(s\) not found\n  line 3: file not found: .*b.nii.gz "
                                         r"\(relative paths are read from c.csv's folder\)"):
        assert len(read_cohort(tmp_path / "t" / "c.csv", check_files=False)) == 2


def test_skip_mode_drops_bad_rows_with_a_warning(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "c.csv").write_text("participant_id,path,age\ns1,a.nii.gz,50\ns2,nope.nii.gz,50\ns3,b.nii.gz,old\n")
    with pytest.warns(UserWarning, match="skipping 2 row"):
        cohort = read_cohort(tmp_path / "c.csv", on_error="skip")
    assert cohort.ids.tolist() == ["s1"]


def test_table_without_path_column_or_rows(tmp_path):
    (tmp_path / "c.csv").write_text("subject,age\ns1,40\n")
    with pytest.raises(CohortError, match=r"no 'path' column.*`jaxtl prepare --path-column NAME`"):
        read_cohort(tmp_path / "c.csv")
    (tmp_path / "scan.nii.gz").write_bytes(b"\x1f\x8b\x08\x00")  # an image given where a cohort is expected
    with pytest.raises(CohortError, match=r"scan.nii.gz: an image, not a cohort; give a BIDS directory"):
        read_cohort(tmp_path / "scan.nii.gz")
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
        cohort = read_cohort(tmp_path)  # every run its own scan
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
        (tmp_path / "participants.tsv").read_text().replace("02\t 30,5 \tM", "02\t 30 months \tM")
    )
    with pytest.raises(CohortError) as info:
        read_cohort(tmp_path)
    message = str(info.value)
    assert "participants.tsv line 3: sub-02: age '30 months' is not a number of years" in message
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
    with pytest.raises(CohortError, match="not a BIDS dataset") as info:
        read_cohort(tmp_path / "empty")
    assert "a folder of .nii/.nii.gz/.mgz images" in str(info.value) and "a .txt list" in str(info.value)
    # a plain folder of images (as brainageR takes them): unlabelled scans, ids from the file names
    _touch(tmp_path / "scans", "control_02.nii.gz", "control_01.nii", "patient 1.mgz", "._control_01.nii", "notes.txt")
    folder = read_cohort(tmp_path / "scans")
    assert folder.ids.tolist() == ["control_01", "control_02", "patient 1"] and np.isnan(folder.ages).all()
    assert [Path(p).name for p in folder.paths] == ["control_01.nii", "control_02.nii.gz", "patient 1.mgz"]
    # files named like BIDS subjects directly in a folder are a plain folder too (BIDS has sub-* directories)
    _touch(tmp_path / "flat", "sub-02_T1w.nii.gz", "sub-01_T1w.nii.gz")
    flat = read_cohort(tmp_path / "flat")
    assert flat.ids.tolist() == ["sub-01", "sub-02"] and flat.participant_ids.tolist() == ["sub-01", "sub-02"]


def test_cohort_object(tmp_path):
    _touch(tmp_path, "sub-1_T1w.nii.gz", "sub-2_T1w.nii.gz", "sub-3_T1w.nii.gz")
    cohort = Cohort.from_paths([tmp_path / f"sub-{i}_T1w.nii.gz" for i in (1, 2, 3)])
    assert len(cohort) == 3 and cohort.ids.tolist() == ["sub-1", "sub-2", "sub-3"]
    assert np.isnan(cohort.ages).all()
    assert cohort.select([2, 0]).ids.tolist() == ["sub-3", "sub-1"]
    assert cohort.select(np.array([True, False, True])).ids.tolist() == ["sub-1", "sub-3"]
    copy = pickle.loads(pickle.dumps(cohort))
    assert copy.ids.tolist() == cohort.ids.tolist() and copy.paths.tolist() == cohort.paths.tolist()


# ---------------------------------------------------------------------------------------------------
# Real cohorts' headers and codings (IXI, OASIS, ABIDE), path lists, BIDS derivatives

IXI_HEADER = 'IXI_ID,"SEX_ID (1=m, 2=f)",Age (years),SITE,path\n'


def test_unrecognised_label_columns_warn_with_the_columns_seen(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "ixi.csv").write_text(IXI_HEADER + "2,1,35.8,Guys,a.nii.gz\n12,2,38.8,HH,b.nii.gz\n")
    with pytest.warns(UserWarning, match=r"no age/sex column recognised.*'IXI_ID', 'SEX_ID \(1=m, 2=f\)', "
                                         r"'Age \(years\)'.*sex_column='SEX_ID \(1=m, 2=f\)'"):
        cohort = read_cohort(tmp_path / "ixi.csv")
    assert np.isnan(cohort.ages).all() and cohort.sites.tolist() == ["Guys", "HH"]
    (tmp_path / "oasis.csv").write_text("Subject,M/F,AgeBasedOnClinicalData,path\nOAS1,F,70,a.nii.gz\n")
    with pytest.warns(UserWarning, match=r"no age/site column recognised.*'AgeBasedOnClinicalData'"):
        assert read_cohort(tmp_path / "oasis.csv").sexes.tolist() == [0.0]  # M/F is understood
    (tmp_path / "plain.csv").write_text("path,age\na.nii.gz,50\n")  # nothing dropped: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_cohort(tmp_path / "plain.csv")


def test_explicit_column_names(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "ixi.csv").write_text(IXI_HEADER + "2,1,35.8,Guys,a.nii.gz\n12,2,38.8,HH,b.nii.gz\n")
    cohort = read_cohort(tmp_path / "ixi.csv", age_column="Age (years)", sex_column="SEX_ID (1=m, 2=f)",
                         id_column="IXI_ID")
    assert cohort.ids.tolist() == ["2", "12"] and cohort.ages.tolist() == [35.8, 38.8]
    assert cohort.sexes.tolist() == [1.0, 0.0] and cohort.sites.tolist() == ["Guys", "HH"]
    (tmp_path / "abide.csv").write_text("SUB_ID,SITE_ID,AGE_AT_SCAN,SEX,T1_brain_lin\n"
                                        "50002,PITT,16.77,M,a.nii.gz\n")
    cohort = read_cohort(tmp_path / "abide.csv", id_column="SUB_ID", path_column="T1_brain_lin")
    assert cohort.sites.tolist() == ["PITT"] and cohort.ages.tolist() == [16.77]  # SITE_ID is understood
    with pytest.raises(CohortError, match=r"no column 'Age' \(age_column\); the columns are 'SUB_ID', 'SITE_ID'"):
        read_cohort(tmp_path / "abide.csv", age_column="Age", path_column="T1_brain_lin")
    # BIDS: the names apply to participants.tsv
    _touch(tmp_path / "bids", "sub-01/anat/sub-01_T1w.nii.gz")
    (tmp_path / "bids" / "participants.tsv").write_text("IXI_ID\tAge (years)\n01\t40\n")
    with pytest.raises(CohortError, match="no participant_id column.*id_column="):
        read_cohort(tmp_path / "bids")
    assert read_cohort(tmp_path / "bids", id_column="IXI_ID", age_column="Age (years)").ages.tolist() == [40.0]


def test_cli_prepare_threads_column_names(tmp_path, capsys):
    _touch(tmp_path, "a.nii.gz")
    (tmp_path / "c.csv").write_text("path,Age (years)\na.nii.gz,50\n")
    assert cli.main(["prepare", str(tmp_path / "c.csv"), str(tmp_path / "cache"), "--age-column", "AGE"]) == 2
    assert "no column 'AGE' (age_column)" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["prepare", "ds", "out", "--sex-column", "M/F", "--site-column", "SITE_ID",
                                          "--id-column", "ID", "--bids-filter", "space=MNI152Lin", "--bids-filter",
                                          "res="])
    assert (args.sex_column, args.site_column, args.id_column) == ("M/F", "SITE_ID", "ID")
    assert parse_bids_filter(args.bids_filter) == {"space": "MNI152Lin", "res": None}
    with pytest.raises(ValueError, match="ENTITY=VALUE"):
        parse_bids_filter(["space"])


def test_unparseable_sex_becomes_nan_with_a_warning_and_keeps_the_row(tmp_path):
    _touch(tmp_path, "a.nii.gz", "b.nii.gz", "c.nii.gz")
    (tmp_path / "c.csv").write_text("participant_id,path,age,sex\ns1,a.nii.gz,50,1\ns2,b.nii.gz,51,2\n"
                                    "s3,c.nii.gz,52,yes\n")
    for on_error in ("raise", "skip"):
        with pytest.warns(UserWarning, match=r"c.csv: 3 sex value\(s\) not understood, set to missing \(NaN\): "
                                             r"line 2 '1', line 3 '2', line 4 'yes' \(a 1/2 coding is ambiguous"
                                             r".*Accepted: F/M"):
            cohort = read_cohort(tmp_path / "c.csv", on_error=on_error)
        assert cohort.ids.tolist() == ["s1", "s2", "s3"]
        assert cohort.ages.tolist() == [50, 51, 52]  # the valid ages stay
        np.testing.assert_array_equal(cohort.sexes, [np.nan, np.nan, np.nan])  # a 2 makes the 1s ambiguous
    with pytest.raises(CohortError, match="line 2: sex '1': the column codes sex as 1/2"):
        read_cohort(tmp_path / "c.csv", sex_required=True)  # e.g. for a sex task
    # BIDS: the subject keeps its age and images
    _touch(tmp_path / "bids", "sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz")
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t30\t2\nsub-02\t40\tF\n")
    with pytest.warns(UserWarning, match=r"participants.tsv: 1 sex value\(s\).*line 2 '2'"):
        cohort = read_cohort(tmp_path / "bids", on_error="skip")
    assert cohort.ids.tolist() == ["sub-01", "sub-02"] and cohort.ages.tolist() == [30, 40]
    np.testing.assert_array_equal(cohort.sexes, [np.nan, 0.0])


def test_txt_list_of_paths_without_header(tmp_path):
    _touch(tmp_path, "a.nii.gz", "sub-02_ses-1_T1w.nii")
    (tmp_path / "list.txt").write_text(f"{tmp_path}/a.nii.gz\n\n# a comment\nsub-02_ses-1_T1w.nii\n")
    cohort = read_cohort(tmp_path / "list.txt")
    assert cohort.ids.tolist() == ["a", "sub-02_ses-1"] and cohort.sessions.tolist() == ["", "ses-1"]
    assert cohort.paths.tolist() == [str(tmp_path / "a.nii.gz"), str(tmp_path / "sub-02_ses-1_T1w.nii")]
    assert np.isnan(cohort.ages).all()
    (tmp_path / "bad.txt").write_text("a.nii.gz\nmissing.nii.gz\n")
    with pytest.raises(CohortError, match="line 2: file not found"):
        read_cohort(tmp_path / "bad.txt")
    (tmp_path / "table.txt").write_text("path,age\na.nii.gz,50\n")  # a .txt table still reads as a table
    assert read_cohort(tmp_path / "table.txt").ages.tolist() == [50.0]
    (tmp_path / "nopath.txt").write_text("subject,age\ns1,50\n")
    with pytest.raises(CohortError, match="no 'path' column"):
        read_cohort(tmp_path / "nopath.txt")
    (tmp_path / "list.csv").write_text("a.nii.gz\nsub-02_ses-1_T1w.nii\n")  # .csv stays a table, with a hint
    with pytest.raises(CohortError, match="no 'path' column.*save it as .txt"):
        read_cohort(tmp_path / "list.csv")


def _fmriprep(root):
    anat = "derivatives/fmriprep/sub-01/anat/sub-01"
    _touch(root, f"{anat}_desc-preproc_T1w.nii.gz", f"{anat}_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz",
           f"{anat}_space-MNI152NLin2009cAsym_res-2_desc-preproc_T1w.nii.gz",
           f"{anat}_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",  # not a T1w
           "derivatives/fmriprep/sub-02/anat/sub-02_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t30\tF\nsub-02\t40\tM\n")
    (root / "derivatives" / "fmriprep" / "dataset_description.json").write_text(
        '{"Name": "fMRIPrep outputs", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]}')
    return root / "derivatives" / "fmriprep"


def test_bids_derivatives_with_several_t1w_per_subject_must_be_chosen(tmp_path):
    fmriprep = _fmriprep(tmp_path)
    with pytest.raises(CohortError) as info:
        read_cohort(fmriprep)
    message = str(info.value)
    for fragment in ["1 subject/session(s) have several T1w images", "sub-01_desc-preproc_T1w.nii.gz",
                     "sub-01_space-MNI152NLin2009cAsym_res-2_desc-preproc_T1w.nii.gz",
                     "res: 2, <none>", "space: <none>, MNI152NLin2009cAsym",
                     "bids_filter={'res': VALUE, 'space': VALUE}",
                     "`--bids-filter res=VALUE --bids-filter space=VALUE`",
                     "linearly registered to MNI152 1mm"]:
        assert fragment in message, fragment
    with pytest.warns(UserWarning, match=r"2 of 2 T1w image\(s\) are fMRIPrep's standard-space outputs \(e.g. "
                                         r"sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz\).*flirt -dof 12"):
        cohort = read_cohort(fmriprep, bids_filter={"space": "MNI152NLin2009cAsym", "res": None})
    # the space label names the template only (NLin6Asym is FSL's MNI152 too): another pipeline's is not warned about
    (fmriprep / "dataset_description.json").write_text('{"GeneratedBy": [{"Name": "my-flirt-pipeline"}]}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_cohort(fmriprep, bids_filter={"space": "MNI152NLin2009cAsym", "res": None})
    (fmriprep / "dataset_description.json").write_text('{"GeneratedBy": [{"Name": "fMRIPrep"}]}')
    assert cohort.ids.tolist() == ["sub-01_space-MNI152NLin2009cAsym_desc-preproc",
                                   "sub-02_space-MNI152NLin2009cAsym_desc-preproc"]
    assert cohort.ages.tolist() == [30, 40]
    with warnings.catch_warnings(record=True) as caught:  # native space: no template warning
        warnings.simplefilter("always")
        assert read_cohort(fmriprep, bids_filter={"space": ""}).ids.tolist() == ["sub-01_desc-preproc"]
    messages = [str(w.message) for w in caught]
    assert any("1 participant" in m and "without a T1w image matching bids_filter" in m for m in messages)
    assert not any("non-linear" in m for m in messages)
    with pytest.raises(CohortError, match="no T1w image matches bids_filter.*space: <none>, MNI152NLin2009cAsym"):
        read_cohort(fmriprep, bids_filter={"space": "MNI152Lin"})
    with pytest.raises(ValueError, match="bids_filter applies to BIDS directories"):
        read_cohort(tmp_path / "participants.tsv", bids_filter={"space": "x"})
    # one scan stored twice (.nii beside .nii.gz): nothing to filter by, so the message says so; a macOS `._` copy
    # is no scan
    _touch(tmp_path, "derivatives/fmriprep/sub-02/anat/sub-02_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii",
           "derivatives/fmriprep/sub-01/anat/._sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz")
    twice = (r"1 scan\(s\) stored twice with the same BIDS entities \(e.g. .nii and .nii.gz\): remove one file of each:"
             r"\n  sub-02/anat/sub-02_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii(.gz)?, sub-02/anat/")
    with pytest.raises(CohortError, match=twice + r"[^\n]*$"):
        read_cohort(fmriprep, bids_filter={"space": "MNI152NLin2009cAsym", "res": None})
    with pytest.raises(CohortError, match=twice + r".*\n1 subject/session\(s\) have several T1w images"):
        read_cohort(fmriprep)  # every problem of the directory in one error


def test_label_columns_hint_lists_the_columns(tmp_path):
    (tmp_path / "ixi.csv").write_text(IXI_HEADER)
    hint = label_columns_hint(tmp_path / "ixi.csv", "sex")
    assert "'SEX_ID (1=m, 2=f)'" in hint and "--sex-column" in hint and "0 = female" in hint
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id\tAge (years)\n")
    assert "'Age (years)'" in label_columns_hint(tmp_path / "bids", "age")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.json").write_text("{}")
    assert "jaxtl prepare" in label_columns_hint(tmp_path / "cache", "age")
    assert "--sex-coding 1=M,2=F" in label_columns_hint(tmp_path / "cache", "sex")  # found but coded otherwise
    # unlabelled by design (a .txt list of paths, a plain folder of images): not read as a table whose header is
    # the first path
    _touch(tmp_path / "scans", "a.nii.gz", "b.nii.gz")
    (tmp_path / "scans.txt").write_text(f"{tmp_path / 'scans/a.nii.gz'}\n{tmp_path / 'scans/b.nii.gz'}\n")
    for unlabelled in (tmp_path / "scans.txt", tmp_path / "scans"):
        hint = label_columns_hint(unlabelled, "sex")
        assert hint.startswith(f"{unlabelled} lists images without labels; give a CSV/TSV with a 'path' and a 'sex' "
                               "column or a BIDS dataset with participants.tsv") and "a.nii.gz" not in hint


def test_transfer_says_when_no_scan_has_the_label(tmp_path):
    from jaxtl.transfer import Target, TransferConfig, fit_method

    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "ixi.csv").write_text(IXI_HEADER + "2,1,35.8,Guys,a.nii.gz\n12,2,38.8,HH,b.nii.gz\n")
    with pytest.warns(UserWarning):
        cohort = read_cohort(tmp_path / "ixi.csv")
    target = Target(None, cohort.ids, cohort.participant_ids, cohort.sessions, cohort.sites, cohort.ages,
                    cohort.sexes, 4, str(tmp_path / "ixi.csv"))
    split = np.array(["unlabelled"] * len(cohort))
    with pytest.raises(ValueError, match=r"no scan of .*ixi.csv has a label for age.*'Age \(years\)'.*--age-column"):
        fit_method(None, target, split, TransferConfig(task="age"))


def test_sex_tasks_refuse_unparseable_sex_values(tmp_path):
    """Age tasks keep a scan whose sex is unreadable (NaN, warned); a sex task refuses the cohort."""
    from jaxtl.transfer import open_target

    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "c.csv").write_text("path,age,sex\na.nii.gz,30,M\nb.nii.gz,40,2\n")
    with pytest.warns(UserWarning, match="sex"):
        target = open_target(tmp_path / "c.csv")
    assert np.isnan(target.sexes[1]) and target.ages[1] == 40
    with pytest.raises(CohortError, match="sex"):
        open_target(tmp_path / "c.csv", sex_required=True)


def test_one_two_coded_sex_column_is_not_half_read(tmp_path):
    """IXI codes sex 1 = m, 2 = f: the 2s are unreadable, so the 1s must not be read as 0/1's male either."""
    _touch(tmp_path, "a.nii.gz", "b.nii.gz", "c.nii.gz")
    (tmp_path / "c.csv").write_text("path,age,sex\na.nii.gz,30,1\nb.nii.gz,40,2\nc.nii.gz,50,1\n")
    with pytest.warns(UserWarning, match="1/2 coding is ambiguous"):
        cohort = read_cohort(tmp_path / "c.csv")
    assert np.isnan(cohort.sexes).all() and cohort.ages.tolist() == [30, 40, 50]
    with pytest.raises(CohortError, match="1/2"):
        read_cohort(tmp_path / "c.csv", sex_required=True)
    (tmp_path / "d.csv").write_text("path,age,sex\na.nii.gz,30,1\nb.nii.gz,40,0\n")  # 0/1: read as before
    assert read_cohort(tmp_path / "d.csv").sexes.tolist() == [1.0, 0.0]
    (tmp_path / "e.csv").write_text("path,age,sex\na.nii.gz,30,1\nb.nii.gz,40,2\nc.nii.gz,50,0\n")  # 0: unknown?
    with pytest.warns(UserWarning, match="1/2 coding is ambiguous"):
        assert np.isnan(read_cohort(tmp_path / "e.csv").sexes).all()  # the 0 is not read as female either


def test_longitudinal_labels_sessions_and_derivatives(tmp_path, monkeypatch):
    """Per-session ages of the raw dataset reach a derivatives folder (also read as "."); sessions.tsv ids without
    "ses-" and an age_at_scan column are understood; a table with participant ids takes sessions from BIDS names."""
    _bids(tmp_path)
    _touch(tmp_path, "derivatives/lin/sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
           "derivatives/lin/sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz")
    with pytest.warns(UserWarning):
        cohort = read_cohort(tmp_path / "derivatives" / "lin")
    assert cohort.ages.tolist() == [30.5, 32.0]  # not participants.tsv's 30.5 for both
    monkeypatch.chdir(tmp_path / "derivatives" / "lin")
    with pytest.warns(UserWarning):
        assert read_cohort(".").ages.tolist() == [30.5, 32.0]
    (tmp_path / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage_at_scan\n1\t31\n2\t33.5\n")
    with pytest.warns(UserWarning):
        assert read_cohort(tmp_path).ages.tolist() == [89.0, 31.0, 33.5, 33.5]
    (tmp_path / "t.csv").write_text("participant_id,path,age\n"
                                    "sub-02,sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz,31\n"
                                    "sub-02,sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz,33\n")
    table = read_cohort(tmp_path / "t.csv")
    assert table.ids.tolist() == ["sub-02_ses-1", "sub-02_ses-2"] and table.sessions.tolist() == ["ses-1", "ses-2"]
    (tmp_path / "one.csv").write_text("participant_id,path,age\nsub-02,sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz,31\n")
    assert read_cohort(tmp_path / "one.csv").ids.tolist() == ["sub-02"]  # one scan per person: ids as before
    # a named participants.tsv age column does not hide sessions.tsv's standard one
    (tmp_path / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage\nses-1\t31\nses-2\t35\n")
    tsv = (tmp_path / "participants.tsv").read_text().replace("participant_id\tage", "participant_id\tbaseline_age")
    (tmp_path / "participants.tsv").write_text(tsv)
    with pytest.warns(UserWarning):
        assert read_cohort(tmp_path, age_column="baseline_age").ages.tolist() == [89.0, 31.0, 35.0, 35.0]


def test_sex_coding_stated_or_spelled_in_the_column_name(tmp_path, capsys):
    """IXI's "SEX_ID (1=m, 2=f)" is read by the coding its name spells once the column is named; any other
    coding is stated with sex_coding= / --sex-coding."""
    _touch(tmp_path, "a.nii.gz", "b.nii.gz", "c.nii.gz")
    (tmp_path / "ixi.csv").write_text(IXI_HEADER + "2,1,35.8,Guys,a.nii.gz\n12,2,38.8,HH,b.nii.gz\n"
                                                   "13,2.0,40,HH,c.nii.gz\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing ambiguous left
        cohort = read_cohort(tmp_path / "ixi.csv", age_column="Age (years)", sex_column="SEX_ID (1=m, 2=f)",
                             sex_required=True)
    assert cohort.sexes.tolist() == [1.0, 0.0, 0.0]
    (tmp_path / "c.csv").write_text("path,age,sex\na.nii.gz,30,1\nb.nii.gz,40,2\nc.nii.gz,50,n/a\n")
    cohort = read_cohort(tmp_path / "c.csv", sex_coding={"1": "F", "2": "male"})
    np.testing.assert_array_equal(cohort.sexes, [0.0, 1.0, np.nan])
    with pytest.raises(ValueError, match="sex_coding '2': 'x' is not F/M"):
        read_cohort(tmp_path / "c.csv", sex_coding={"1": "F", "2": "x"})
    with pytest.raises(ValueError, match="name a value for each sex"):
        read_cohort(tmp_path / "c.csv", sex_coding={"1": "M", "2": "M"})
    (tmp_path / "d.csv").write_text("path,age,sex\na.nii.gz,30,1\nb.nii.gz,40,0\nc.nii.gz,50,2\n")
    with pytest.warns(UserWarning, match=r"1 sex value\(s\) not understood.*line 3 '0'"):  # 0: not in the coding
        cohort = read_cohort(tmp_path / "d.csv", sex_coding={"1": "M", "2": "F"})
    np.testing.assert_array_equal(cohort.sexes, [1.0, np.nan, 0.0])
    with pytest.raises(CohortError, match="sex '0' is not in the stated coding"):
        read_cohort(tmp_path / "d.csv", sex_coding={"1": "M", "2": "F"}, sex_required=True)
    assert parse_sex_coding("1=M, 2=F") == {"1": "M", "2": "F"}
    (tmp_path / "g.csv").write_text("path,SEXO\na.nii.gz,1\n")  # a coding for a column jaxtl did not find
    with pytest.raises(CohortError, match=r"a sex coding was given, but no sex column is recognised .*'SEXO'"):
        read_cohort(tmp_path / "g.csv", sex_coding={"1": "M", "2": "F"})
    with pytest.raises(ValueError, match="expected VALUE=F|M pairs"):
        parse_sex_coding("1M")
    assert cli.main(["prepare", str(tmp_path / "c.csv"), str(tmp_path / "cache"), "--downsample", "4",
                     "--sex-coding", "1=F,2=M"]) == 1  # the empty files fail to load; the labels were read
    assert read_index(tmp_path / "cache")["failures"] and "sex value" not in capsys.readouterr().err


def test_sex_transfer_needs_both_classes(tmp_path):
    from jaxtl.transfer import Target, TransferConfig, fit_method

    n = 4
    target = Target(None, np.array([f"s{i}" for i in range(n)]), np.array([f"s{i}" for i in range(n)]),
                    np.array([""] * n), np.array([""] * n), np.full(n, 50.0), np.ones(n), 4, "males.csv")
    with pytest.raises(ValueError, match="males.csv: every training scan has sex 1"):
        fit_method(None, target, np.array(["train"] * n), TransferConfig(task="sex"))


def test_age_units_from_bids_sidecars(tmp_path):
    """Ages in months / days (pediatric datasets) are converted with the unit their JSON sidecar states."""
    import json

    _touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-a/anat/sub-02_ses-a_T1w.nii.gz",
           "sub-02/ses-b/anat/sub-02_ses-b_T1w.nii.gz")
    (tmp_path / "participants.tsv").write_text("participant_id\tAge\tsex\nsub-01\t90\tF\nsub-02\t120\tM\n")
    (tmp_path / "participants.json").write_text(json.dumps({"Age": {"Description": "age", "Units": "months"}}))
    (tmp_path / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage\nses-a\t3650\nses-b\t4015\n")
    (tmp_path / "sessions.json").write_text(json.dumps({"age": {"Units": "day"}}))  # dataset level (inherited)
    cohort = read_cohort(tmp_path)
    np.testing.assert_allclose(cohort.ages, [7.5, 3650 / 365.25, 4015 / 365.25])
    # a table with its sidecar; a value with a unit of its own is refused, not read as years
    _touch(tmp_path, "a.nii.gz", "b.nii.gz")
    (tmp_path / "c.csv").write_text("path,age\na.nii.gz,480\nb.nii.gz,40y\n")
    (tmp_path / "c.json").write_text(json.dumps({"age": {"Units": "month"}}))
    with pytest.raises(CohortError, match=r"line 3.*'40y' is not a number of months"):
        read_cohort(tmp_path / "c.csv")
    (tmp_path / "c.csv").write_text("path,age\na.nii.gz,480\nb.nii.gz,1800\n")  # 150 years: implausible
    with pytest.raises(CohortError, match=r"line 3.*'1800' is implausible in months"):
        read_cohort(tmp_path / "c.csv")
    (tmp_path / "c.json").unlink()  # months given without their unit: the error says how to give it
    with pytest.raises(CohortError, match=r"'480' is implausible in years \(ages in months.*\"Units\": \"months\""):
        read_cohort(tmp_path / "c.csv")
    (tmp_path / "c.json").write_text(json.dumps({"age": {"Units": "month"}}))
    (tmp_path / "c.json").write_text(json.dumps({"age": {"Units": "decades"}}))
    with pytest.raises(CohortError, match=r"c\.json: unit 'decades' of the age column 'age' is not understood"):
        read_cohort(tmp_path / "c.csv")
    (tmp_path / "c.json").write_text(json.dumps({"age": {"Units": "year"}}))
    (tmp_path / "c.csv").write_text("path,age\na.nii.gz,48\nb.nii.gz,63y\n")
    np.testing.assert_allclose(read_cohort(tmp_path / "c.csv").ages, [48.0, 63.0])


def test_age_unit_sidecar_variants(tmp_path):
    """Sidecar keys in any case, free-text units, BIDS inheritance (the nearest description of the column wins),
    broken JSON refused only when it describes the age column."""
    import json

    from jaxtl.cohort import age_unit

    table = tmp_path / "t.tsv"
    sidecar = tmp_path / "t.json"
    for meta, per_unit in [({"AGE": {"units": "Months (at scan)"}}, 1 / 12), ({"age": {"Unit": "days"}}, 1 / 365.25),
                           ({"age": {"Units": ""}}, 1.0), ({"age": {"Description": "age"}}, 1.0),
                           ({"sex": {"Units": "months"}}, 1.0), ({"age": "years"}, 1.0)]:
        sidecar.write_text(json.dumps(meta))
        assert age_unit(table, "age") == pytest.approx(per_unit), meta
    # the subject's own description (without a unit) replaces the dataset-level one; a missing one inherits it
    top = tmp_path / "sessions.json"
    top.write_text(json.dumps({"age": {"Units": "month"}}))
    sidecar.write_text(json.dumps({"age": {"Description": "age at scan"}}))
    assert age_unit(table, "age", [top]) == 1.0
    sidecar.write_text(json.dumps({"session_id": {"Description": "session"}}))
    assert age_unit(table, "age", [top]) == pytest.approx(1 / 12)
    sidecar.write_text('{"sex": {"Levels": {"F": "female"}},}')  # trailing comma, says nothing of age
    with pytest.warns(UserWarning, match="not valid JSON.*ignored"):
        assert age_unit(table, "age") == 1.0
    sidecar.write_text('{"age": {"Units": "months"},}')
    with pytest.raises(CohortError, match="not valid JSON.*describes the age column"):
        age_unit(table, "age")
    sidecar.write_text(json.dumps({"age": {"Units": "months or years"}}))
    with pytest.raises(CohortError, match="not understood"):
        age_unit(table, "age")
