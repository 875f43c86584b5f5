"""Fuzzing the three parsers of hostile input: the CSV loader, the config loader, the payload decoder.

Every generated input either loads or fails with fedlora's own error type (`DataError`,
`ConfigError`, `PayloadError`); any other exception, a hang, or a half-written run directory
fails the test. By default the examples are few and derandomized (the same every run, well under
a minute on one core); `HYPOTHESIS_PROFILE=long` runs 50x as many, freshly drawn:

    HYPOTHESIS_PROFILE=long OMP_NUM_THREADS=1 python -m pytest -p no:xdist -q tests/test_fuzz.py

No example database is written (database=None): failures print their minimal example instead.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedlora.config import ConfigError, DataConfig, RunConfig, load_config
from fedlora.data import DataError, load_table
from fedlora.data.text import RowSerializer
from fedlora.fl.payload import MAX_HEADER_BYTES, PayloadError, decode, encode, spec_of

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"


def fuzz(n: int):
    """Hypothesis settings for a fuzz test of `n` examples (x50, random, with HYPOTHESIS_PROFILE=long)."""
    return settings(max_examples=n * 50 if LONG else n, derandomize=not LONG, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


@contextmanager
def no_hang(seconds: int = 10):
    """Fail (TimeoutError) instead of hanging: one parse of a small input takes milliseconds."""
    def fire(*_):
        raise TimeoutError(f"parsing one generated input took over {seconds} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ======================================================================================= CSV loader

PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
NAMES = st.sampled_from(["a", "b", "label", "x y", " label ", "", "é", "na", "1", "a,b", 'q"t', "\x00", "日本"])
CELLS = st.one_of(
    st.sampled_from(["", "0", "1", "1.5", "-3", "1e400", "-1e400", "nan", "NaN", "inf", "-inf", "Infinity",
                     "yes", "no", "true", "TRUE", "t", "N/A", "NULL", "None", "   ", "1,5", "0x10",
                     "9" * 400, "1_000", "2020-01-01", "é", "\x00", "a\nb", '"', "'", "\\", "\r", "\ufeff"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)


@st.composite
def csv_texts(draw) -> tuple[str, str | None, bool]:
    """(CSV text, target column, whether a properly quoted row has more fields than the header):
    well quoted or raw, ragged, with odd headers and values."""
    header = draw(st.lists(NAMES, min_size=1, max_size=5))
    n_rows = draw(st.integers(0, 12))
    rows = [draw(st.lists(CELLS, min_size=max(0, len(header) - 1), max_size=len(header) + 1))
            for _ in range(n_rows)]
    if draw(st.booleans()):  # a class column with 1-3 classes, so some inputs get past the schema
        label = draw(st.sampled_from(["label", "y"]))
        header.append(label)
        classes = draw(st.lists(st.sampled_from(["0", "1", "2", "pos", "neg", "", "nan"]), min_size=1, max_size=3))
        for i, row in enumerate(rows):
            row.append(classes[i % len(classes)])
    too_long = False
    if draw(st.booleans()):
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        text = buf.getvalue()
        # pandas drops extra trailing fields that are empty or NA harmlessly; any other would shift columns
        too_long = any(any(c.lstrip(" ") not in PANDAS_NA for c in r[len(header):]) for r in rows)
    else:
        sep = draw(st.sampled_from([",", ";", "\t", ",,"]))
        text = "\n".join(sep.join(r) for r in [header, *rows])
    target = draw(st.one_of(st.none(), st.sampled_from([*header, "missing"])))
    return text, target, too_long


def _load_or_data_error(path: Path, **cfg):
    """The CLI's loader: a Table, or None after a DataError; anything else propagates (test fails)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with no_hang():
                table = load_table(DataConfig(source=str(path), **cfg), seed=0)
        except DataError as exc:
            assert str(exc).strip(), "a DataError must say what is wrong"
            return None
    # What loads must be usable: >= 2 classes, a label per row, prompts that serialize.
    assert 2 <= len(table.classes) and len(table.labels) == len(table.frame) > 0
    assert (table.labels >= 0).all()
    serializer = RowSerializer(table, DataConfig(source=str(path), **cfg)).fit(table.frame)
    assert all(isinstance(p, str) for p in serializer.prompts(table.frame.head(3)))
    return table


@fuzz(150)
@given(case=csv_texts(), max_rows=st.one_of(st.none(), st.integers(-1, 5)))
@example(case=("", "label", False), max_rows=None)
@example(case=("label,a\n", "label", False), max_rows=None)
@example(case=("label,a\n1,1e400\n0,nan\n1,inf\n0,-inf\n", "label", False), max_rows=None)  # inf: bug 1
@example(case=("label,label\n1,2\n", "label", False), max_rows=None)
@example(case=("label,a\n1,x\n1,y\n", "label", False), max_rows=None)
@example(case=('label,a\n"1,x\n0,y\n', "label", False), max_rows=None)
@example(case=("label,a\x00\n1,\x00\n0,y\n", "label", False), max_rows=None)
@example(case=("label,a\n1,2,9\n0,3,8\n", "label", True), max_rows=None)  # silent column shift: bug 2
@example(case=('"label' + "a" * 200_000 + "\n1,2\n", "label", False), max_rows=None)  # csv.Error: bug 3
def test_csv_loader_loads_or_raises_data_error(tmp_path_factory, case, max_rows):
    text, target, too_long = case
    path = tmp_path_factory.mktemp("csv") / "data.csv"
    path.write_text(text, encoding="utf-8")
    table = _load_or_data_error(path, target=target, max_rows=max_rows)
    assert not (too_long and table is not None), "a row longer than the header must not load (columns would shift)"


@fuzz(25)
@given(case=csv_texts(), entry=st.sampled_from(["run", "compare", "robustness"]))
@example(case=("label,a\n1,2,9\n0,3,8\n", "label", True), entry="run")  # the run dir came before the data
def test_failed_start_leaves_no_run_directory(tmp_path_factory, case, entry):
    """Data that fails to load fails `run`/`compare`/the sweep before any run directory is written."""
    from conftest import make_config

    from fedlora.experiment import compare, run
    from fedlora.robustness import robustness_sweep

    text, target, _ = case
    folder = tmp_path_factory.mktemp("start")
    (folder / "data.csv").write_text(text, encoding="utf-8")
    if _load_or_data_error(folder / "data.csv", target=target) is not None:
        return  # it loads: starting would train, which is not this test's business
    out = folder / "runs"
    cfg = make_config(output_dir=out)  # the target may be any string, so it is set without YAML parsing
    cfg = replace(cfg, data=replace(cfg.data, source=str(folder / "data.csv"), target=target, columns=None,
                                    max_rows=None))
    start = {"run": lambda: run(cfg, quiet=True), "compare": lambda: compare(cfg, ["fedit"], quiet=True),
             "robustness": lambda: robustness_sweep(cfg, attacks=["sign_flip"], aggregators=["mean"], fs=[0],
                                                    momentum=[None], quiet=True)}[entry]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError):
            start()
    assert not out.exists() or not any(out.iterdir()), f"{entry} left {sorted(out.rglob('*'))}"


@pytest.mark.parametrize("error", [ValueError("Parquet magic bytes not found"), OSError("truncated")])
def test_unreadable_parquet_is_a_data_error(tmp_path, monkeypatch, error):
    """pyarrow's errors on a damaged file (ArrowInvalid is a ValueError) become a DataError."""
    import fedlora.data.tables as tables

    def fail(*_, **__):
        raise error

    real = tables.importlib.import_module
    monkeypatch.setattr(tables.importlib, "import_module",  # pyarrow "installed"
                        lambda name, *a: None if name == "pyarrow" else real(name, *a))
    monkeypatch.setattr(tables.pd, "read_parquet", fail)
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_table(DataConfig(source=str(path), target="label"))


@fuzz(60)
@given(raw=st.binary(max_size=200), target=st.sampled_from(["label", "a"]))
@example(raw=b"\xff\xfe\x00l\x00a", target="label")
@example(raw=b"\xef\xbb\xbf", target="label")
@example(raw=b"label,a\n\xe9,1\n", target="label")
def test_csv_loader_on_raw_bytes(tmp_path_factory, raw, target):
    path = tmp_path_factory.mktemp("csv") / "data.csv"
    path.write_bytes(raw)
    _load_or_data_error(path, target=target)


@fuzz(60)
@given(lines=st.lists(st.one_of(
    st.sampled_from(['{"text": "a", "label": "x"}', '{"text": "b", "label": "y"}', '{"text": 1, "label": 1}',
                     '{"text": "c", "label": null}', '{"text": "d", "label": [1]}', '{"text": "d", "label": [1, 2]}', '{"text": "d", "label": []}', '{"text": "e", "label": {}}',
                     '{"text": "f", "label": NaN}', '{"text": "g", "label": 1e999}', "[1, 2]", "null", "",
                     '{"text": "h", "label": true}', '{"text": "i", "label": false}', "{" * 3000]),
    st.text(max_size=10)), max_size=8))
@example(lines=['{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}"])  # RecursionError
@example(lines=['{"text": "a", "label": [1, 2]}', '{"text": "b", "label": "x"}'])  # ambiguous truth value
@example(lines=['{"text": "a", "label": "x"}', '{"text": "b", "label": 1e999}', '{"text": "c", "label": "x"}'])
def test_jsonl_loader_loads_or_raises_data_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    _load_or_data_error(path)


# ==================================================================================== config loader

_KNOWN = ["seed", "output_dir", "run_name", "fl", "fl.rounds", "fl.method", "fl.client_fraction", "fl.method_args",
          "lora.r", "lora.alpha", "lora.target_modules", "data.columns", "data.max_rows", "data.number_format",
          "partition.scheme", "partition.num_clients", "train.lr", "train.micro_batch_size", "eval.zero_shot",
          "robust.aggregator", "robust.attack", "robust.byzantine", "robust.momentum", "bogus", "fl.bogus"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(), st.text(max_size=8),
                    st.sampled_from(["fedit", "krum", "dirichlet", "q_proj", "1e-3", "5e-4", "inf", ".nan", "[", "{",
                                     "a: b", "!!python/object:os.system", "&a [*a]", "- x"]))
YAML_VALUES = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(_KNOWN),
                                                          st.integers(-2, 2)), kids, max_size=3)), max_leaves=12)


def _nest(key: str, value):
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@st.composite
def config_documents(draw) -> str:
    """A YAML document: known keys with random values, unknown keys, non-mapping roots."""
    kind = draw(st.sampled_from(["known", "known", "random", "text"]))
    if kind == "text":
        return draw(st.one_of(st.text(max_size=40), st.sampled_from(
            ["", "---\n...", "a: 1\n---\nb: 2", "fl: {rounds: 3", "[" * 200, "- fl\n- lora", "!!binary AAAA",
             "fl: &a [*a]", "x: &x {a: *x}", "fl:\n  rounds: 3\n    method: x", "\t- 1", "%YAML 9.9\n---\na: 1"])))
    if kind == "random":
        doc = draw(YAML_VALUES)
    else:
        doc: dict = {}
        for key in draw(st.lists(st.sampled_from(_KNOWN), max_size=4)):
            nested = _nest(key, draw(YAML_VALUES))
            top = next(iter(nested))
            if isinstance(doc.get(top), dict) and isinstance(nested[top], dict):
                doc[top].update(nested[top])
            else:
                doc.update(nested)
    return json.dumps(doc, allow_nan=True) if draw(st.booleans()) else _yaml_dump(doc)


def _yaml_dump(doc) -> str:
    import yaml

    try:
        return yaml.safe_dump(doc)
    except yaml.YAMLError:
        return json.dumps(doc, allow_nan=True)


OVERRIDES = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(_KNOWN + ["", "fl..rounds", ".", "fl.rounds.x"]),
              st.one_of(st.text(max_size=10), st.sampled_from(["[", "{a: 1", "3", "[1, 2]", "*a", "!!set {a}",
                                                               ".inf", "-.inf", ".nan", "~", "''", "1e400"]))),
    st.text(max_size=12)), max_size=3)


def _load_or_config_error(path, overrides):
    try:
        with no_hang():
            cfg = load_config(path, overrides)
            cfg.to_dict()  # what start_run_dir writes must be buildable
    except ConfigError as exc:
        assert str(exc).strip(), "a ConfigError must say what is wrong"
        return None
    assert isinstance(cfg, RunConfig)
    return cfg


@fuzz(150)
@given(doc=config_documents(), overrides=OVERRIDES)
@example(doc="[1, 2]", overrides=["fl.rounds=3"])  # a non-mapping root with an override
@example(doc="{1: 2, a: 3}", overrides=[])  # mixed key types: sorted() of int and str
@example(doc="[" * 5000 + "]" * 5000, overrides=[])  # nesting deeper than the recursion limit
@example(doc="", overrides=["fl.rounds=["])  # an override value that is not YAML
@example(doc="", overrides=["lora.dropout=.nan"])  # NaN passes every range check
def test_config_loader_loads_or_raises_config_error(tmp_path_factory, doc, overrides):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(doc, encoding="utf-8")
    _load_or_config_error(path, overrides)


@fuzz(40)
@given(raw=st.binary(max_size=120))
@example(raw=b"fl:\n  method: \xff\xfe")  # not UTF-8
@example(raw=b"\x00\x01")
def test_config_loader_on_raw_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(raw)
    _load_or_config_error(path, [])


@fuzz(80)
@given(overrides=OVERRIDES)
def test_config_overrides_alone(overrides):
    _load_or_config_error(None, overrides)


# =================================================================================== payload decoder

def _good_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"l.lora_A": torch.randn(2, 3, generator=gen), "l.lora_B": torch.randn(3, 2, generator=gen),
            "h": torch.randn(2, generator=gen).to(torch.bfloat16), "n": torch.arange(3)}


GOOD = _good_tensors()
SPEC = spec_of(GOOD)
BLOB = encode(GOOD, {"num_examples": 5}, round_index=3, client_id=1)


def _split(blob: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def _join(header, data: bytes, size_delta: int = 0) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode() if not isinstance(header, bytes) else header
    return (len(raw) + size_delta).to_bytes(8, "little", signed=False) + raw + data


def _decode_or_payload_error(blob, expected=SPEC, **kw):
    """decode's contract: PayloadError, or tensors that satisfy every check it claims to make."""
    try:
        with no_hang():
            tensors, meta = decode(blob, expected=expected, **kw)
    except PayloadError as exc:
        assert str(exc).strip() and isinstance(exc.reason, str)
        return None
    assert isinstance(meta, dict)
    if expected is not None:
        assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == {k: (tuple(s), d) for k, (s, d) in expected.items()}
    for t in tensors.values():
        if t.is_floating_point() or t.is_complex():
            assert torch.isfinite(t.to(torch.complex128 if t.is_complex() else torch.float64)).all()
    if kw.get("expected_round") is not None:
        assert meta["round"] == kw["expected_round"]
    if kw.get("expected_sender") is not None:
        assert meta["client_id"] == kw["expected_sender"]
    return tensors, meta


DTYPE_NAMES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "C64", "F8_E4M3",
                               "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "E8M0", "U16", "U64", "XX", "", "f32"])
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                                 st.text(max_size=8)),
                       lambda kids: st.one_of(st.lists(kids, max_size=3),
                                              st.dictionaries(st.text(max_size=5), kids, max_size=3)), max_leaves=8)


@st.composite
def mutated_headers(draw) -> bytes:
    """A valid payload whose header JSON was edited: dtypes, shapes, offsets, names, metadata, length field."""
    header, data = _split(BLOB)
    names = [n for n in header if n != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add", "meta", "fedlora", "entry"]))
        name = draw(st.sampled_from(names))
        if what == "dtype" and isinstance(header.get(name), dict):
            header[name]["dtype"] = draw(DTYPE_NAMES)
        elif what == "shape" and isinstance(header.get(name), dict):
            header[name]["shape"] = draw(st.one_of(st.lists(st.integers(-2, 2**62), max_size=4), JSONISH))
        elif what == "offsets" and isinstance(header.get(name), dict):
            header[name]["data_offsets"] = draw(st.one_of(st.lists(st.integers(-1, 2**64), max_size=3), JSONISH))
        elif what == "drop":
            header.pop(name, None)
        elif what == "add":
            header[draw(st.text(max_size=10))] = draw(st.one_of(JSONISH, st.fixed_dictionaries(
                {"dtype": DTYPE_NAMES, "shape": st.lists(st.integers(0, 4), max_size=2),
                 "data_offsets": st.lists(st.integers(0, 200), min_size=2, max_size=2)})))
        elif what == "meta":
            header["__metadata__"] = draw(st.one_of(JSONISH, st.dictionaries(st.text(max_size=8), st.text(max_size=8))))
        elif what == "fedlora":
            raw = draw(st.one_of(st.text(max_size=30), JSONISH.map(lambda v: json.dumps(v, allow_nan=True)),
                                 st.sampled_from(['{"round": true}', '{"round": -1}', '{"num_examples": Infinity}',
                                                  '{"num_examples": 1e308}', '{"client_id": [1]}', "[" * 50_000,
                                                  '{"round": 3, "client_id": "1"}', '{"num_examples": NaN}'])))
            if not isinstance(header.get("__metadata__"), dict):
                header["__metadata__"] = {}
            header["__metadata__"]["fedlora"] = raw
        elif what == "entry" and name in header:
            header[name] = draw(JSONISH)
    raw = json.dumps(header, allow_nan=True).encode()
    pad = b" " * draw(st.integers(0, 8))  # safetensors pads headers with spaces
    return _join(raw + pad, data, draw(st.sampled_from([0, 0, 0, -1, 1, 2**40, -len(raw)])))


@fuzz(300)
@given(blob=mutated_headers(), check_meta=st.booleans())
@example(blob=_join({"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\xff"), check_meta=False)  # KeyError
@example(blob=_join({"x": {"dtype": "F8_E8M0", "shape": [1], "data_offsets": [0, 1]}}, b"\x01"), check_meta=False)
@example(blob=_join({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\xff"), check_meta=False)  # isfinite
@example(blob=_join({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\xff" * 8), check_meta=False)  # complex NaN
@example(blob=_join({"__metadata__": {"fedlora": "[" * 100_000}}, b""), check_meta=False)  # RecursionError
@example(blob=_join({"__metadata__": {"fedlora": '{"num_examples": Infinity}'}}, b""), check_meta=True)  # int(inf)
@example(blob=(2**64 - 1).to_bytes(8, "little") + b"{}", check_meta=False)  # a header length beyond the blob
def test_payload_decoder_on_mutated_headers(blob, check_meta):
    kw = dict(expected_round=3, expected_sender=1, require_meta=("num_examples",)) if check_meta else {}
    _decode_or_payload_error(blob, expected=None, **kw)
    _decode_or_payload_error(blob, **kw)


@fuzz(200)
@given(data=st.data(), how=st.sampled_from(["random", "truncate", "flip", "splice"]))
def test_payload_decoder_on_damaged_bytes(data, how):
    if how == "random":
        blob = data.draw(st.binary(max_size=300))
    elif how == "truncate":
        blob = BLOB[: data.draw(st.integers(0, len(BLOB) - 1))]
    elif how == "flip":
        blob = bytearray(BLOB)
        for i in data.draw(st.lists(st.integers(0, len(BLOB) - 1), min_size=1, max_size=4)):
            blob[i] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob)
    else:
        at = data.draw(st.integers(0, len(BLOB)))
        blob = BLOB[:at] + data.draw(st.binary(max_size=40)) + BLOB[at:]
    _decode_or_payload_error(blob)
    _decode_or_payload_error(blob, expected=None, expected_round=3, expected_sender=1)


@fuzz(150)
@given(shape=st.lists(st.integers(0, 4), max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8,
                              torch.bool, torch.complex64, torch.float8_e5m2]),
       poison=st.sampled_from([None, math.nan, math.inf, -math.inf]),
       rnd=st.integers(0, 5), sender=st.one_of(st.integers(0, 3), st.sampled_from(["1", "node-1"])))
def test_payload_decoder_on_typed_tensors(shape, dtype, poison, rnd, sender):
    """Encoded tensors of any dtype/shape, maybe poisoned, from any round and sender, against the spec."""
    t = torch.zeros(shape, dtype=dtype)
    if poison is not None and t.numel() and (t.is_floating_point() or t.is_complex()):
        t.view(-1)[0] = poison
    blob = encode({**GOOD, "l.lora_A": t}, {"num_examples": 5}, round_index=rnd, client_id=sender)
    out = _decode_or_payload_error(blob, expected_round=3, expected_sender=1)
    valid = (tuple(shape), dtype) == SPEC["l.lora_A"] and rnd == 3 and sender == 1 and poison is None
    assert (out is not None) == valid
    assert _decode_or_payload_error(blob, expected=None) is not None or poison is not None and t.numel() > 0


def test_size_cap_applies_before_parsing(monkeypatch):
    """An oversized blob is refused on its length alone: the parser never sees (or allocates for) it."""
    import fedlora.fl.payload as payload

    def boom(*_):
        raise AssertionError("parsed an oversized payload")

    monkeypatch.setattr(payload, "st_load", boom)
    monkeypatch.setattr(payload, "_read_header", boom)
    with pytest.raises(PayloadError, match="cap") as info:
        decode(BLOB, max_bytes=len(BLOB) - 1)
    assert info.value.reason == "size"
    # A header length field claiming more than the blob (or the header cap) is refused before json.loads.
    monkeypatch.undo()
    for claimed in (len(BLOB), MAX_HEADER_BYTES + 1, 2**64 - 1):
        with pytest.raises(PayloadError, match="header length field"):
            decode(claimed.to_bytes(8, "little") + BLOB[8:])
