"""Bad arguments: every invalid option value or combination of `featx extract`, `fit`, `layers`,
`predict`, `info` and `cache rm` is one line on stderr starting with 'featx', exit code 2, and
never a traceback.

Curated invalid values run as plain parametrized cases; hypothesis generates the rest (numbers out
of range, junk and unicode text, several bad options at once, missing or conflicting options).
The default run uses a small, derandomized example budget; the `_full` variants (marked slow) use
large random budgets: `python -m pytest -m slow tests/cli/test_cli_properties.py`.

The commands run in-process through `featx.cli.main` (what the `featx` script calls), so an
exception escaping it is exactly what a user would see as a traceback.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import FAST_ARGS, cli, make_images

FAST = settings(
    max_examples=30, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
FULL = settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Paths the generated command lines refer to as @NAME."""
    root = tmp_path_factory.mktemp("props")
    data = make_images(root / "data", per_class=4, size=(32, 32))
    (root / "empty" / "a").mkdir(parents=True)  # a folder without images
    (root / "notes.txt").write_text("not a dataset")
    (root / "bad.csv").write_text("a.jpg,cat,train\nb.jpg,dog,holdout\n")
    (root / "empty.csv").write_text("")
    cache = root / "cache"
    rc, out, err = cli(
        "-q", "extract", *FAST_ARGS, "--data", data, "--layers", "layer2,layer3", "--cache-dir", cache
    )
    assert rc == 0, err
    codes = out.strip().splitlines()[-1]
    rc, out, err = cli(
        "-q", "extract", *FAST_ARGS, "--data", data, "--layers", "layer1", "--cache-dir", cache
    )
    assert rc == 0, err
    rc, out, err = cli("-q", "fit", codes, "--C", "1", "--out", root / "clf" / "m.joblib")
    assert rc == 0, err
    one = root / "one"
    one.mkdir()
    cli("-q", "extract", *FAST_ARGS, "--data", data, "--layers", "layer1", "--cache-dir", one)
    return {
        "@DATA": str(data),
        "@EMPTY": str(root / "empty"),
        "@TXT": str(root / "notes.txt"),
        "@BADCSV": str(root / "bad.csv"),
        "@EMPTYCSV": str(root / "empty.csv"),
        "@CACHE": str(cache),
        "@SCRATCH": str(root / "scratch"),
        "@CODES": codes,
        "@CLF": str(root / "clf" / "m.joblib"),
        "@IMAGES": str(data / "cat"),
        "@ONE": str(one),
        "@ROOT": str(root),
    }


def resolve(world, argv) -> list[str]:
    out = []
    for a in argv:
        for k, v in world.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def error_lines(err: str) -> list[str]:
    """Lines of stderr as a terminal shows them (only '\n' ends a line)."""
    return [ln for ln in err.split("\n") if ln.strip()]


def expect_usage_error(world, argv, code=2) -> None:
    """Exit `code`; stderr: one 'featx: error:' line (documented 'featx:' warnings, such as the
    one before unpickling a classifier, may precede it); no traceback."""
    argv = resolve(world, argv)
    rc, out, err = cli(*argv)
    assert "Traceback" not in err, f"featx {argv!r}:\n{err}"
    lines = error_lines(err)
    assert rc == code, f"featx {argv!r}: exit {rc}, stderr: {err[-600:]!r}"
    assert all(ln.startswith("featx") for ln in lines), f"featx {argv!r}: stderr {err!r}"
    assert len([ln for ln in lines if ln.startswith("featx: error")]) == 1, f"featx {argv!r}: stderr {err!r}"
    assert lines[-1].startswith("featx: error"), f"featx {argv!r}: stderr {err!r}"


# -- base command lines (each valid and cheap on its own) ----------------------------------------

EXTRACT = {
    "--model": "resnet18",
    "--weights": "none",
    "--data": "@DATA",
    "--layers": "layer2",
    "--image-size": "32",
    "--workers": "0",
    "--batch-size": "4",
    "--cache-dir": "@SCRATCH",
}
FIT = {"--C": "1"}
PREDICT = {"--device": "cpu"}


def argv_of(command: list[str], options: dict, tail: list[str] = ()) -> list[str]:
    out = list(command)
    for k, v in options.items():
        if v is None:
            continue
        out += [k] if v is True else [k, v]
    return out + list(tail)


# -- invalid values ------------------------------------------------------------------------------

junk = st.text(max_size=12)  # any unicode, NUL included


def zz(prefix: str = "zz"):
    """Junk that no option accepts: a prefix no valid value has."""
    return junk.map(lambda t: prefix + t)


def not_fraction(open_one: bool):
    """Floats outside (0, 1] (or (0, 1) when `open_one`), nan and inf included, as text."""
    bad = st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda x: not (0 < x < 1 or (x == 1 and not open_one))
    )
    return st.one_of(bad.map(repr), bad.map(str), zz())


positive_int_bad = st.one_of(
    st.integers(max_value=0).map(str), st.sampled_from(["1.5", "", "x", "1e3", "0x10"]), zz()
)
no_cuda = not __import__("torch").cuda.is_available()

EXTRACT_BAD_CURATED = {
    "--model": [
        "",
        "resnt18",
        "timm:",
        "timm:zz_no_such_net",
        "vgg",
        "RESNET18",
        "torchvision:resnet18",
        "efficientnet_lite1",
        "pixels:x",
    ],
    "--weights": [
        "",
        "IMAGENET9K",
        "imagenet",
        "default",
        "random",
        "/no/such/weights.pth",
        "./missing.safetensors",
    ],
    "--data": [
        "",
        "/no/such/dir",
        "sklearn:",
        "sklearn:iris",
        "torchvision:",
        "torchvision:NoSuchSet",
        "torchvision:CIFAR10",
        "@EMPTY",
        "@TXT",
        "@BADCSV",
        "@EMPTYCSV",
        "@DATA/cat/cat_000.jpg",
    ],
    "--layers": [
        "",
        ",",
        " , ",
        "depth:2",
        "depth:0",
        "depth:-0.5",
        "depth:1.5",
        "depth:nan",
        "depth:inf",
        "depth:-0.0",
        "depth:",
        "depth:abc",
        "layer9",
        "layer2,layer9",
        "LAYER4",
        "fc.weight",
        "depth:0.5,layer9",
    ],
    "--pool": [
        "",
        "sum",
        "avg3x4",
        "avg0x0",
        "avg65x65",
        "avgx",
        "max2x2",
        "avg-1x-1",
        "none2",
        "avg 2x2",
        "avg2x2x2",
    ],
    "--image-size": ["0", "-1", "7", "4097", "100000000000", "abc", "1.5", ""],
    "--crop-pct": ["0", "-0.1", "1.5", "nan", "inf", "abc", ""],
    "--dtype": ["float64", "int8", "", "FLOAT32"],
    "--precision": ["fp8", "fp64", "", "FP32"],
    "--channels-last": ["yes", "", "true"],
    "--test-fraction": ["0", "1", "1.0", "-0.5", "2", "nan", "abc", ""],
    "--per-class-limit": [
        "0",
        "-3",
        "x",
        "train=0",
        "foo=3",
        "train=",
        "=5",
        "train=1.5",
        "",
        "1.5",
        "train=2,,",
    ],
    "--seed": ["abc", "1.5", ""],
    "--batch-size": ["0", "-1", "x", "1.5", ""],
    "--workers": ["-1", "x", "1.5", ""],
    "--device": ["tpu", "", "cuda:x", "cuda:-1", "meta", "gpu", "cpu:x", "xla", "CPU", "vulkan", "mps"]
    + (["cuda", "cuda:0"] if no_cuda else []),
}

EXTRACT_BAD_GENERATED = {
    "--model": zz(),
    "--weights": st.one_of(zz("ZZ"), zz("/no/such/")),
    "--data": zz("/no/such/"),
    "--layers": st.one_of(zz(), st.floats().filter(lambda x: not 0 < x <= 1).map(lambda x: f"depth:{x!r}")),
    "--pool": st.one_of(
        zz(),
        st.tuples(st.integers(-5, 80), st.integers(-5, 80))
        .filter(lambda t: t[0] != t[1] or not 1 <= t[0] <= 64)
        .map(lambda t: f"avg{t[0]}x{t[1]}"),
    ),
    "--image-size": st.one_of(st.integers(max_value=7), st.integers(min_value=4097)).map(str),
    "--crop-pct": not_fraction(open_one=False),
    "--dtype": junk.filter(lambda t: t not in ("float32", "float16")),
    "--precision": junk.filter(lambda t: t not in ("auto", "fp32", "bf16", "fp16")),
    "--channels-last": junk.filter(lambda t: t not in ("auto", "on", "off")),
    "--test-fraction": not_fraction(open_one=True),
    "--per-class-limit": st.one_of(
        st.integers(max_value=0).map(str),
        st.tuples(st.sampled_from(["train", "test", "val", "zz"]), st.integers(max_value=0)).map(
            lambda t: f"{t[0]}={t[1]}"
        ),
        zz(),
    ),
    "--seed": st.one_of(zz(), st.floats().map(repr).filter(lambda s: not s.lstrip("-").isdigit())),
    "--batch-size": positive_int_bad,
    "--workers": st.one_of(st.integers(max_value=-1).map(str), zz()),
    "--device": zz(),
}


def _curated(table):
    return [pytest.param(k, v, id=f"{k}={v!r}") for k, vs in table.items() for v in vs]


@pytest.mark.parametrize("option,value", _curated(EXTRACT_BAD_CURATED))
def test_extract_rejects_invalid_value(world, option, value):
    expect_usage_error(world, argv_of(["extract"], {**EXTRACT, option: value}))


@st.composite
def extract_one_bad(draw):
    option = draw(st.sampled_from(sorted(EXTRACT_BAD_GENERATED)))
    return argv_of(["extract"], {**EXTRACT, option: draw(EXTRACT_BAD_GENERATED[option])})


@st.composite
def extract_many_bad(draw):
    """2-4 invalid options at once, plus optionally a structural mistake."""
    opts = dict(EXTRACT)
    table = {
        k: st.one_of(st.sampled_from(v), EXTRACT_BAD_GENERATED[k]) for k, v in EXTRACT_BAD_CURATED.items()
    }
    for option in draw(st.lists(st.sampled_from(sorted(table)), min_size=2, max_size=4, unique=True)):
        opts[option] = draw(table[option])
    tail = []
    mistake = draw(
        st.sampled_from(
            [
                "none",
                "missing-model",
                "missing-data",
                "relu-and-no-relu",
                "unknown-option",
                "stray-argument",
                "dangling-option",
                "flag-with-value",
            ]
        )
    )
    if mistake == "missing-model":
        opts["--model"] = None
    elif mistake == "missing-data":
        opts["--data"] = None
    elif mistake == "relu-and-no-relu":
        opts["--relu"], opts["--no-relu"] = True, True
    elif mistake == "unknown-option":
        tail = ["--zz" + draw(junk.filter(lambda t: not t.startswith("-")))]
    elif mistake == "stray-argument":
        tail = ["zz" + draw(junk)]
    elif mistake == "dangling-option":
        tail = [draw(st.sampled_from(["--layers", "--pool", "--model", "--data", "--seed", "--batch-size"]))]
    elif mistake == "flag-with-value":
        tail = [draw(st.sampled_from(["--strict=1", "--no-wait=yes", "--relu=on"]))]
    return argv_of(["extract"], opts, tail)


@FAST
@given(argv=extract_one_bad())
def test_extract_invalid_option_values(world, argv):
    expect_usage_error(world, argv)


@pytest.mark.slow
@FULL
@given(argv=extract_one_bad())
def test_extract_invalid_option_values_full(world, argv):
    expect_usage_error(world, argv)


@FAST
@given(argv=extract_many_bad())
def test_extract_invalid_combinations(world, argv):
    expect_usage_error(world, argv)


@pytest.mark.slow
@FULL
@given(argv=extract_many_bad())
def test_extract_invalid_combinations_full(world, argv):
    expect_usage_error(world, argv)


@settings(max_examples=20, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(min_value=-(2**70), max_value=2**70))
def test_extract_any_integer_seed_is_accepted_or_rejected_cleanly(world, seed):
    """--seed S with an unknown layer: a usable seed reaches the layer check (exit 2); an unusable
    one is itself a usage error (exit 2). Never a traceback."""
    expect_usage_error(world, argv_of(["extract"], {**EXTRACT, "--seed": str(seed), "--layers": "layer9"}))


def test_extract_invalid_device_with_an_empty_cache(world, tmp_path):
    """A device torch knows but this machine lacks (or featx does not support) is a usage error
    before any work, like an unavailable CUDA."""
    for dev in ["mps", "vulkan", "meta"]:
        expect_usage_error(
            world, argv_of(["extract"], {**EXTRACT, "--device": dev, "--cache-dir": str(tmp_path)})
        )
        assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob("*.partial"))


def test_extract_cache_dir_with_a_nul_byte(world):
    rc, out, err = cli(*resolve(world, argv_of(["extract"], {**EXTRACT, "--cache-dir": "/tmp/x\x00y"})))
    assert "Traceback" not in err and rc in (1, 2), (rc, err)
    assert len(error_lines(err)) == 1 and err.startswith("featx"), err


# -- fit -----------------------------------------------------------------------------------------

FIT_BAD_CURATED = {
    "--classifier": ["", "logistic", "SVM", "knn"],
    "--preset": ["", "vissl", "kornblith2019"],
    "--scale": ["", "minmax", "L2"],
    "--C": ["0", "-1", "a", "1,b", "inf", "nan", "1e400", "-0.5,1", ",", "1;2"],
    "--pca": ["0", "-1", "x", "1.5"],
    "--cv": ["0", "1", "-2", "x"],
    "--val-fraction": ["0", "1", "1.5", "-0.1", "nan", "x"],
    "--train-size": [
        "x",
        "0",
        "-5",
        "0/class",
        "abc/class",
        "1.5",
        "/class",
        "-1/class",
        "all/class",
        "10/klass",
    ],
    "--seed": ["x", "1.5", ""],
    "--seeds": ["a,b", "1.5", "0,x"],
    "--jobs": ["0", "-2", "x", ""],
    "--epochs": ["0", "-1", "x"],
    "--chunk-rows": ["0", "1", "15", "x"],
    "--max-iter": ["0", "-10", "x"],
    "--layer": ["", ",", " , "],
}

FIT_BAD_GENERATED = {
    "--classifier": junk.filter(lambda t: t not in ("svm", "softmax", "sgd")),
    "--C": st.one_of(
        st.lists(
            st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not (x > 0 and math.isfinite(x))),
            min_size=1,
            max_size=4,
        ).map(lambda xs: ",".join(repr(x) for x in xs)),
        zz(),
    ),
    "--pca": positive_int_bad,
    "--cv": st.one_of(st.integers(max_value=1).map(str), zz()),
    "--val-fraction": not_fraction(open_one=True),
    "--train-size": st.one_of(
        st.integers(max_value=0).map(str), st.integers(max_value=0).map(lambda k: f"{k}/class"), zz()
    ),
    "--jobs": st.one_of(st.integers(max_value=-2).map(str), st.just("0"), zz()),
    "--epochs": positive_int_bad,
    "--chunk-rows": st.one_of(st.integers(max_value=15).map(str), zz()),
    "--max-iter": positive_int_bad,
}


@pytest.mark.parametrize("option,value", _curated(FIT_BAD_CURATED))
def test_fit_rejects_invalid_value(world, option, value):
    expect_usage_error(world, argv_of(["fit", "@CODES"], {**FIT, option: value}))


@st.composite
def fit_bad(draw):
    opts = dict(FIT)
    for option in draw(
        st.lists(st.sampled_from(sorted(FIT_BAD_GENERATED)), min_size=1, max_size=3, unique=True)
    ):
        opts[option] = draw(FIT_BAD_GENERATED[option])
    return argv_of(["fit", "@CODES"], opts)


@FAST
@given(argv=fit_bad())
def test_fit_invalid_options(world, argv):
    expect_usage_error(world, argv)


@pytest.mark.slow
@FULL
@given(argv=fit_bad())
def test_fit_invalid_options_full(world, argv):
    expect_usage_error(world, argv)


@settings(max_examples=12, deadline=None, database=None, derandomize=True)
@given(seed=st.integers(min_value=-(2**70), max_value=2**70))
def test_fit_any_integer_seed_is_accepted_or_rejected_cleanly(world, seed):
    rc, out, err = cli(
        *resolve(world, ["-q", "fit", "@CODES", "--C", "1", "--layer", "layer2", f"--seed={seed}"])
    )
    assert "Traceback" not in err, f"fit --seed {seed}:\n{err}"
    assert rc == 0 or (rc == 2 and len(error_lines(err)) == 1), (seed, rc, err)


@pytest.mark.parametrize("argv", [["--concat", "--layer", "layer2"], ["--out", "@ROOT/m.pkl"]])
def test_fit_invalid_combination(world, argv):
    expect_usage_error(world, ["fit", "@CODES", "--C", "1", *argv])


@pytest.mark.parametrize("path", ["/no/such/codes.h5", "", "@ROOT/missing.h5"])
def test_fit_on_a_file_that_does_not_exist_is_usage_error(world, path):
    """As for `featx info` and `featx predict`: a path that does not exist is a usage error."""
    expect_usage_error(world, ["fit", path])


@pytest.mark.parametrize(
    "argv", [["--out", "/proc/featx-nope/m.joblib"], ["--results", "/proc/featx-nope.json"]]
)
def test_fit_unwritable_output_is_one_line_error(world, argv):
    expect_usage_error(world, ["-q", "fit", "@CODES", "--C", "1", "--layer", "layer2", *argv], code=1)


# -- layers, predict, info, cache ----------------------------------------------------------------

LAYERS_BAD = {
    "model": ["", "resnt18", "timm:", "zz", "RESNET18"],
    "--pool": ["", "sum", "avg3x4", "avg0x0", "max2x2"],
    "--image-size": ["0", "-3", "7", "5000", "x"],
    "--crop-pct": ["0", "2", "nan", "x"],
    "--weights": ["IMAGENET9K", "/no/such.pth", "", "random"],
}


@st.composite
def layers_bad(draw):
    opts = {"model": "resnet18"}
    for option in draw(st.lists(st.sampled_from(sorted(LAYERS_BAD)), min_size=1, max_size=3, unique=True)):
        opts[option] = draw(st.one_of(st.sampled_from(LAYERS_BAD[option]), zz()))
    model = opts.pop("model")
    return argv_of(["layers", model], opts)


@FAST
@given(argv=layers_bad())
def test_layers_invalid_options(world, argv):
    expect_usage_error(world, argv)


@pytest.mark.slow
@FULL
@given(argv=layers_bad())
def test_layers_invalid_options_full(world, argv):
    expect_usage_error(world, argv)


PREDICT_BAD = {
    "classifier": ["/no/such/m.joblib", "@ROOT", "", "@ROOT/zz.joblib"],
    "inputs": ["/no/such.jpg", "@EMPTY/a", "@EMPTYCSV", ""],
    "--top-k": ["0", "-1", "x"],
    "--batch-size": ["0", "-4", "x"],
    "--workers": ["-1", "x"],
    "--device": ["tpu", "", "cuda:x", "gpu", "xla"] + (["cuda"] if no_cuda else []),
    "--weights": ["/no/such/weights.pth"],
}


@st.composite
def predict_bad(draw):
    opts = {"classifier": "@CLF", "inputs": "@IMAGES", **PREDICT}
    for option in draw(st.lists(st.sampled_from(sorted(PREDICT_BAD)), min_size=1, max_size=3, unique=True)):
        opts[option] = draw(st.sampled_from(PREDICT_BAD[option]))
    clf, inputs = opts.pop("classifier"), opts.pop("inputs")
    return argv_of(["predict", clf, inputs], opts)


@FAST
@given(argv=predict_bad())
def test_predict_invalid_options(world, argv):
    expect_usage_error(world, argv)


@pytest.mark.slow
@FULL
@given(argv=predict_bad())
def test_predict_invalid_options_full(world, argv):
    expect_usage_error(world, argv)


@FAST
@given(
    target=st.one_of(zz(), st.sampled_from(["", "/", "//", ".", "..", "h5", "--", "*", "resnet18", ".h5"]))
)
def test_cache_rm_of_no_single_entry_is_usage_error_and_removes_nothing(world, target):
    import os

    before = sorted(os.listdir(world["@CACHE"]))
    expect_usage_error(world, ["cache", "rm", target, "--cache-dir", "@CACHE"])
    assert sorted(os.listdir(world["@CACHE"])) == before


@pytest.mark.parametrize("target", ["", "/", "//"])
def test_cache_rm_with_an_empty_name_removes_nothing(world, target, tmp_path):
    """With a single entry in the cache, an empty name (or '/') must not match it."""
    import os
    import shutil

    one = tmp_path / "one"
    shutil.copytree(world["@ONE"], one)
    before = sorted(os.listdir(one))
    assert any(n.endswith(".h5") for n in before)
    expect_usage_error(world, ["cache", "rm", target, "--cache-dir", str(one)])
    assert sorted(os.listdir(one)) == before


@pytest.mark.parametrize("argv", [[], ["-q"]])
def test_no_command_prints_help_with_exit_2(world, argv):
    rc, out, err = cli(*argv)
    assert rc == 2 and "Traceback" not in err and "usage" in err.lower(), (rc, err)


@pytest.mark.parametrize(
    "argv",
    [
        ["cache"],
        ["cache", "zz"],
        ["cache", "rm"],
        ["info"],
        ["info", ""],
        ["info", "/no/such.h5"],
        ["fit"],
        ["predict"],
        ["predict", "@CLF"],
        ["layers"],
        ["extract"],
        ["frobnicate"],
        ["--zz"],
        ["layers", "--zz"],
        ["cache", "ls", "--zz"],
        ["info", "@CODES", "--zz"],
    ],
)
def test_incomplete_or_unknown_commands(world, argv):
    expect_usage_error(world, argv)


FUZZ_WORDS = [
    "layers",
    "info",
    "cache",
    "ls",
    "--json",
    "--pool",
    "--image-size",
    "--weights",
    "--cache-dir",
    "--list-models",
    "-q",
    "resnet18",
    "@CODES",
    "@ONE",
    "avg",
    "0",
    "-1",
    "",
    "--",
]


@st.composite
def fuzz_argv(draw):
    first = draw(st.sampled_from(["layers", "info", "cache", "zz"]))
    rest = draw(st.lists(st.one_of(st.sampled_from(FUZZ_WORDS), junk), max_size=5))
    assume("rm" not in rest)  # never remove the fixture's entries (`cache rm` has its own tests)
    return [first, *rest]


def _no_traceback_whatever_the_words(world, argv) -> None:
    """Whatever the words, `layers`, `info` and `cache` end with exit 0, or one error line
    (exit 1 or 2), never a traceback."""
    full = resolve(world, argv)
    rc, out, err = cli(*full)
    assert "Traceback" not in err, f"featx {full!r}:\n{err}"
    assert rc in (0, 1, 2, "SystemExit(0)"), (full, rc, err)
    if rc in (1, 2):
        lines = error_lines(err)
        assert len(lines) == 1 and lines[0].startswith("featx"), (full, err)


@FAST
@given(argv=fuzz_argv())
def test_random_command_lines_never_traceback(world, argv):
    _no_traceback_whatever_the_words(world, argv)


@pytest.mark.slow
@FULL
@given(argv=fuzz_argv())
def test_random_command_lines_never_traceback_full(world, argv):
    _no_traceback_whatever_the_words(world, argv)
