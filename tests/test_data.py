"""Data loaders on tiny fixtures written in each data set's published format."""
import numpy as np
import pytest
import torch

from fairkernels import data, metrics

ADULT_TRAIN = """\
39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K
50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, >50K
38, Private, 215646, HS-grad, 9, Divorced, Handlers-cleaners, Not-in-family, White, Female, 0, 0, 40, United-States, <=50K
54, ?, 180211, Some-college, 10, Married-civ-spouse, ?, Husband, Asian-Pac-Islander, Male, 0, 0, 60, South, >50K

"""
ADULT_TEST = """\
|1x3 Cross validator
25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct, Own-child, Black, Male, 0, 0, 40, United-States, <=50K.
44, Private, 160323, Some-college, 10, Married-civ-spouse, Machine-op-inspct, Husband, Black, Female, 7688, 0, 40, ?, >50K.
28, Local-gov, 336951, Assoc-acdm, 12, Married-civ-spouse, Protective-serv, Wife, White, Female, 0, 0, 40, United-States, >50K.
"""


@pytest.fixture
def adult_root(tmp_path):
    folder = tmp_path / "adult"
    folder.mkdir()
    (folder / "adult.data").write_text(ADULT_TRAIN)
    (folder / "adult.test").write_text(ADULT_TEST)
    return tmp_path


def test_adult_parses_quirks_and_drops_missing(adult_root):
    ds = data.load("adult", root=adult_root)
    # 4 + 3 rows, two with '?' dropped
    assert len(ds) == 5
    np.testing.assert_array_equal(ds.y, [0, 1, 0, 0, 1])
    assert ds.group_names == ("sex=Female", "sex=Male")
    np.testing.assert_array_equal(ds.groups, [1, 1, 0, 1, 0])
    assert ds.X.dtype == np.float32 and ds.num_classes == 2 and ds.num_groups == 2
    # 6 numeric + one-hot categoricals (sex and income removed): workclass 4, education 4,
    # marital 3, occupation 5, relationship 4, race 2, country 1
    assert ds.X.shape == (5, 6 + 4 + 4 + 3 + 5 + 4 + 2 + 1)
    age = ds.X[:, 0]
    assert abs(float(age.mean())) < 1e-5 and float(age.std()) == pytest.approx(1.0, abs=1e-5)


def test_adult_split_and_group_column(adult_root, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(adult_root))
    test = data.load("adult", split="test")
    assert len(test) == 2 and test.y.tolist() == [0, 1]
    by_race = data.load("adult", split="train", group_column="race")
    assert by_race.group_names == ("race=White",)
    both = data.load("adult", group_column=["sex", "race"])
    assert both.group_names == ("sex=Female|race=White", "sex=Male|race=Black", "sex=Male|race=White")
    np.testing.assert_array_equal(both.groups, [2, 2, 0, 1, 0])


def test_adult_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=data.DATA_ENV):
        data.load("adult")
    with pytest.raises(FileNotFoundError, match="adult.data"):
        data.load("adult", root=tmp_path)


def _write_har(root, rows_per_split=(5, 3), width=7):
    folder = root / "UCI HAR Dataset"
    rng = np.random.default_rng(0)
    expected = {}
    for part, rows in zip(("train", "test"), rows_per_split):
        (folder / part).mkdir(parents=True)
        X = rng.normal(size=(rows, width)).astype(np.float32)
        activity = rng.integers(1, 7, rows)
        subject = rng.choice([3, 7, 12, 30], rows)
        np.savetxt(folder / part / f"X_{part}.txt", X, fmt="%.7e")
        np.savetxt(folder / part / f"y_{part}.txt", activity, fmt="%d")
        np.savetxt(folder / part / f"subject_{part}.txt", subject, fmt="%d")
        expected[part] = (X, activity, subject)
    return expected


def test_har_folder(tmp_path):
    expected = _write_har(tmp_path)
    ds = data.load("har", root=tmp_path)
    X = np.concatenate([expected[p][0] for p in ("train", "test")])
    activity = np.concatenate([expected[p][1] for p in ("train", "test")])
    subject = np.concatenate([expected[p][2] for p in ("train", "test")])
    np.testing.assert_allclose(ds.X, X, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, activity - 1)
    observed = np.unique(subject)
    np.testing.assert_array_equal(ds.groups, np.searchsorted(observed, subject))
    assert ds.group_names == tuple(f"subject={s}" for s in observed)
    assert len(data.load("har", root=tmp_path, split="test")) == 3


def test_har_missing_subject_file(tmp_path):
    _write_har(tmp_path)
    (tmp_path / "UCI HAR Dataset" / "test" / "subject_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="subject_test.txt"):
        data.load("har", root=tmp_path)


def _write_ds(root, activities=(1, 2, 12), persons=(1, 2), segments=2, shape=(4, 3)):
    rng = np.random.default_rng(1)
    written = {}
    for a in activities:
        for p in persons:
            folder = root / "data" / f"a{a:02d}" / f"p{p}"
            folder.mkdir(parents=True)
            for s in range(1, segments + 1):
                values = rng.normal(size=shape).astype(np.float32)
                np.savetxt(folder / f"s{s:02d}.txt", values, delimiter=",", fmt="%.8e")
                written[(a, p, s)] = values
    return written


def test_ds_folder_flatten_and_summary(tmp_path):
    written = _write_ds(tmp_path)
    ds = data.load("ds", root=tmp_path)
    keys = sorted(written)
    assert ds.X.shape == (12, 12)
    np.testing.assert_allclose(ds.X, np.stack([written[k].reshape(-1) for k in keys]), rtol=1e-6)
    np.testing.assert_array_equal(ds.y, [{1: 0, 2: 1, 12: 2}[k[0]] for k in keys])
    np.testing.assert_array_equal(ds.groups, [k[1] - 1 for k in keys])
    summary = data.load("ds", root=tmp_path, features="summary")
    first = written[keys[0]]
    np.testing.assert_allclose(summary.X[0], np.concatenate([first.mean(0), first.std(0), first.min(0),
                                                             first.max(0)]), rtol=1e-5, atol=1e-6)
    subset = data.load("ds", root=tmp_path, activities=[12, 2])
    assert len(subset) == 8 and subset.num_classes == 2
    with pytest.raises(ValueError, match="features"):
        data.load("ds", root=tmp_path, features="fft")


def test_npz_named_and_path(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(6, 2, 3))
    y = np.array([0, 1, 2, 0, 1, 2])
    g = np.array([0, 0, 1, 1, 2, 2])
    np.savez(tmp_path / "office31.npz", X=X, y=y, g=g)
    ds = data.load("office31", root=tmp_path)
    assert ds.X.shape == (6, 6) and ds.X.dtype == np.float32
    np.testing.assert_array_equal(ds.y, y)
    assert ds.num_groups == 3 and ds.num_classes == 3
    np.savez(tmp_path / "mine.npz", X=X[:, 0], g=g)
    unlabeled = data.load(str(tmp_path / "mine.npz"))
    assert unlabeled.y is None and unlabeled.num_classes is None
    with pytest.raises(FileNotFoundError, match="mtfl.npz"):
        data.load("mtfl", root=tmp_path)
    np.savez(tmp_path / "mnist-usps.npz", X=X, y=y)
    with pytest.raises(ValueError, match="'g'"):
        data.load("mnist-usps", root=tmp_path)


def test_csv_intersectional_groups(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text("age,sex,race,city,label\n"
                    "30,F,A,x,yes\n"
                    "40,M,B,y,no\n"
                    "50,F,B,x,yes\n"
                    "?,M,A,x,no\n"
                    "20,M,B,,no\n"
                    "60,F,A,y,no\n")
    ds = data.load(path, group_column=["sex", "race"], label_column="label")
    assert len(ds) == 4  # '?' and empty field rows dropped
    assert ds.group_names == ("sex=F|race=A", "sex=F|race=B", "sex=M|race=B")
    np.testing.assert_array_equal(ds.groups, [0, 2, 1, 0])
    np.testing.assert_array_equal(ds.y, [1, 0, 1, 0])
    assert ds.X.shape == (4, 1 + 2)  # standardised age + one-hot city
    single = data.load(path, group_column="sex")
    assert single.y is None and single.num_groups == 2
    with pytest.raises(ValueError, match="'gender'"):
        data.load(path, group_column="gender")


def test_csv_numeric_group_values_sort_numerically(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("f,site\n1,10\n2,2\n3,10\n")
    ds = data.load(path, group_column="site")
    assert ds.group_names == ("site=2", "site=10")
    np.testing.assert_array_equal(ds.groups, [1, 0, 1])


def test_digits_reverse():
    ds = data.load("digits-reverse")
    assert ds.X.shape == (3594, 64) and ds.X.dtype == np.float32
    assert ds.num_groups == 2 and ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.groups), [1797, 1797])
    np.testing.assert_allclose(ds.X[1797:], 1.0 - ds.X[:1797])
    assert ds.X.min() == 0.0 and ds.X.max() == 1.0
    np.testing.assert_array_equal(ds.y[:1797], ds.y[1797:])


def test_synthetic_shapes_and_determinism():
    ds = data.load("synthetic", n=500, dim=3, n_clusters=5, n_groups=3, seed=4)
    assert ds.X.shape == (500, 3) and ds.X.dtype == np.float32
    assert ds.num_groups == 3 and set(np.unique(ds.y)) <= set(range(5))
    again = data.load("synthetic", n=500, dim=3, n_clusters=5, n_groups=3, seed=4)
    np.testing.assert_array_equal(ds.X, again.X)
    np.testing.assert_array_equal(ds.groups, again.groups)
    other = data.load("synthetic", n=500, dim=3, n_clusters=5, n_groups=3, seed=5)
    assert not np.array_equal(ds.X, other.X)
    assert np.isfinite(ds.X).all()


@pytest.mark.parametrize("dim", [1, 4])
def test_synthetic_chunking_does_not_change_data(dim):
    whole = data.make_synthetic(n=1000, dim=dim, n_clusters=3, n_groups=2, bias=0.3, seed=7)
    chunked = data.make_synthetic(n=1000, dim=dim, n_clusters=3, n_groups=2, bias=0.3, seed=7, chunk_rows=37)
    np.testing.assert_array_equal(whole.X, chunked.X)
    np.testing.assert_array_equal(whole.y, chunked.y)
    np.testing.assert_array_equal(whole.groups, chunked.groups)
    prefix = data.make_synthetic(n=100, dim=dim, n_clusters=3, n_groups=2, bias=0.3, seed=7)
    np.testing.assert_array_equal(prefix.X, whole.X[:100])


def test_synthetic_bias_increases_group_cluster_dependence():
    options = dict(n=4000, dim=2, n_clusters=4, n_groups=2, seed=0)
    fair = data.make_synthetic(bias=0.0, **options)
    biased = data.make_synthetic(bias=0.9, **options)
    # planted clusters as a clustering: their group mixing drops with bias
    assert metrics.mnce(fair.y, fair.groups) > 0.95
    assert metrics.mnce(biased.y, biased.groups) < 0.3
    assert metrics.nmi(biased.groups, biased.y) > metrics.nmi(fair.groups, fair.y) + 0.2
    # group offsets move the group means apart
    gap = lambda ds: np.linalg.norm(ds.X[ds.groups == 0].mean(0) - ds.X[ds.groups == 1].mean(0))
    assert gap(biased) > gap(fair) + 2.0


def test_synthetic_bad_options():
    with pytest.raises(ValueError, match="bias"):
        data.make_synthetic(n=10, bias=1.5)
    with pytest.raises(ValueError, match="n_groups"):
        data.make_synthetic(n=10, n_groups=0)
    with pytest.raises(TypeError, match="n"):
        data.make_synthetic(n=10.0)


def test_from_arrays_and_dataset_checks():
    ds = data.from_arrays(torch.ones(3, 2, dtype=torch.float64), [0, 1, 1], y=np.array([2, 0, 1]))
    assert ds.X.dtype == np.float32 and ds.groups.dtype == np.int64 and ds.num_classes == 3
    assert ds.group_names == ("0", "1")
    with pytest.raises(ValueError, match="groups has length 2"):
        data.from_arrays(np.ones((3, 2)), [0, 1])
    with pytest.raises(TypeError, match="groups"):
        data.from_arrays(np.ones((2, 2)), [0.0, 1.0])
    with pytest.raises(ValueError, match="X must be 2-D"):
        data.from_arrays(np.ones(3), [0, 1, 1])
    with pytest.raises(ValueError, match="group_names"):
        data.from_arrays(np.ones((2, 2)), [0, 2], group_names=("a", "b"))


def test_available_and_unknown():
    names = data.available()
    for name in ("digits-reverse", "synthetic", "adult", "har", "ds", "mnist-usps", "reverse-mnist",
                 "office31", "mtfl"):
        assert name in names
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("imagenet")
