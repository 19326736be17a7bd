"""The one intensity grammar (:func:`samed.intensity.parse_intensity`) and its use by the engine
and the batch job."""

from __future__ import annotations

import numpy as np
import pytest

from samed.engine.preprocess import resolve_intensity
from samed.intensity import IntensitySpec, apply_window, parse_intensity, percentile_scale
from samed.registry import CT_WINDOWS


@pytest.mark.parametrize(
    ("spec", "kind", "low", "high", "name"),
    [
        ("auto", "auto", None, None, "auto"),
        ("minmax", "minmax", None, None, "minmax"),
        (None, "minmax", None, None, "minmax"),
        ("percentile", "percentile", 0.5, 99.5, "percentile:0.5:99.5"),
        ("liver", "window", -20.0, 140.0, "ct:liver"),
        ("ct:lung", "window", -1350.0, 150.0, "ct:lung"),
        (" Abdomen ", "window", -160.0, 240.0, "ct:abdomen"),
        ("window:-100:300", "window", -100.0, 300.0, "window:-100:300"),
        ("-100,300", "window", -100.0, 300.0, "window:-100:300"),
        ((-100, 300), "window", -100.0, 300.0, "window:-100:300"),
        (("window", -100, 300.5), "window", -100.0, 300.5, "window:-100:300.5"),
        (["window", -100, 300], "window", -100.0, 300.0, "window:-100:300"),
        ("percentile:1:99", "percentile", 1.0, 99.0, "percentile:1:99"),
        (("percentile", 2, 98), "percentile", 2.0, 98.0, "percentile:2:98"),
        (["percentile", 2, 98], "percentile", 2.0, 98.0, "percentile:2:98"),
    ],
)
def test_every_form_parses(spec, kind, low, high, name):
    s = parse_intensity(spec)
    assert (s.kind, s.low, s.high, s.name) == (kind, low, high, name)
    assert parse_intensity(s) is s


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("lungs", "'lungs' is not one of the allowed forms"),
        ("ct:nothing", "'ct:nothing' is not one of"),
        ("window:1", "'window:1' is not one of"),
        ("window:a:b", "'window:a:b' is not one of"),
        ("1,2,3", "'1,2,3' is not one of"),
        (("window", 1), r"\('window', 1\) is not one of"),
        (("median", 1, 2), r"\('median', 1, 2\) is not one of"),
        (("a", "b"), r"\('a', 'b'\) is not one of"),
        (42, "42 is not one of"),
        ("300,-100", "upper bound must exceed the lower one"),
        (("window", 5, 5), "upper bound must exceed"),
        ("window:0:nan", "finite bounds"),
        (("percentile", 10, 120), "0 <= lo < hi <= 100"),
        ("percentile:-1:50", "0 <= lo < hi <= 100"),
    ],
)
def test_bad_values_raise_value_errors_naming_the_value(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_intensity(spec)


def test_the_error_names_the_option_and_lists_the_allowed_forms():
    with pytest.raises(ValueError, match="^window 'lungs' is not one of") as info:
        parse_intensity("lungs", "window")
    for form in ("auto", "minmax", "percentile", *CT_WINDOWS, "window:LOW:HIGH", "LOW,HIGH"):
        assert form in str(info.value)


def test_auto_resolves_per_volume():
    ct = np.full((2, 4, 4), -1000.0)
    assert parse_intensity("auto").resolve(ct).name == "ct:abdomen"
    assert parse_intensity("auto").resolve(np.zeros((1, 3, 3)), "CT").name == "ct:abdomen"
    assert parse_intensity("auto").resolve(np.linspace(0, 1, 9)).name == "minmax"
    assert parse_intensity("auto").resolve(np.linspace(0, 900, 9)).name == "percentile:0.5:99.5"
    assert parse_intensity("liver").resolve(ct) == parse_intensity("liver")
    with pytest.raises(ValueError, match="resolve"):
        parse_intensity("auto").apply(ct)


def test_apply_is_the_numpy_scaling():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 400, size=(3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(parse_intensity("liver").apply(hu), apply_window(hu, "liver"))
    np.testing.assert_array_equal(
        parse_intensity("window:-50:150").apply(hu), apply_window(hu, (-50, 150))
    )
    np.testing.assert_array_equal(
        parse_intensity("percentile:1:99").apply(hu), percentile_scale(hu, 1, 99)
    )
    out = parse_intensity("minmax").apply(hu.astype(np.int16))
    assert out.dtype == np.float32 and np.array_equal(out, hu.astype(np.int16))


def test_the_engine_resolves_through_the_same_grammar():
    hu = np.linspace(-1000, 1000, 2 * 5 * 5).reshape(2, 5, 5)
    name, fn = resolve_intensity("window:-100:300", hu)
    assert name == "window:-100:300"
    np.testing.assert_array_equal(fn(hu), apply_window(hu, (-100, 300)))
    assert resolve_intensity("auto", hu)[0] == "ct:abdomen"
    assert resolve_intensity(["percentile", 1, 99], hu)[0] == "percentile:1:99"
    assert resolve_intensity(np.sqrt, hu)[0] == "sqrt"
    with pytest.raises(ValueError, match="intensity 'nonsense' is not one of"):
        resolve_intensity("nonsense", hu)


def test_run_records_keep_their_earlier_form():
    # samed segment's case.json compares these with earlier runs' settings
    assert parse_intensity("auto").setting() == "auto"
    assert parse_intensity("liver").setting() == "liver"
    assert parse_intensity("percentile").setting() == "percentile"
    assert parse_intensity("-100,300").setting() == ["window", -100.0, 300.0]
    assert parse_intensity((-100, 300)).setting() == ["window", -100.0, 300.0]
    assert parse_intensity("percentile:1:99").setting() == ["percentile", 1.0, 99.0]


def test_spec_validates_itself():
    with pytest.raises(ValueError, match="kind 'gamma'"):
        IntensitySpec("gamma")
    with pytest.raises(ValueError, match="finite bounds"):
        IntensitySpec("window", None, 3.0)
